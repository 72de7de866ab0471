"""Probe (session 27): fresh validation episodes (seed 778, as val_compare.py) of a run's pre-trained start, scored
with frozen BN (running statistics, the default) and with transductive BN (`model.bn_mode=batch`: each episode's
support set and query set normalised by their own statistics, as in the TF code), paired per episode.
Usage: python bn_probe.py RUN EPISODES [standard|paper]"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metatransfer.phases.features import load_run_split
from metatransfer.phases.meta_test import confidence_interval, evaluate_split, load_start_model
from metatransfer.run import read_run_config

run, episodes = Path(sys.argv[1]), int(sys.argv[2])
protocol = sys.argv[3] if len(sys.argv) > 3 else "standard"
device = torch.device("cpu")
scores = {}
for mode in ("frozen", "batch"):
    config = read_run_config(run)
    config.model.bn_mode = mode
    val = load_run_split(config, "val")
    began = time.time()
    start = load_start_model(run, config, val.images.shape[-1], device)
    scores[mode] = evaluate_split(*start, val, config, device, ways=[5], shots=[1, 5], episodes=episodes, n_query=15,
                                  protocol=protocol, seed=778)
    print(mode, [(r["shot"], r["accuracy"], r["ci95"]) for r in scores[mode]], f"{time.time() - began:.0f}s", flush=True)
for batch, frozen in zip(scores["batch"], scores["frozen"]):
    difference, ci = confidence_interval(np.asarray(batch["per_episode"]) - np.asarray(frozen["per_episode"]))
    print(f"batch - frozen, {batch['shot']}-shot: {difference:+.2f} +- {ci:.2f}")
