#!/bin/bash
# Session 26: the fc100-cpu preset with label smoothing 0.1 in pre-training, seed 0; then fresh validation
# (seed 778) and the test paired with fc100-full-v3's report. Resumes if started before.
cd /work/main
out=~/mtl-runs/fc100-ls
s=$(date +%s)
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-ls.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out "$out" \
        pretrain.label_smoothing=0.1 meta_test.episodes=2000 >> ~/mtl-runs/fc100-ls.log 2>&1
fi
echo "run $(( $(date +%s)-s )) s" >> ~/mtl-runs/fc100-ls.log
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-wide ~/mtl-runs/fc100-ls > ~/mtl-runs/ls-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/ls-val.txt
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-ls docs/runs/fc100-full-v3 > ~/mtl-runs/ls-test.txt 2>&1
