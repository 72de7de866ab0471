"""Paired comparison of two runs scored on the same seeded test episodes.

Episodes depend only on `meta_test.seed`, the way, the shot and the dataset's labels, so two runs on
one prepared dataset (say, a transfer run and a from-scratch run on Omniglot) were tested on the
very same tasks. The difference of their per-episode accuracies has a far tighter interval than the
two separate intervals: this prints its mean and 95% CI per setting.

    python benchmarks/paired.py RUN_A RUN_B [--dataset NAME]   # A - B, for each setting both have
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metatransfer.phases.meta_test import confidence_interval


def _settings(run_dir: Path, dataset: str | None) -> dict[tuple, tuple[dict, np.ndarray]]:
    """(way, shot, protocol, checkpoint) -> (summary, per-episode accuracies) of one run."""
    results_path = run_dir / (f"results-{dataset}.json" if dataset else "results.json")
    episodes_dir = run_dir / "meta_test" / (dataset or "")
    found = {}
    for result in json.loads(results_path.read_text()):
        checkpoint = result.get("checkpoint", "best")
        name = f"{result['way']}way-{result['shot']}shot-{result['protocol']}" + ("-last" if checkpoint == "last" else "")
        per_episode = json.loads((episodes_dir / f"episodes-{name}.json").read_text())["per_episode_accuracy"]
        found[(result["way"], result["shot"], result["protocol"], checkpoint)] = (result, np.asarray(per_episode))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--dataset", help="compare their cross-domain results on this dataset (results-NAME.json)")
    args = parser.parse_args()
    a, b = _settings(args.run_a, args.dataset), _settings(args.run_b, args.dataset)
    for key in sorted(set(a) & set(b)):
        (result_a, episodes_a), (result_b, episodes_b) = a[key], b[key]
        same = (result_a["dataset"], result_a["split"], result_a["seed"], result_a["query"]) == (
            result_b["dataset"], result_b["split"], result_b["seed"], result_b["query"])
        if not same or len(episodes_a) != len(episodes_b):
            print(f"{key}: not the same episodes (dataset, split, seed, queries or count differ); skipped")
            continue
        mean, ci95 = confidence_interval(episodes_a - episodes_b)
        way, shot, protocol, checkpoint = key
        print(f"{result_a['dataset']} {way}-way {shot}-shot ({protocol}, {checkpoint}, {len(episodes_a)} episodes): "
              f"A {result_a['accuracy']:.2f} - B {result_b['accuracy']:.2f} = {mean:+.2f} +- {ci95:.2f} (paired)")


if __name__ == "__main__":
    main()
