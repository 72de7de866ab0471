"""Exploration on VALIDATION episodes only: do the test-time flip average, the power transform (x^0.5) or
centring by the base-class mean (SimpleShot CL2N) help the run's base learner on its pre-trained backbone?
Paired on the same episodes. Usage: python exp.py RUN EPISODES IMAGES_PER_BASE_CLASS"""
import sys, time
from pathlib import Path
import numpy as np, torch, yaml
from metatransfer.config import config_from_dict
from metatransfer.phases.features import load_run_split, extract_features
from metatransfer.phases.meta_test import load_start_model, evaluate_features, confidence_interval
from metatransfer.models.head import BaseLearner
from metatransfer.data.episodes import TaskSampler
torch.set_num_threads(1)
run = Path(sys.argv[1]); episodes = int(sys.argv[2]); per_class = int(sys.argv[3])
cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
dev = torch.device("cpu")
train, val = load_run_split(cfg, "train"), load_run_split(cfg, "val")
backbone, w, b = load_start_model(run, cfg, train.images.shape[-1], dev)
opts = dict(mean=train.mean, std=train.std, device=dev, amp=cfg.amp, channels_last=cfg.channels_last)
t = time.time()
rng = np.random.default_rng(0)
idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(train.labels == c), per_class, replace=False) for c in range(train.num_classes)]))
base = extract_features(backbone, train.images, indices=idx, **opts)
vfeat = extract_features(backbone, val.images, **opts)
vflip = extract_features(backbone, val.images, flip=True, **opts)
print(f"features {time.time()-t:.0f}s", flush=True)
mu = base.mean(0, keepdim=True)
learner = BaseLearner.from_config(cfg.base_learner)
zero = BaseLearner.from_config({**vars(cfg.base_learner), "steps": 0})
for shot in (1, 5):
    tasks = TaskSampler(val.labels, n_way=5, n_shot=shot, n_query=15, seed=[777, 5, shot]).sample(episodes)
    rows = {}
    pt = lambda x: x.clamp(min=0).pow(0.5)
    variants = (("raw", vfeat), ("flipavg", (vfeat + vflip) / 2), ("power0.5", pt(vfeat)), ("power-flipavg", pt((vfeat + vflip) / 2)),
                ("power-centred", pt(vfeat) - pt(base).mean(0, keepdim=True)), ("centred", vfeat - mu))
    for name, feats in variants:
        for lname, l in (("steps%d" % learner.steps, learner), ("steps0", zero)):
            rows[f"{name}-{lname}"] = evaluate_features(feats, tasks, w, b, learner=l, temperature=cfg.base_learner.temperature)
    ref = rows[f"raw-steps{learner.steps}"]
    for k, v in rows.items():
        m, ci = confidence_interval(v); d, dci = confidence_interval(v - ref)
        print(f"{shot}-shot {k:16s} {m:.2f} +- {ci:.2f}  vs raw-steps{learner.steps}: {d:+.2f} +- {dci:.2f}", flush=True)
