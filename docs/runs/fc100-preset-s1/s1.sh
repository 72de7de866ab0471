#!/bin/bash
# Session 27: the fc100-cpu preset as shipped, pre-training seed 1 (everything else as fc100-full-v3, seed 0);
# then fresh validation (seed 778) paired with the wide run's cache, and the test paired with fc100-full-v3's report.
cd /work/main
out=~/mtl-runs/fc100-preset-s1
s=$(date +%s)
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-preset-s1.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out "$out" \
        seed=1 meta_test.episodes=2000 >> ~/mtl-runs/fc100-preset-s1.log 2>&1
fi
echo "run $(( $(date +%s)-s )) s" >> ~/mtl-runs/fc100-preset-s1.log
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py docs/runs/fc100-wide ~/mtl-runs/fc100-preset-s1 > ~/mtl-runs/s1-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/s1-val.txt
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-preset-s1 docs/runs/fc100-full-v3 > ~/mtl-runs/s1-test.txt 2>&1
