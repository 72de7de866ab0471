#!/bin/bash
# Session 28: does input resolution close FC100's 1-shot gap? The fc100-cpu preset (seed 1, as fc100-preset-s1) on
# FC100 upsampled to 48 px at prepare time (mtl data prepare fc100 --image-size 48 --root ~/mtl-data48), the crop's
# padding and the test-time shifts scaled by 1.5 with it (4 -> 6, 2 -> 3). Resumes itself if the run directory exists.
# Then fresh validation (seed 778, no test-time shifts) paired with fc100-preset-s1's cache.
cd /work/main
out=~/mtl-runs/fc100-48px
s=$(date +%s)
if [ -f "$out/config.yaml" ]; then
    .venv/bin/mtl run --resume "$out" >> ~/mtl-runs/fc100-48px.log 2>&1
else
    .venv/bin/mtl run --preset fc100-cpu --data-root ~/mtl-data48 --out "$out" \
        seed=1 meta_test.episodes=2000 data.crop_padding=6 model.shift_views=3 >> ~/mtl-runs/fc100-48px.log 2>&1
fi
echo "run $(( $(date +%s)-s )) s" >> ~/mtl-runs/fc100-48px.log
s=$(date +%s)
.venv/bin/python docs/runs/pretrain-regularisation-fc100-half/val_compare.py ~/mtl-runs/fc100-preset-s1 "$out" > ~/mtl-runs/px48-val.txt 2>&1
echo "val_compare $(( $(date +%s)-s )) s" >> ~/mtl-runs/px48-val.txt
