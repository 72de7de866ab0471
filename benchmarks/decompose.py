"""Which meta-parameter moved the accuracy: the scale-shift of the backbone, or theta (the FC init)?

Meta-training changes two things at once. This scores the four combinations on the same seeded
episodes: pre-trained or meta-trained backbone, times zero or meta-learned theta. When a
meta-trained run scores below its pre-trained start, the table says which of the two did it.

    .venv/bin/python benchmarks/decompose.py runs/ablation-fc100/ss-no-ht-1shot-seed0 --split val
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from metatransfer.data.cache import load_split
from metatransfer.evaluation import EpisodePlan, evaluate_split
from metatransfer.loading import load_run_model, load_start_model
from metatransfer.run import read_run_config, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with pretrain/best and meta_train/<checkpoint>")
    parser.add_argument("--checkpoint", default="last", help="meta_train checkpoint to decompose (default last)")
    parser.add_argument("--split", default="test", help="split to score on (val keeps the test split unseen)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--data-root", help="where the prepared caches are (default: the run's data.root)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    config = read_run_config(args.run_dir)
    config.meta_test = replace(config.meta_test, checkpoint=args.checkpoint, split=args.split)
    if args.data_root:
        config.data = replace(config.data, root=args.data_root)
    device = resolve_device(config.device)
    split = load_split(config.data.root, config.data.name, args.split)
    compute = dict(amp=config.amp, channels_last=config.channels_last, shift_views=0 if args.split == "val" else config.views.shift_pixels)
    meta = replace(load_run_model(args.run_dir, config), **compute).to(device)  # validation as meta-training scored it: no shifts
    start = replace(load_start_model(args.run_dir, config), **compute).to(device)
    theta_weight, theta_bias = meta.learner.theta_weight, meta.learner.theta_bias
    zeros = torch.zeros_like(theta_weight), torch.zeros_like(theta_bias)

    shot, test = config.meta_train.n_shot, config.meta_test
    rows = []
    plan = EpisodePlan(ways=[config.meta_train.n_way], shots=[shot], episodes=args.episodes, n_query=test.n_query,
                       seed=config.meta_train.val_seed if args.split == "val" else test.seed)
    for backbone_name, model in (("pre-trained", start), (f"meta_train/{args.checkpoint}", meta)):
        for theta_name, (weight, bias) in (("zero", zeros), ("meta-learned", (theta_weight, theta_bias))):
            # the untrained base-learner's settings and temperature, with each theta
            learner = start.learner.with_theta(weight, bias)
            result = evaluate_split(replace(model, learner=learner), split, plan)[0]
            rows.append({"backbone": backbone_name, "theta": theta_name, "accuracy": result["accuracy"], "ci95": result["ci95"]})
            print(f"{backbone_name:>20} + {theta_name:>12} theta: {result['accuracy']:.2f} +- {result['ci95']:.2f}", flush=True)
    print(f"(5-way {shot}-shot, {args.episodes} {args.split} episodes, {test.n_query} queries; |theta| = {theta_weight.norm():.3f})")
    if args.out:
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "split": args.split, "shot": shot,
                                        "episodes": args.episodes, "theta_norm": float(theta_weight.norm()), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
