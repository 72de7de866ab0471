"""Episode sampling throughput: N-way K-shot Q-query tasks drawn from a prepared cache.

Times `TaskSampler.sample` + `gather_episode`, i.e. the index arrays and the uint8 image tensors
of each task, ready for one backbone forward, one task per call and in batches of T tasks.
The split's memory map is read once before timing, so figures are for a warm page cache.

    .venv/bin/python benchmarks/sampling.py --root /tmp/data --name fc100 --episodes 20000
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from metatransfer.data.cache import load_split
from metatransfer.data.episodes import TaskSampler, gather_episode


def time_sampling(sampler: TaskSampler, images: np.ndarray | None, n_tasks: int, episodes: int) -> tuple[float, int]:
    """Seconds to draw `episodes` tasks in calls of `n_tasks`; without images, indices only."""
    calls = max(1, episodes // n_tasks)
    start = time.perf_counter()
    for _ in range(calls):
        tasks = sampler.sample(n_tasks)
        if images is not None:
            gather_episode(images, tasks)
    return time.perf_counter() - start, calls * n_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/data", help="cache root written by `mtl data prepare`")
    parser.add_argument("--name", default="fc100", help="prepared dataset name")
    parser.add_argument("--split", default="train", help="train (meta-train draws images from it), val or test")
    parser.add_argument("--episodes", type=int, default=20000, help="episodes timed per setting")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--n-shot", type=int, default=5)
    parser.add_argument("--n-query", type=int, default=15)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 8, 32, 128], help="tasks per call (T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    split = load_split(args.root, args.name, args.split)
    np.asarray(split.images).sum()  # warm the page cache: time sampling, not the disk
    sampler = TaskSampler(split.labels, n_way=args.n_way, n_shot=args.n_shot, n_query=args.n_query, seed=args.seed)
    per_task = args.n_way * (args.n_shot + args.n_query)
    print(f"{args.name}/{args.split}: {len(split.labels)} images {split.images.shape[1:]}, "
          f"{args.n_way}-way {args.n_shot}-shot {args.n_query}-query ({per_task} images a task), "
          f"{args.episodes} episodes per setting, {torch.get_num_threads()} threads")
    load = os.getloadavg()[0]
    rows = []
    for n_tasks in args.tasks:
        time_sampling(sampler, split.images, n_tasks, min(args.episodes, 10 * n_tasks))  # warm-up
        indices_s, count = time_sampling(sampler, None, n_tasks, args.episodes)
        gather_s, count = time_sampling(sampler, split.images, n_tasks, args.episodes)
        rows.append({
            "tasks_per_call": n_tasks, "episodes": count,
            "indices_episodes_per_s": round(count / indices_s, 1),
            "episodes_per_s": round(count / gather_s, 1),
            "us_per_episode": round(1e6 * gather_s / count, 1),
        })
    print(f"{'T per call':>10} {'indices only ep/s':>18} {'indices+images ep/s':>20} {'us/episode':>11}")
    for r in rows:
        print(f"{r['tasks_per_call']:>10} {r['indices_episodes_per_s']:>18,.0f} {r['episodes_per_s']:>20,.0f} {r['us_per_episode']:>11.1f}")
    target = 1000
    worst = min(r["episodes_per_s"] for r in rows)
    print(f"target >= {target:,} episodes/s: {'met' if worst >= target else 'NOT met'} (slowest setting {worst:,.0f}/s); "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "load_average": [load, os.getloadavg()[0]], "results": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
