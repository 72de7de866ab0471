#!/bin/bash
# Session 22, second round: does the gain peak early (Meta-Baseline)? 200 iterations validated every 50.
while pgrep -f study22.sh > /dev/null; do sleep 10; done
cd /work/main
run() { name=$1; shift
  [ -f ~/mtl-runs/$name/results.json ] && return
  .venv/bin/mtl run --preset fc100-cpu --init-from ~/mtl-runs/fc100-full-v3 --data-root ~/mtl-data \
     --out ~/mtl-runs/$name pretrain.epochs=0 meta_test.episodes=2000 meta_train.iterations=200 meta_train.val_every=50 "$@" > ~/mtl-runs/$name.log 2>&1
}
run full-bnaffine-early model.ss_bn_affine=true meta_train.lr_ss=1e-3
run full-steps0-ft1e-5-early base_learner.steps=0 model.adapt=ft meta_train.lr_ss=1e-5
