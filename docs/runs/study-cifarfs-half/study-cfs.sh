#!/usr/bin/env bash
# Issue 12 study, session 12: CIFAR-FS at half width (same protocol as the FC100-half study, validation on 600
# episodes), plus FC100-half seeds of proto-cosine at lr_ss 1e-4. Two single-thread runs at a time.
R=~/mtl-runs; D=~/mtl-data; M=/work/main/.venv/bin/mtl
while pgrep -f "out $R/cifarfs-half" > /dev/null; do sleep 20; done   # the CIFAR-FS pre-training first
job() {  # name dataset seed extra...
  name=$1; ds=$2; seed=$3; shift 3
  if [ $ds = cfs ]; then base=(--preset cifar-fs-cpu --init-from $R/cifarfs-half); more=(meta_train.val_episodes=600); out=$R/study-cfs/$name
  else base=(--preset fc100-cpu --init-from $R/fc100-half); more=(); out=$R/study/$name; fi
  [ -f $out/results.json ] && return; rm -rf $out
  echo "== $name $(date +%s)"
  OMP_NUM_THREADS=1 $M run "${base[@]}" --data-root $D --out $out model.width=0.5 pretrain.epochs=0 seed=$seed \
    meta_train.iterations=400 meta_train.val_every=100 meta_test.episodes=2000 "${more[@]}" "$@" > $out.log 2>&1
  echo "== end $name rc=$? $(date +%s)"
}
export -f job; export R D M
P="base_learner.fc_init=prototypes base_learner.prototype_normalise=true base_learner.logits=cosine base_learner.learn_temperature=true base_learner.learn_theta=false"
cat > $R/study-cfs/jobs.txt <<JOBS
default cfs 0
proto-cosine cfs 0 $P
proto-cosine-lr1e-4 cfs 0 $P meta_train.lr_ss=1e-4
proto-cosine-lr1e-4-seed1 fc 1 $P meta_train.lr_ss=1e-4
proto-cosine-lr1e-4-seed2 fc 2 $P meta_train.lr_ss=1e-4
default-seed1 cfs 1
proto-cosine-seed1 cfs 1 $P
proto-cosine-lr1e-4-seed1 cfs 1 $P meta_train.lr_ss=1e-4
default-seed2 cfs 2
proto-cosine-seed2 cfs 2 $P
proto-cosine-lr1e-4-seed2 cfs 2 $P meta_train.lr_ss=1e-4
JOBS
xargs -P 2 -L 1 bash -c 'job "$@"' _ < $R/study-cfs/jobs.txt
echo "== all done $(date +%s)"
