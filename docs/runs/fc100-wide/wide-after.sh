#!/bin/bash
# After fc100-wide: score it on the fresh validation episodes (seed 778, 2,000), then compare test paired with fc100-full-v3's report.
while pgrep -f wide.sh > /dev/null; do sleep 10; done
cd /work/main
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-wide > ~/mtl-runs/wide-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/wide-val.txt
.venv/bin/python - >> ~/mtl-runs/wide-val.txt <<'PY'
import json, pathlib
d = json.loads(pathlib.Path.home().joinpath("mtl-runs/fc100-wide/val778-2000.json").read_text())
for what, rows in d.items():
    for r in rows:
        print(what, r["way"], r["shot"], round(r["accuracy"], 2), round(r["ci95"], 2))
PY
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-wide docs/runs/fc100-full-v3 > ~/mtl-runs/wide-test.txt 2>&1
