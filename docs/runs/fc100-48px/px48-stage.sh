#!/bin/bash
# Session 29: stop fc100-48px after pre-training (at its meta-train 0 check), score its start on fresh validation,
# then the final checks. (Meant to resume meta-training afterwards with `mtl meta-train --resume`; not done, since
# 48 px did not win validation: see README.md.)
until grep -q "meta-train 0/800" ~/mtl-runs/fc100-48px.log; do sleep 20; done
pkill -f px48.sh; pkill -f "mtl run --resume /root/mtl-runs/fc100-48px"
while pgrep -f "mtl run --resume /root/mtl-runs/fc100-48px" > /dev/null; do sleep 2; done
cd /work/main
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-preset-s1 ~/mtl-runs/fc100-48px > ~/mtl-runs/px48-val-start.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/px48-val-start.txt
mv ~/mtl-runs/fc100-48px/val778-2000.json ~/mtl-runs/fc100-48px/val778-2000-start-only.json
bash ~/final-checks.sh
