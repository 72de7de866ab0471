#!/bin/bash
# Session 27: 20-way 1-shot meta-training at full width on the seed-1 preset backbone, at the compute of the
# preset's 800 5-way iterations (200 iterations, 4x the images each); then fresh validation and paired test.
# (it waited here for the seed-1 run, s1.sh, to finish)
cd /work/main
out=~/mtl-runs/fc100-s1-w20
s=$(date +%s)
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-s1-w20.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --init-from ~/mtl-runs/fc100-preset-s1 --data-root ~/mtl-data --out "$out" \
        pretrain.epochs=0 seed=1 meta_test.episodes=2000 meta_train.n_way=20 meta_train.iterations=200 \
        meta_train.lr_decay_every=50 meta_train.val_every=50 >> ~/mtl-runs/fc100-s1-w20.log 2>&1
fi
echo "run $(( $(date +%s)-s )) s" >> ~/mtl-runs/fc100-s1-w20.log
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-preset-s1 ~/mtl-runs/fc100-s1-w20 > ~/mtl-runs/w20-val.txt 2>&1
.venv/bin/python benchmarks/paired.py ~/mtl-runs/fc100-s1-w20 ~/mtl-runs/fc100-preset-s1 > ~/mtl-runs/w20-test.txt 2>&1
