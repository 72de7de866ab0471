#!/bin/bash
# Session 24: cifar-fs-cpu as shipped at full width, seed 0, 2,000 test episodes; then meta-training seeds 1 and 2
# on the same backbone. Each step resumes its run if started before, and skips it if finished.
cd /work/main
run() {  # run OUT ARGS...: start, resume or skip one run
    local out=$1; shift
    if [ -f "$out/results.json" ]; then return; fi
    if [ -f "$out/config.yaml" ]; then
        .venv/bin/mtl run --resume "$out" >> "$out.log" 2>&1
    else
        .venv/bin/mtl run --preset cifar-fs-cpu --data-root ~/mtl-data --out "$out" meta_test.episodes=2000 "$@" >> "$out.log" 2>&1
    fi
}
run ~/mtl-runs/cifarfs-full
run ~/mtl-runs/cifarfs-full-s1 --init-from ~/mtl-runs/cifarfs-full pretrain.epochs=0 seed=1
run ~/mtl-runs/cifarfs-full-s2 --init-from ~/mtl-runs/cifarfs-full pretrain.epochs=0 seed=2
