#!/usr/bin/env bash
# Issue 12 mini-study on the fc100-half backbone: meta-train 1-shot, 400 iterations, val every 100 (300 episodes,
# val_seed 2, disjoint from the episodes that chose the pre-training epoch), test 2000 episodes at 1 and 5 shot.
set -x
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
common=(--preset fc100-cpu --init-from $R/fc100-half --data-root $D model.width=0.5 pretrain.epochs=0
        meta_train.iterations=400 meta_train.val_every=100 meta_test.episodes=2000)
proto=(base_learner.fc_init=prototypes base_learner.prototype_normalise=true base_learner.logits=cosine
       base_learner.learn_temperature=true base_learner.learn_theta=false)
run() { name=$1; shift; echo "== $name $(date +%s)"; OMP_NUM_THREADS=1 $M run "${common[@]}" --out $R/study/$name "$@" > $R/study/$name.log 2>&1; echo "== end $name $(date +%s)"; }
mkdir -p $R/study
# Issue 13 baselines first, on the quiet machine: Omniglot from scratch (omniglot-cpu recipe) with the transfer's
# wall-clock budget, the full omniglot-cpu preset, and the transfer meta-trained 5x longer.
echo "== omni-scratch-budget $(date +%s)"
$M run --preset omniglot-cpu --data-root $D --out $R/omni-scratch-budget meta_test.n_way=5 pretrain.epochs=3 meta_train.iterations=100 meta_train.val_every=50 > $R/omni-scratch-budget.log 2>&1
echo "== omni-scratch-full $(date +%s)"
$M run --preset omniglot-cpu --data-root $D --out $R/omni-scratch-full meta_test.n_way=5 > $R/omni-scratch-full.log 2>&1
echo "== omni-transfer-1000 $(date +%s)"
$M run --preset transfer-cpu --init-from $R/fc100-half --data-root $D --out $R/omni-transfer-1000 data.name=omniglot data.hflip=false meta_train.iterations=1000 meta_train.lr_decay_every=500 meta_train.val_every=100 > $R/omni-transfer-1000.log 2>&1
echo "== baselines done $(date +%s)"
run default &
run proto-cosine "${proto[@]}" &
wait
run default-augment meta_train.augment=true &
run proto-cosine-augment "${proto[@]}" meta_train.augment=true &
wait
run proto-cosine-lr1e-4 "${proto[@]}" meta_train.lr_ss=1e-4 &
run proto-cosine-bnaffine "${proto[@]}" model.ss_bn_affine=true &
wait
echo "== all done $(date +%s)"
