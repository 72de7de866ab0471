"""The table of a meta-training study: validation, test and the paired gain of each run, and per configuration.

A study is a set of `mtl run` directories, one per (configuration, seed), named CONFIG or
CONFIG-seedN. For each run this reads what the run wrote, nothing else:
- metrics.jsonl: validation at iteration 0 (the pre-trained start), the best validation and its
  iteration (also per further shot of meta_train.val_shots), and the meta-training time (from the
  start of meta-training to its last validation);
- results.json: per shot, test accuracy and the paired gain over the run's own start, with CIs.
The configuration rows average the seeds; choose on the validation columns, never on test.

    python benchmarks/study_table.py ~/mtl-runs/study-cfs/*/
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from metatransfer.config import migrate


def read_run(run_dir: Path) -> dict:
    """One run's validation curve summary and test results; raises if the run is unfinished."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in records if r["phase"] == "meta_train_val"]
    if not val:
        raise ValueError(f"{run_dir}/metrics.jsonl has no meta-train validation: is the run meta-trained?")
    best = max(val, key=lambda r: (r["accuracy"], -r["step"]))  # ties go to the earlier iteration, as the run keeps it
    # meta-training starts where pre-training ends: a run pre-trained from scratch logs an epoch per record
    start_time = max((r["time"] for r in records if r["phase"] == "pretrain"), default=val[0]["time"])
    results = json.loads((run_dir / "results.json").read_text())
    config_path = run_dir / "config.yaml"
    config = migrate(yaml.safe_load(config_path.read_text()), str(config_path)) if config_path.is_file() else {}
    flip_average = config.get("views", {}).get("flip", False)
    shift_views = config.get("views", {}).get("shift_pixels", 0)
    extra_shots = sorted({int(m.group(1)) for r in val for key in r if (m := re.fullmatch(r"accuracy_(\d+)shot", key))})
    val_by_shot = {}  # meta_train.val_shots: each further shot's start, best and the iteration its checkpoint kept
    for shot in extra_shots:
        key = f"accuracy_{shot}shot"
        kept = max(val, key=lambda r: (r[key], -r["step"]))
        val_by_shot[shot] = {"start": val[0][key], "best": kept[key], "step": kept["step"]}
    return {
        "name": run_dir.name,
        "config": re.sub(r"-seed\d+$", "", run_dir.name),
        "study": str(run_dir.resolve().parent),  # seeds are averaged within one study folder, never across two
        "val_start": val[0]["accuracy"],
        "val_best": best["accuracy"],
        "best_step": best["step"],
        "seconds": val[-1]["time"] - start_time,
        "val_by_shot": val_by_shot,
        "test": {r["shot"]: r for r in results if r.get("checkpoint", "best") == "best" and r["protocol"] == "standard"
                 and r.get("flip_average", False) == flip_average and r.get("shift_views", 0) == shift_views},  # as the run scores itself, not a later rescoring
    }


def _test_cells(test: dict, shots: list[int]) -> list[str]:
    cells = []
    for shot in shots:
        r = test.get(shot)
        cells += ["" , ""] if r is None else [f"{r['accuracy']:.2f} ± {r['ci95']:.2f}", f"{r['gain']:+.2f} ± {r['gain_ci95']:.2f}"]
    return cells


def table(runs: list[dict]) -> list[list[str]]:
    """Rows: every run, then one mean row per configuration with two or more seeds."""
    shots = sorted({shot for run in runs for shot in run["test"]})
    val_shots = sorted({shot for run in runs for shot in run.get("val_by_shot", {})})
    header = ["run", "val start", "val best (it)"]
    for shot in val_shots:
        header += [f"val {shot}-shot start", f"val {shot}-shot best (it)"]
    for shot in shots:
        header += [f"test {shot}-shot", f"gain {shot}-shot"]
    rows = [header + ["meta-train s"]]
    for run in runs:
        extra = []
        for shot in val_shots:
            v = run.get("val_by_shot", {}).get(shot)
            extra += ["", ""] if v is None else [f"{v['start']:.2f}", f"{v['best']:.2f} ({v['step']})"]
        rows.append([run["name"], f"{run['val_start']:.2f}", f"{run['val_best']:.2f} ({run['best_step']})", *extra,
                     *_test_cells(run["test"], shots), f"{run['seconds']:.0f}"])
    by_config = defaultdict(list)
    for run in runs:
        by_config[run["study"], run["config"]].append(run)
    for (_, config), group in by_config.items():
        if len(group) < 2:
            continue
        row = [f"**{config}** (mean of {len(group)})", f"{np.mean([r['val_start'] for r in group]):.2f}",
               f"{np.mean([r['val_best'] for r in group]):.2f}"]
        for shot in val_shots:
            have = [r["val_by_shot"][shot] for r in group if shot in r.get("val_by_shot", {})]
            row += [f"{np.mean([v['start'] for v in have]):.2f}", f"{np.mean([v['best'] for v in have]):.2f}"] if have else ["", ""]
        for shot in shots:
            have = [r["test"][shot] for r in group if shot in r["test"]]
            row += [f"{np.mean([r['accuracy'] for r in have]):.2f}", f"{np.mean([r['gain'] for r in have]):+.2f}"]
        rows.append(row + [f"{np.mean([r['seconds'] for r in group]):.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (unfinished ones are listed and skipped)")
    args = parser.parse_args()
    runs = []
    for run_dir in sorted(args.runs):
        try:
            runs.append(read_run(run_dir))
        except (FileNotFoundError, ValueError) as error:
            print(f"skipped {run_dir}: {error}")
    rows = table(runs)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
