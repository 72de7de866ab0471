#!/usr/bin/env bash
# Issue 12 mini-study, seeds 1 and 2 of the default and of proto-cosine (after study12b.sh).
set -x
while pgrep -f study12b.sh > /dev/null; do sleep 10; done
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
proto=(base_learner.fc_init=prototypes base_learner.prototype_normalise=true base_learner.logits=cosine
       base_learner.learn_temperature=true base_learner.learn_theta=false)
run() { name=$1; shift; echo "== $name $(date +%s)"; OMP_NUM_THREADS=1 $M run --out $R/study/$name --preset fc100-cpu --init-from $R/fc100-half \
        --data-root $D model.width=0.5 pretrain.epochs=0 meta_train.iterations=400 meta_train.val_every=100 meta_test.episodes=2000 "$@" \
        > $R/study/$name.log 2>&1; echo "== end $name $(date +%s)"; }
(run default-seed1 seed=1; run default-seed2 seed=2) &
(run proto-cosine-seed1 "${proto[@]}" seed=1; run proto-cosine-seed2 "${proto[@]}" seed=2) &
wait
echo "== all done $(date +%s)"
