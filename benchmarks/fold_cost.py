"""What folding frozen BN into its conv saves a meta-iteration: the same meta-iteration with and without it.

Why: with `model.bn_mode=frozen` each BN is a per-channel affine map, yet run as its own layer it
reads and writes every activation twice more (forward and backward); at 84 px that was a sixth of a
meta-iteration. `meta_batch_loss` now runs the backbone through `models.fuse.folded_view`, which
folds each BN into its conv at every call, so gradients still reach SS (or FT's convs).

How: `e3bm_cost.meta_iteration` (one backbone with SS, one random meta-batch, `meta_batch_loss`,
backward, Adam) with the fold as shipped, and with `folded_view` replaced by the identity (the
backbone as it is: conv, then BN). The two alternate (A-B-A-B...) after a warm-up of each; the median
of each is reported with their ratio.

    .venv/bin/python benchmarks/fold_cost.py --width 0.5 --image-size 84 --logits cosine   # miniimagenet-cpu's meta-iteration

The last line is the headline: `folded / unfolded meta-iteration: R.RRx (...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark, however this script is run
from e3bm_cost import meta_iteration, random_episode  # noqa: E402
from metatransfer.config import Config  # noqa: E402
from metatransfer.phases import meta_train  # noqa: E402
from metatransfer.run import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-tasks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--logits", choices=("linear", "cosine"), default="linear", help="cosine: the CPU presets' proto-cosine learner")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast where native")
    parser.add_argument("--repeats", type=int, default=4, help="timed meta-iterations of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.n_way = 5
    config = Config()
    config.amp, config.channels_last, config.meta_train.first_order = args.amp, True, args.first_order
    config.base_learner = dataclasses.replace(config.base_learner, steps=args.steps)
    if args.logits == "cosine":
        config.base_learner = dataclasses.replace(config.base_learner, logits="cosine", fc_init="prototypes", prototype_normalise=True,
                                                  learn_temperature=True, learn_theta=False)
    episode = random_episode(args.n_tasks, 5, 1, 15, args.image_size)
    step = meta_iteration(config, args, episode, device)
    shipped = meta_train.folded_view
    variants = {"folded": shipped, "unfolded": lambda backbone: backbone}
    for fold in variants.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        meta_train.folded_view = fold
        step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fold in variants.items():
            meta_train.folded_view = fold
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    meta_train.folded_view = shipped
    median = {name: statistics.median(values) for name, values in times.items()}
    setting = (f"{args.backbone} x{args.width}, {args.image_size} px, {args.n_tasks} tasks 5-way 1-shot 15-query, {args.steps} steps, "
               f"{args.logits} logits, {'first' if args.first_order else 'second'} order, {device.type}"
               f"{', bf16 autocast' if args.amp else ''}, {torch.get_num_threads()} threads")
    for name, values in times.items():
        print(f"{name:8s} meta-iteration: median {median[name] * 1000:8.1f} ms  (all: {', '.join(f'{v * 1000:.0f}' for v in values)})")
    print(f"folded / unfolded meta-iteration: {median['folded'] / median['unfolded']:.2f}x ({setting})")


if __name__ == "__main__":
    main()
