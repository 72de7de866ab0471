#!/bin/bash
# Session 22, third round: the shipped preset (SS, lr_ss 1e-4) validated every 50 iterations up to 400.
while pgrep -f study22b.sh > /dev/null; do sleep 10; done
cd /work/main
name=full-preset-early
[ -f ~/mtl-runs/$name/results.json ] && exit 0
.venv/bin/mtl run --preset fc100-cpu --init-from ~/mtl-runs/fc100-full-v3 --data-root ~/mtl-data \
   --out ~/mtl-runs/$name pretrain.epochs=0 meta_test.episodes=2000 meta_train.iterations=400 meta_train.val_every=50 > ~/mtl-runs/$name.log 2>&1
