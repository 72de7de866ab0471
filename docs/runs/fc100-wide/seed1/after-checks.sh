#!/bin/bash
# Ran after the session's fresh-clone checks (a local script, not part of this run).
cd /work/main
.venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out ~/mtl-runs/fc100-wide-s1 model.backbone=resnet12_wide meta_test.episodes=2000 \
    --init-from ~/mtl-runs/fc100-wide pretrain.epochs=0 seed=1 > ~/mtl-runs/fc100-wide-s1.log 2>&1
