"""Two runs on VALIDATION episodes that neither used (seed 778; pre-training validated on seed
meta_test.seed=1, meta-training on meta_train.val_seed=2): their pre-trained starts and their
meta-trained models, each paired per episode, A - B.  Usage: python val_compare.py RUN_A RUN_B [EPISODES]"""
import sys
from pathlib import Path

import numpy as np
import torch

from metatransfer.phases.features import load_run_split
from metatransfer.phases.meta_test import confidence_interval, evaluate_split, load_meta_model, load_start_model
from metatransfer.run import read_run_config

SEED = 778
runs = [Path(arg) for arg in sys.argv[1:3]]
episodes = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
device = torch.device("cpu")
scores = {}
for run in runs:
    config = read_run_config(run)
    val = load_run_split(config, "val")
    options = dict(ways=[5], shots=[1, 5], episodes=episodes, n_query=15, protocol="standard", seed=SEED)
    in_chans = val.images.shape[-1]
    start = evaluate_split(*load_start_model(run, config, in_chans, device), val, config, device, **options)
    backbone, weight, bias, temperature, _ = load_meta_model(run, config, in_chans, device)
    model = evaluate_split(backbone, weight, bias, val, config, device, temperature=temperature, **options)
    scores[run] = {"start": start, "model": model}
a, b = runs
for what in ("start", "model"):
    for ra, rb in zip(scores[a][what], scores[b][what]):
        diff, ci = confidence_interval(np.asarray(ra["per_episode"]) - np.asarray(rb["per_episode"]))
        print(f"val 5-way {ra['shot']}-shot {what}: A {ra['accuracy']:.2f} +- {ra['ci95']:.2f}, B {rb['accuracy']:.2f} +- {rb['ci95']:.2f}, "
              f"A - B {diff:+.2f} +- {ci:.2f} (paired, {episodes} episodes)", flush=True)
