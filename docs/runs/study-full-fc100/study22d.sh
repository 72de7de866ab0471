#!/bin/bash
# Session 22, fourth round: the two settings that fell, at the gentler step that lets SS rise (200 iterations, validated every 50).
cd /work/main
run() { name=$1; shift
  [ -f ~/mtl-runs/$name/results.json ] && return
  .venv/bin/mtl run --preset fc100-cpu --init-from ~/mtl-runs/fc100-full-v3 --data-root ~/mtl-data \
     --out ~/mtl-runs/$name pretrain.epochs=0 meta_test.episodes=2000 meta_train.iterations=200 meta_train.val_every=50 "$@" > ~/mtl-runs/$name.log 2>&1
}
run full-bnaffine1e-4-early model.ss_bn_affine=true
run full-ft1e-6-early model.adapt=ft meta_train.lr_ss=1e-6
