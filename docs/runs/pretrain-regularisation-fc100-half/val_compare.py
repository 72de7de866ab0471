"""Runs on VALIDATION episodes that none of them used (seed 778; pre-training validated on
meta_test.seed=1, meta-training on meta_train.val_seed=2): each run's pre-trained start and, where it
meta-trained, its meta-trained model, paired per episode against the FIRST run given (whose own
scores print first, so one run alone prints its scores).
Scores are cached per run in RUN/val778-<episodes>.json, so a baseline is scored once.
Usage: python val_compare.py BASELINE RUN [RUN ...] [--episodes N]"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch

from metatransfer.phases.features import load_run_split
from metatransfer.phases.meta_test import confidence_interval, evaluate_split, load_meta_model, load_start_model
from metatransfer.run import checkpoint_exists, read_run_config

SEED = 778
parser = argparse.ArgumentParser()
parser.add_argument("runs", type=Path, nargs="+")
parser.add_argument("--episodes", type=int, default=2000)
args = parser.parse_args()
device = torch.device("cpu")


def scores_of(run: Path) -> dict:
    cache = run / f"val{SEED}-{args.episodes}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    config = read_run_config(run)
    val = load_run_split(config, "val")
    # with_shifts=False: scored as training's validation scores (flip, no test-time shifts), as every cache here was
    options = dict(ways=[5], shots=[1, 5], episodes=args.episodes, n_query=15, protocol="standard", seed=SEED, with_shifts=False)
    in_chans = val.images.shape[-1]
    scores = {"start": evaluate_split(*load_start_model(run, config, in_chans, device), val, config, device, **options)}
    if checkpoint_exists(run / "meta_train" / config.meta_test.checkpoint):
        backbone, weight, bias, temperature, _ = load_meta_model(run, config, in_chans, device)
        scores["model"] = evaluate_split(backbone, weight, bias, val, config, device, temperature=temperature, **options)
    cache.with_suffix(".tmp").write_text(json.dumps(scores))
    cache.with_suffix(".tmp").replace(cache)
    return scores


baseline, *others = args.runs
base = scores_of(baseline)
for what in ("start", "model"):  # the baseline's own scores first, so one run alone prints something
    for row in base.get(what, []):
        print(f"{baseline.name}, val 5-way {row['shot']}-shot {what}: {row['accuracy']:.2f} +- {row['ci95']:.2f} ({args.episodes} episodes)", flush=True)
for run in others:
    scores = scores_of(run)
    for what in [w for w in ("start", "model") if w in scores and w in base]:
        for ra, rb in zip(scores[what], base[what]):
            diff, ci = confidence_interval(np.asarray(ra["per_episode"]) - np.asarray(rb["per_episode"]))
            print(f"{run.name} - {baseline.name}, val 5-way {ra['shot']}-shot {what}: {ra['accuracy']:.2f} +- {ra['ci95']:.2f} vs "
                  f"{rb['accuracy']:.2f} +- {rb['ci95']:.2f}, difference {diff:+.2f} +- {ci:.2f} (paired, {args.episodes} episodes)", flush=True)
