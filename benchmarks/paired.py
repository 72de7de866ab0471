"""Paired comparison of two runs scored on the same seeded test episodes.

Episodes depend only on `meta_test.seed`, the way, the shot and the dataset's labels, so two runs on
one prepared dataset (say, a transfer run and a from-scratch run on Omniglot) were tested on the
very same tasks. The difference of their per-episode accuracies has a far tighter interval than the
two separate intervals: this prints its mean and 95% CI per setting.

    python benchmarks/paired.py RUN_A RUN_B [--dataset NAME]   # A - B, for each setting both have
    python benchmarks/paired.py RUN RUN --shift-a 2 --shift-b 0   # one run scored with and without test-time shifts
    python benchmarks/paired.py RUN_32PX RUN_84PX --data-root DATA   # glyphs against glyphs-84: one source, two sizes

Two datasets prepared from one source at different image sizes (`--name glyphs --image-size 32` and
`--name glyphs-84 --image-size 84`) give the same episodes when their manifests list the same classes
and image counts in every split; `--data-root` checks that and pairs them (backbones of two resolutions).

Where both runs scored their pre-trained starts (every `mtl run` that meta-trains does), a second
line compares the starts: two pre-trainings, say with and without `pretrain.distill_from`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from metatransfer.evaluation import confidence_interval
from metatransfer.phases.meta_test import episodes_file_name


def _settings(run_dir: Path, dataset: str | None, shift_views: int | None = None) -> dict[tuple, tuple[dict, dict]]:
    """(split, way, shot, protocol, checkpoint, flip, shifts) -> (summary, per-episode accuracies file) of
    one run; with `shift_views`, only the rows scored with those test-time shifts, keyed as shifts None
    (so they pair with another run's rows of other shifts)."""
    results_path = run_dir / (f"results-{dataset}.json" if dataset else "results.json")
    episodes_dir = run_dir / "meta_test" / (dataset or "")
    if not results_path.is_file():
        raise SystemExit(f"{results_path} does not exist: score {run_dir} first (mtl meta-test --resume {run_dir}"
                         + (f" --dataset {dataset})" if dataset else ")"))
    found = {}
    for result in json.loads(results_path.read_text()):
        shifts = result.get("shift_views", 0)
        if shift_views is not None and shifts != shift_views:
            continue
        key = (result["split"], result["way"], result["shot"], result["protocol"], result.get("checkpoint", "best"), bool(result.get("flip_average")),
               None if shift_views is not None else shifts)
        found[key] = (result, json.loads((episodes_dir / episodes_file_name(result)).read_text()))
    return found


def same_splits(data_root: Path, name_a: str, name_b: str) -> bool:
    """Whether two prepared datasets list the same classes and image counts in every split (one source
    prepared at two sizes), so that seeded episodes pick the same images from both."""
    manifests = [json.loads((data_root / name / "manifest.json").read_text()) for name in (name_a, name_b)]
    return manifests[0]["splits"] == manifests[1]["splits"]


def compare(a: dict[tuple, tuple[dict, dict]], b: dict[tuple, tuple[dict, dict]], data_root: Path | None = None) -> list[str]:
    """One line per setting both runs have: their models, A - B paired; then their pre-trained starts,
    where both runs scored one (a run's start is its backbone before meta-training, so this line
    compares two pre-trainings). With `data_root`, two datasets with the same splits (`same_splits`) pair."""
    lines = []
    for key in sorted(set(a) & set(b)):
        (result_a, episodes_a), (result_b, episodes_b) = a[key], b[key]
        split, way, shot, protocol, checkpoint, flip, _ = key
        shifts = ", ".join(f"{run} shift {r.get('shift_views', 0)}" for run, r in (("A", result_a), ("B", result_b)))
        name_a, name_b = result_a["dataset"], result_b["dataset"]
        setting = (f"{name_a if name_a == name_b else f'{name_a} / {name_b}'} {split} {way}-way {shot}-shot ({protocol}, {checkpoint}{', flip' if flip else ''}, {shifts}, "
                   f"{len(episodes_a['per_episode_accuracy'])} episodes)")
        alike = name_a == name_b or (data_root is not None and same_splits(data_root, name_a, name_b))
        same = alike and (result_a["seed"], result_a["query"]) == (result_b["seed"], result_b["query"])
        if not same or len(episodes_a["per_episode_accuracy"]) != len(episodes_b["per_episode_accuracy"]):
            lines.append(f"{setting}: not the same episodes (dataset, seed, queries or count differ; --data-root pairs one source at two sizes); skipped")
            continue
        for what, field, summary in (("models", "per_episode_accuracy", "accuracy"), ("starts", "start_per_episode_accuracy", "start_accuracy")):
            if field in episodes_a and field in episodes_b:
                mean, ci95 = confidence_interval(np.asarray(episodes_a[field]) - np.asarray(episodes_b[field]))
                lines.append(f"{setting} {what}: A {result_a[summary]:.2f} - B {result_b[summary]:.2f} = {mean:+.2f} +- {ci95:.2f} (paired)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--dataset", help="compare their cross-domain results on this dataset (results-NAME.json)")
    parser.add_argument("--data-root", type=Path, help="pair runs on two datasets prepared from one source at other sizes, "
                        "when their manifests under this folder list the same classes and image counts")
    parser.add_argument("--shift-a", type=int, help="A's rows scored with these test-time shifts (views.shift_pixels) only")
    parser.add_argument("--shift-b", type=int, help="B's rows scored with these test-time shifts only")
    args = parser.parse_args()
    if (args.shift_a is None) != (args.shift_b is None):
        parser.error("give --shift-a and --shift-b together (each run's rows of those shifts pair with each other)")
    lines = compare(_settings(args.run_a, args.dataset, args.shift_a), _settings(args.run_b, args.dataset, args.shift_b), args.data_root)
    print("\n".join(lines) if lines else "No setting was scored alike in both runs (split, way, shot, protocol, checkpoint, flip "
          "and test-time shifts): rescore one with `mtl meta-test --resume`, or pair other shifts with --shift-a/--shift-b.")


if __name__ == "__main__":
    main()
