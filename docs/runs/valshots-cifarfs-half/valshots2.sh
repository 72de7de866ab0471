#!/usr/bin/env bash
# valshots.sh cut to CIFAR-FS: after seed 1, seed 2 only (FC100 dropped for time).
R=~/mtl-runs; D=~/mtl-data; M=/work/fresh/.venv/bin/mtl
while pgrep -f "valshots/cifarfs-seed1" > /dev/null; do sleep 10; done
echo "== cifarfs seed 2 $(date +%s)"
OMP_NUM_THREADS=1 $M run --preset cifar-fs-cpu --init-from $R/cifarfs-half --data-root $D --out $R/valshots/cifarfs-seed2 \
  model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 seed=2 meta_train.val_shots=5 > $R/valshots/cifarfs-seed2.log 2>&1
echo "== end $(date +%s)"
