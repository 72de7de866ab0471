#!/bin/bash
while pgrep -f e30.sh > /dev/null; do sleep 10; done
cd /work/main
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-full-v3 ~/mtl-runs/fc100-full-e30 > ~/mtl-runs/e30-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/e30-val.txt
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-full-e30 ~/mtl-runs/fc100-full-v3 > ~/mtl-runs/e30-test.txt 2>&1
