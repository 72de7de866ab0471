#!/bin/bash
# Session 22: the half-width study's largest-gain configurations on the full-width backbone fc100-full-v3.
cd /work/main
run() { name=$1; shift
  [ -f ~/mtl-runs/$name/results.json ] && return
  .venv/bin/mtl run --preset fc100-cpu --init-from ~/mtl-runs/fc100-full-v3 --data-root ~/mtl-data \
     --out ~/mtl-runs/$name pretrain.epochs=0 meta_test.episodes=2000 "$@" > ~/mtl-runs/$name.log 2>&1
}
run full-bnaffine model.ss_bn_affine=true meta_train.lr_ss=1e-3
run full-steps0-ft1e-5 base_learner.steps=0 model.adapt=ft meta_train.lr_ss=1e-5
run full-ft1e-5 model.adapt=ft meta_train.lr_ss=1e-5
