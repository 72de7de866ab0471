#!/bin/bash
# Session 24: the fc100-cpu preset with the wider ResNet-12 (64-160-320-640), seed 0. Resumes if started before.
cd /work/main
out=~/mtl-runs/fc100-wide
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-wide.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out "$out" \
        model.backbone=resnet12_wide meta_test.episodes=2000 >> ~/mtl-runs/fc100-wide.log 2>&1
fi
