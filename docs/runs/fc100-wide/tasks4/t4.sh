#!/bin/bash
# Session 26: 4 tasks a meta-batch on the wide backbone, at the compute of the 2-task run (400 iterations,
# lr decay and validation every 100), seed 0; then fresh validation paired with fc100-wide (seed 778).
while pgrep -f ls.sh > /dev/null; do sleep 10; done
cd /work/main
out=~/mtl-runs/fc100-wide-t4
s=$(date +%s)
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-wide-t4.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data --out "$out" model.backbone=resnet12_wide meta_test.episodes=2000 \
        --init-from ~/mtl-runs/fc100-wide pretrain.epochs=0 meta_train.n_tasks=4 meta_train.iterations=400 \
        meta_train.lr_decay_every=100 meta_train.val_every=100 >> ~/mtl-runs/fc100-wide-t4.log 2>&1
fi
echo "run $(( $(date +%s)-s )) s" >> ~/mtl-runs/fc100-wide-t4.log
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-wide ~/mtl-runs/fc100-wide-s1 ~/mtl-runs/fc100-wide-t4 > ~/mtl-runs/t4-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/t4-val.txt
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-wide-t4 ~/mtl-runs/fc100-wide > ~/mtl-runs/t4-test.txt 2>&1
