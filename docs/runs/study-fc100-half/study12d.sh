#!/usr/bin/env bash
# Issue 12: the configuration whose validation was still rising at 400 (proto-cosine, lr_ss 1e-4), run to 1,200.
set -x
while pgrep -f "study12[bc].sh" > /dev/null; do sleep 10; done
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
echo "== proto-cosine-lr1e-4-1200 $(date +%s)"
$M run --out $R/study/proto-cosine-lr1e-4-1200 --preset fc100-cpu --init-from $R/fc100-half --data-root $D model.width=0.5 pretrain.epochs=0 \
   meta_train.iterations=1200 meta_train.lr_decay_every=400 meta_train.val_every=200 meta_test.episodes=2000 meta_train.lr_ss=1e-4 \
   base_learner.fc_init=prototypes base_learner.prototype_normalise=true base_learner.logits=cosine \
   base_learner.learn_temperature=true base_learner.learn_theta=false > $R/study/proto-cosine-lr1e-4-1200.log 2>&1
echo "== all done $(date +%s)"
