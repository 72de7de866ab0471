"""Does 48 px win once each size scores with its own test-time shifts (the preset's setting)? Two runs' pre-trained
starts on VALIDATION episodes no run or choice has used (seed 779), each with its own test-time shifts, paired per
episode against the first. Usage: python val_shifts.py BASELINE RUN --shifts S_BASELINE S_RUN [--episodes N]
(fc100-preset-s1 predates the shifts, so its config says 0: its rescoring used 2, as the preset does now)"""
import argparse
from pathlib import Path

import numpy as np
import torch

from metatransfer.phases.features import load_run_split
from metatransfer.phases.meta_test import confidence_interval, evaluate_split, load_start_model
from metatransfer.run import read_run_config

SEED = 779
parser = argparse.ArgumentParser()
parser.add_argument("baseline", type=Path)
parser.add_argument("run", type=Path)
parser.add_argument("--shifts", type=int, nargs=2, required=True)
parser.add_argument("--episodes", type=int, default=2000)
args = parser.parse_args()
device = torch.device("cpu")
scores = {}
for run, shift_views in zip((args.baseline, args.run), args.shifts):
    config = read_run_config(run)
    config.model.shift_views = shift_views
    val = load_run_split(config, "val")
    model = load_start_model(run, config, val.images.shape[-1], device)
    scores[run] = evaluate_split(*model, val, config, device, ways=[5], shots=[1, 5], episodes=args.episodes, n_query=15,
                                 protocol="standard", seed=SEED, with_shifts=True)
    for row in scores[run]:
        print(f"{run.name}: val 5-way {row['shot']}-shot start, shift_views={config.model.shift_views}: "
              f"{row['accuracy']:.2f} +- {row['ci95']:.2f} ({args.episodes} episodes)", flush=True)
for ra, rb in zip(scores[args.run], scores[args.baseline]):
    diff, ci = confidence_interval(np.asarray(ra["per_episode"]) - np.asarray(rb["per_episode"]))
    print(f"{ra['shot']}-shot: run - baseline {diff:+.2f} +- {ci:.2f} (paired, {args.episodes} episodes)")
