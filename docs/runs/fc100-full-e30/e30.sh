#!/bin/bash
# Session 23: the fc100-cpu preset with a longer pre-training schedule (30 epochs instead of 20), seed 0.
cd /work/main
.venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out ~/mtl-runs/fc100-full-e30 \
    pretrain.epochs=30 meta_test.episodes=2000 "$@" >> ~/mtl-runs/fc100-full-e30.log 2>&1
