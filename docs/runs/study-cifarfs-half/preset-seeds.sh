#!/usr/bin/env bash
# Seeds 1 and 2 of the shipped presets' meta-training on the half-width backbones (after preset-runs.sh).
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
while pgrep -f "preset-runs.sh|preset-cifarfs-half " > /dev/null; do sleep 15; done
for seed in 1 2; do
  echo "== seed $seed $(date +%s)"
  OMP_NUM_THREADS=1 $M run --preset fc100-cpu --init-from $R/fc100-half --data-root $D --out $R/preset-fc100-half-seed$seed \
    model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 seed=$seed > $R/preset-fc100-half-seed$seed.log 2>&1 &
  OMP_NUM_THREADS=1 $M run --preset cifar-fs-cpu --init-from $R/cifarfs-half --data-root $D --out $R/preset-cifarfs-half-seed$seed \
    model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 seed=$seed > $R/preset-cifarfs-half-seed$seed.log 2>&1 &
  wait
done
echo "== end $(date +%s)"
