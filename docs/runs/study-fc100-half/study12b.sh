#!/usr/bin/env bash
# Issue 12 mini-study (continued): the same settings as study12.sh, --out first so overrides can follow.
# Two lanes of one thread each; lane A waits for the `default` run that study12.sh started.
set -x
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
proto=(base_learner.fc_init=prototypes base_learner.prototype_normalise=true base_learner.logits=cosine
       base_learner.learn_temperature=true base_learner.learn_theta=false)
run() { name=$1; shift; echo "== $name $(date +%s)"; OMP_NUM_THREADS=1 $M run --out $R/study/$name --preset fc100-cpu --init-from $R/fc100-half \
        --data-root $D model.width=0.5 pretrain.epochs=0 meta_train.iterations=400 meta_train.val_every=100 meta_test.episodes=2000 "$@" \
        > $R/study/$name.log 2>&1; echo "== end $name $(date +%s)"; }
laneA() { while pgrep -f "study/default " > /dev/null || pgrep -f "out /root/mtl-runs/study/default$" > /dev/null; do sleep 5; done
          while [ ! -f $R/study/default/results.json ] && pgrep -f "mtl-runs/study/default" > /dev/null; do sleep 5; done
          run default-augment meta_train.augment=true; run proto-cosine-lr1e-4 "${proto[@]}" meta_train.lr_ss=1e-4; }
laneB() { run proto-cosine "${proto[@]}"; run proto-cosine-augment "${proto[@]}" meta_train.augment=true
          run proto-cosine-bnaffine "${proto[@]}" model.ss_bn_affine=true; }
laneA & laneB & wait
echo "== all done $(date +%s)"
