#!/bin/bash
while pgrep -f px48-stage.sh > /dev/null; do sleep 10; done
cd /work/main; s=$(date +%s)
.venv/bin/python docs/runs/fc100-48px/val_shifts.py ~/mtl-runs/fc100-preset-s1 ~/mtl-runs/fc100-48px --shifts 2 3 > ~/mtl-runs/px48-val-shifts.txt 2>&1
echo "val_shifts $(( $(date +%s)-s )) s" >> ~/mtl-runs/px48-val-shifts.txt
