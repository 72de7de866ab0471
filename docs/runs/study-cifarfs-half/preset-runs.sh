#!/usr/bin/env bash
# The shipped presets' meta-training (800 iterations, validation every 200 on 300 episodes) on the half-width
# backbones, tested on the study's 2,000 episodes; after the study queues.
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
while pgrep -f "study-cfs2.sh" > /dev/null; do sleep 15; done
echo "== start $(date +%s)"
OMP_NUM_THREADS=1 $M run --preset fc100-cpu --init-from $R/fc100-half --data-root $D --out $R/preset-fc100-half \
  model.width=0.5 pretrain.epochs=0 meta_test.episodes=2000 > $R/preset-fc100-half.log 2>&1 &
true \

wait
echo "== end $(date +%s)"
