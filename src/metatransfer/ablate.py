"""`mtl ablate`: the paper's ablation rows on one shared pre-trained backbone, as a table and plots.

Rows (Sun et al. 2019, Table 3 and Figure 4): the pre-trained backbone with an FC fine-tuned at test
time only; FT (meta-train all conv weights, first order) and SS (scale-shift), each without and with
the hard-task meta-batch. Each meta-trained row is trained separately per shot, as in the paper,
and for several seeds; every row is scored on the same seeded test episodes. The convergence plot
is validation accuracy against meta-iterations for SS with and without HT (mean and band over seeds).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metatransfer.config import Config, config_to_dict
from metatransfer.phases import meta_test, meta_train, pretrain
from metatransfer.run import checkpoint_exists, prepare_run_dir, read_run_config, write_json

__all__ = ["ROWS", "ROW_KEYS", "parse_rows", "write_records", "run_ablation", "collect_records", "summarise", "checkpoints_of", "write_table", "convergence_curves"]

# name -> (model.adapt, hard tasks on?, meta-trained?)
ROWS: dict[str, tuple[str, bool, bool]] = {
    "pre-trained, FC at test only": ("ss", False, False),
    "FT, no HT": ("ft", False, True),
    "FT + HT": ("ft", True, True),
    "SS, no HT": ("ss", False, True),
    "SS + HT": ("ss", True, True),
}


# Short names for `mtl ablate --rows`, in the table's order.
ROW_KEYS: dict[str, str] = dict(zip(("pretrained", "ft", "ft+ht", "ss", "ss+ht"), ROWS))


def parse_rows(text: str) -> list[str]:
    """'ss,ss+ht' -> the ROWS names, in the order given (the order they run in)."""
    keys = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [key for key in keys if key not in ROW_KEYS]
    if unknown or not keys:
        raise ValueError(f"Unknown ablation rows {unknown or text!r}; choose from {', '.join(ROW_KEYS)} (comma-separated).")
    return [ROW_KEYS[key] for key in dict.fromkeys(keys)]


def _row_config(base: Config, adapt: str, hard: bool, shot: int, seed: int) -> Config:
    config = copy.deepcopy(base)
    config.seed = seed
    ss = adapt == "ss"  # FT rows drop the settings that only act on scaling-shifting
    config.model = replace(base.model, adapt=adapt, ss_bn_affine=base.model.ss_bn_affine and ss)
    config.meta_train = replace(base.meta_train, n_shot=shot, first_order=base.meta_train.first_order or not ss,
                                val_shots=[],  # each row trains and tests one shot
                                hard_tasks=replace(base.meta_train.hard_tasks, enabled=hard))
    config.meta_test = replace(base.meta_test, n_shot=[shot])
    return config


def _slug(row: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in row.lower()).strip("-").replace("--", "-")


def run_ablation(
    base: Config, out: Path, *, shots: Sequence[int], seeds: Sequence[int], pretrained: Path | None = None,
    rows: Sequence[str] = tuple(ROWS), log=print,
) -> list[dict[str, Any]]:
    """Run (or resume) every row x shot x seed under `out` and return one record per run."""
    shared = out / "pretrained"
    start = base.meta_train.init_checkpoint
    # The untrained row's score depends on the seed only where theta starts random (kaiming, xavier).
    untrained_seeds = seeds[:1] if base.base_learner.init == "zeros" else seeds
    if pretrained is not None:
        if not checkpoint_exists(pretrained / "pretrain" / start):
            raise FileNotFoundError(f"{pretrained} has no pretrain/{start} checkpoint (meta_train.init_checkpoint); give a run "
                                    "directory that finished `mtl pretrain` with it, or set meta_train.init_checkpoint=best.")
        shared = pretrained
    else:
        prepare_run_dir(shared, base)
        pretrain.run(base, shared, log=log)
    records = []
    for row in rows:
        adapt, hard, trained = ROWS[row]
        for shot in shots:
            for seed in seeds if trained else untrained_seeds:
                config = _row_config(base, adapt, hard, shot, seed)
                run_dir = out / f"{_slug(row)}-{shot}shot-seed{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                for stem in dict.fromkeys([start, "best"]):  # best too: meta-training looks for it to tell a finished pre-training
                    for suffix in (".json", ".safetensors"):
                        target, source = run_dir / "pretrain" / f"{stem}{suffix}", shared / "pretrain" / f"{stem}{suffix}"
                        if source.exists() and not target.exists():
                            target.parent.mkdir(exist_ok=True)
                            shutil.copy2(source, target)
                prepare_run_dir(run_dir, config)
                log(f"ablation: {row}, {shot}-shot, seed {seed} -> {run_dir}")
                if trained:
                    meta_train.run(config, run_dir, log=log)
                # A meta-trained row is scored twice: with the checkpoint validation picked, and with
                # the last one, which shows what meta-training did even where validation kept iteration 0.
                for checkpoint in ("best", "last") if trained else ("best",):
                    config.meta_test = replace(config.meta_test, checkpoint=checkpoint)
                    result = meta_test.run(config, run_dir, log=log)[0]
                    records.append(_record(result, row, shot, seed, run_dir))
    write_records(base, out, records)
    return records


def write_records(config: Config, out: Path, records: Sequence[dict[str, Any]]) -> None:
    write_json(out / "ablation.json", {"config": config_to_dict(config), "records": list(records)})


def _record(result: dict[str, Any], row: str, shot: int, seed: int, run_dir: Path) -> dict[str, Any]:
    """One run's test result, labelled; `seed` is the run's training seed, `test_seed` the episodes'."""
    return {**result, "test_seed": result.get("seed"), "row": row, "shot": shot, "seed": seed, "run_dir": str(run_dir)}


def collect_records(out: Path) -> list[dict[str, Any]]:
    """Records of the runs under `out` that reached meta-test, for a table of an unfinished ablation."""
    by_slug = {_slug(row): row for row in ROWS}
    records = []
    for results_path in sorted(out.glob("*-*shot-seed*/results.json")):
        run_dir = results_path.parent
        slug, rest = run_dir.name.rsplit("-", 2)[0], run_dir.name.rsplit("-", 2)[1:]
        if slug not in by_slug:
            continue
        shot, seed = int(rest[0].removesuffix("shot")), int(rest[1].removeprefix("seed"))
        views = read_run_config(run_dir).views
        own = (views.flip, views.shift_pixels)  # as the run scored itself, not a later rescoring
        for result in json.loads(results_path.read_text()):
            if result["shot"] == shot and result["way"] == 5 and (result.get("flip_average", False), result.get("shift_views", 0)) == own:
                records.append(_record({"checkpoint": "best", **result}, by_slug[slug], shot, seed, run_dir))
    return records


def summarise(records: Sequence[dict[str, Any]], checkpoint: str = "best") -> dict[tuple[str, int], dict[str, float]]:
    """Per (row, shot): mean accuracy and CI over seeds (CI averaged), spread across seeds.

    `checkpoint` picks the meta-trained rows' model (best by validation, or last); the row without
    meta-training has one model, counted under both.
    """
    chosen = [r for r in records if r.get("checkpoint", "best") == checkpoint or not ROWS[r["row"]][2]]
    table: dict[tuple[str, int], dict[str, float]] = {}
    for key in {(r["row"], r["shot"]) for r in chosen}:
        group = [r for r in chosen if (r["row"], r["shot"]) == key]
        accuracies = np.array([r["accuracy"] for r in group])
        table[key] = {"accuracy": float(accuracies.mean()), "ci95": float(np.mean([r["ci95"] for r in group])),
                      "seed_std": float(accuracies.std(ddof=1)) if len(group) > 1 else 0.0, "seeds": len(group)}
        if all("gain" in r for r in group):  # paired over the same episodes against the pre-trained start
            table[key].update(gain=float(np.mean([r["gain"] for r in group])), gain_ci95=float(np.mean([r["gain_ci95"] for r in group])))
    return table


def checkpoints_of(records: Sequence[dict[str, Any]]) -> list[str]:
    """The checkpoints the records were scored with: ["best"], or ["best", "last"]."""
    return ["best"] + (["last"] if any(r.get("checkpoint") == "last" for r in records) else [])


def write_table(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> str:
    checkpoints = checkpoints_of(records)
    tables = {checkpoint: summarise(records, checkpoint) for checkpoint in checkpoints}
    shots = sorted({shot for _, shot in tables["best"]})
    columns = [(shot, checkpoint) for shot in shots for checkpoint in checkpoints]
    label = {"best": "best val", "last": "last"}
    episodes = records[0]["episodes"] if records else 0
    lines = [f"# {title}", "", f"Accuracy in % on {episodes} seeded test episodes per run (mean +- 95% CI; "
             "with several seeds: mean over seeds, mean CI, and the std across seeds in brackets)."]
    if any("gain" in entry for table in tables.values() for entry in table.values()):
        lines += ["'gain': the paired gain over the pre-trained start (identity scaling-shifting, untrained base-learner) on the "
                  "same episodes, mean of the per-episode differences +- its 95% CI (mean over seeds)."]
    if len(checkpoints) > 1:
        lines += ["'best val': the meta-train checkpoint with the best validation accuracy (iteration 0, "
                  "the pre-trained backbone, counts); 'last': the checkpoint after the final meta-iteration."]
    lines += ["", "| row | " + " | ".join(f"{shot}-shot" + (f", {label[c]}" if len(checkpoints) > 1 else "") for shot, c in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for row in ROWS:
        cells = []
        for shot, checkpoint in columns:
            entry = tables[checkpoint].get((row, shot))
            if entry is None:
                cells.append("-")
            else:
                spread = f" [{entry['seed_std']:.2f}, {entry['seeds']} seeds]" if entry["seeds"] > 1 else ""
                gain = f"; gain {entry['gain']:+.2f} +- {entry['gain_ci95']:.2f}" if "gain" in entry else ""
                cells.append(f"{entry['accuracy']:.2f} +- {entry['ci95']:.2f}{spread}{gain}")
        if any(c != "-" for c in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def convergence_curves(records: Sequence[dict[str, Any]], shot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """row -> (iterations, (seeds, points) validation accuracy) read from each run's metrics.jsonl."""
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for row in ("SS, no HT", "SS + HT", "FT, no HT", "FT + HT"):
        # One curve per run: a run scored with its best and its last checkpoint has two records.
        runs = list({r["run_dir"]: r for r in records if r["row"] == row and r["shot"] == shot}.values())
        series = []
        for r in runs:
            lines = (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            points = [json.loads(line) for line in lines]
            points = [(p["step"], p["accuracy"]) for p in points if p["phase"] == "meta_train_val"]
            series.append(points)
        if series:
            length = min(len(s) for s in series)
            steps = np.array([p[0] for p in series[0][:length]])
            curves[row] = (steps, np.array([[p[1] for p in s[:length]] for s in series]))
    return curves
