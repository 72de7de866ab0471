"""What E3BM adds to a meta-iteration: one MTL meta-iteration against the same with `base_learner.ensemble=e3bm`.

Why: E3BM's hyperprior learners and its ensemble run inside the inner loop, once per step and task,
so they could make every meta-iteration dearer; the target is at most 1.5x plain MTL's time.

How: one backbone (random seeded weights, SS attached, convs frozen, BN at running statistics), one
random meta-batch of T tasks, and for each variant one meta-iteration as `phases/meta_train.py` runs
it: `meta_batch_loss` (one backbone forward, the batched inner loop), backward into SS, theta and (E3BM)
the hyperprior learners, one Adam step. What the pixels show does not change the cost. The two variants
alternate (A-B-A-B...) after a warm-up of each, so a change of machine load weighs on both; the median
of each is reported with their ratio.

    .venv/bin/python benchmarks/e3bm_cost.py                          # resnet12, 32 px, 100 steps, second order
    .venv/bin/python benchmarks/e3bm_cost.py --logits cosine --first-order --image-size 84

The last line is the headline: `E3BM / MTL meta-iteration: R.RRx (...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Callable

import torch

from metatransfer.config import Config
from metatransfer.data.episodes import Episode
from metatransfer.models.backbones import create_backbone
from metatransfer.models.scale_shift import apply_scale_shift, scale_shift_parameters
from metatransfer.model import Preprocessing
from metatransfer.models.head import BaseLearner
from metatransfer.phases.meta_train import meta_batch_loss
from metatransfer.run import resolve_device

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # any normalisation costs the same


def random_episode(n_tasks: int, n_way: int, n_shot: int, n_query: int, size: int) -> Episode:
    generator = torch.Generator().manual_seed(0)

    def images(per_class: int) -> torch.Tensor:
        return torch.randint(0, 256, (n_tasks, n_way * per_class, size, size, 3), dtype=torch.uint8, generator=generator)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(n_way).repeat_interleave(per_class).expand(n_tasks, -1).contiguous()

    return Episode(images(n_shot), labels(n_shot), images(n_query), labels(n_query), torch.arange(n_way).expand(n_tasks, -1).contiguous())


def meta_iteration(config: Config, args: argparse.Namespace, episode: Episode, device: torch.device) -> Callable[[], None]:
    """One meta-iteration of `config`, with its own backbone copy and optimizer, as meta-train sets them up."""
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, in_chans=3, width=args.width).to(device)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    apply_scale_shift(backbone)
    backbone.eval()
    if config.channels_last:
        backbone.to(memory_format=torch.channels_last)
    learner = BaseLearner.untrained(config.base_learner, backbone.out_features, n_way=args.n_way, seed=config.seed).trainable(device)
    groups = [{"params": scale_shift_parameters(backbone), "lr": 1e-4}, {"params": learner.head_parameters(), "lr": 1e-3}]
    if learner.hyperprior is not None:
        groups.append({"params": learner.hyperprior_parameters(), "lr": 1e-6})
    preprocessing = Preprocessing(image_size=episode.support_images.shape[-2], channels=3, mean=MEAN, std=STD)
    optimizer = torch.optim.Adam(groups)

    def step() -> None:
        loss = meta_batch_loss(backbone, learner, episode, config, preprocessing)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def time_alternately(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The median seconds of each step, timed in turn (A-B-A-B...) after two warm-up calls of each
    (allocator, oneDNN/cuDNN kernel choice), so a change of machine load weighs on all; prints every time."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:8s} meta-iteration: median {median[name] * 1000:8.1f} ms  (all: {', '.join(f'{v * 1000:.0f}' for v in values)})")
    return median


def meta_iteration_setup(description: str) -> tuple[argparse.Namespace, Config, Episode, torch.device]:
    """The command line shared by the meta-iteration benchmarks, and what it sets: the plain MTL
    config, one random meta-batch and the device (torch's thread count set as asked)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--n-tasks", type=int, default=2)
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--n-shot", type=int, default=1)
    parser.add_argument("--n-query", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100, help="inner steps (E3BM's code and the PyTorch port: 100)")
    parser.add_argument("--logits", choices=("linear", "cosine"), default="linear",
                        help="cosine: E3BM's own classifier (prototype start, centred features, temperature 8)")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast where native")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-iterations of each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config()
    config.amp, config.channels_last = args.amp, True
    config.meta_train.first_order, config.meta_train.n_way = args.first_order, args.n_way
    config.base_learner = dataclasses.replace(config.base_learner, steps=args.steps)
    if args.logits == "cosine":
        config.base_learner = dataclasses.replace(config.base_learner, logits="cosine", fc_init="prototypes", feature_centre=True,
                                                  temperature=8.0, learn_theta=False, lr=0.1)
    episode = random_episode(args.n_tasks, args.n_way, args.n_shot, args.n_query, args.image_size)
    return args, config, episode, resolve_device(args.device)


def setting_of(args: argparse.Namespace, device: torch.device) -> str:
    return (f"{args.backbone} x{args.width}, {args.image_size} px, {args.n_tasks} tasks {args.n_way}-way {args.n_shot}-shot "
            f"{args.n_query}-query, {args.steps} steps, {args.logits} logits, {'first' if args.first_order else 'second'} order, "
            f"{device.type}{', bf16 autocast' if args.amp else ''}, {torch.get_num_threads()} threads")


def main() -> None:
    args, config, episode, device = meta_iteration_setup(__doc__.split("\n\n")[0])
    e3bm = dataclasses.replace(config, base_learner=dataclasses.replace(config.base_learner, ensemble="e3bm"))
    steps = {"MTL": meta_iteration(config, args, episode, device), "E3BM": meta_iteration(e3bm, args, episode, device)}
    median = time_alternately(steps, args.repeats)
    print(f"E3BM / MTL meta-iteration: {median['E3BM'] / median['MTL']:.2f}x ({setting_of(args, device)})")


if __name__ == "__main__":
    main()
