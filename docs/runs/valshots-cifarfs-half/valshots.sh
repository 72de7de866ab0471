#!/usr/bin/env bash
# The shipped presets with meta_train.val_shots=5 (5-shot tasks scored with the checkpoint 5-shot
# validation picked) on the half-width backbones, 3 seeds each, one run at a time at one thread.
R=~/mtl-runs; D=~/mtl-data; M=/work/fresh/.venv/bin/mtl
for seed in 0 1 2; do
  echo "== cifarfs seed $seed $(date +%s)"
  OMP_NUM_THREADS=1 $M run --preset cifar-fs-cpu --init-from $R/cifarfs-half --data-root $D --out $R/valshots/cifarfs-seed$seed \
    model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 seed=$seed meta_train.val_shots=5 > $R/valshots/cifarfs-seed$seed.log 2>&1
done
for seed in 0 1 2; do
  echo "== fc100 seed $seed $(date +%s)"
  OMP_NUM_THREADS=1 $M run --preset fc100-cpu --init-from $R/fc100-half --data-root $D --out $R/valshots/fc100-seed$seed \
    model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 seed=$seed meta_train.val_shots=5 > $R/valshots/fc100-seed$seed.log 2>&1
done
echo "== end $(date +%s)"
