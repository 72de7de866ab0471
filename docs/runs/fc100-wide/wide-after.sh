#!/bin/bash
# After fc100-wide: score it on the fresh validation episodes (seed 778, 2,000; val_compare prints a lone run's own
# scores), then compare test paired with fc100-full-v3's report.
while pgrep -f wide.sh > /dev/null; do sleep 10; done
cd /work/main
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-wide > ~/mtl-runs/wide-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/wide-val.txt
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-wide docs/runs/fc100-full-v3 > ~/mtl-runs/wide-test.txt 2>&1
