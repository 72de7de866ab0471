"""benchmarks/study_table.py reads runs' metrics and results into rows, and averages seeds per configuration."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study_table.py"
spec = importlib.util.spec_from_file_location("study_table", SCRIPT)
study_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study_table)


def _fake_run(run_dir: Path, val: list[float], gain: float, pretrain_times: tuple[float, ...] = (100.0,)) -> Path:
    """A finished run; `pretrain_times` are its pre-training records (one for --init-from, one per logged epoch from scratch)."""
    run_dir.mkdir(parents=True)
    records = [{"phase": "pretrain", "step": 2 * i, "time": time} for i, time in enumerate(pretrain_times)]
    records += [{"phase": "meta_train_val", "step": 100 * i, "time": 110.0 + 50 * i, "accuracy": a, "ci95": 1.0} for i, a in enumerate(val)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = [{"way": 5, "shot": shot, "protocol": "standard", "checkpoint": "best", "accuracy": 40.0 + gain,
                "ci95": 0.4, "start_accuracy": 40.0, "gain": gain, "gain_ci95": 0.2} for shot in (1, 5)]
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_rows_pick_the_earliest_best_validation_and_average_seeds(tmp_path: Path) -> None:
    runs = [study_table.read_run(_fake_run(tmp_path / "cosine", [35.0, 36.0, 36.0], gain=0.6)),
            study_table.read_run(_fake_run(tmp_path / "cosine-seed1", [35.0, 34.0, 35.5], gain=0.2))]
    assert runs[0]["best_step"] == 100 and runs[0]["val_best"] == 36.0  # the tie at 200 goes to the earlier iteration
    assert runs[0]["seconds"] == 110.0 and runs[1]["config"] == "cosine"
    rows = study_table.table(runs)
    assert rows[0][:4] == ["run", "val start", "val best (it)", "test 1-shot"]
    assert rows[1][2] == "36.00 (100)" and rows[1][4] == "+0.60 ± 0.20"
    mean = rows[-1]
    assert mean[0] == "**cosine** (mean of 2)" and mean[2] == "35.75" and mean[4] == "+0.40"


def test_the_time_of_a_run_pre_trained_from_scratch_counts_meta_training_only(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "scratch", [35.0, 36.0], gain=0.1, pretrain_times=(10.0, 50.0))  # two logged epochs
    assert study_table.read_run(run_dir)["seconds"] == 160.0 - 50.0  # from the last epoch to the last validation


def test_seeds_are_averaged_within_one_study_folder_only(tmp_path: Path) -> None:
    runs = [study_table.read_run(_fake_run(tmp_path / study / name, [35.0, 36.0], gain=0.5))
            for study, name in (("a", "cosine"), ("a", "cosine-seed1"), ("b", "cosine"))]
    means = [row[0] for row in study_table.table(runs) if row[0].startswith("**")]
    assert means == ["**cosine** (mean of 2)"]


def test_further_validated_shots_get_their_own_start_and_best_columns(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "cosine", [35.0, 36.0, 35.5], gain=0.5)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record, five in zip(records[1:], (50.0, 49.0, 50.0)):
        record.update(accuracy_5shot=five, ci95_5shot=0.5)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = study_table.read_run(run_dir)
    assert run["val_by_shot"] == {5: {"start": 50.0, "best": 50.0, "step": 0}}  # the tie keeps iteration 0, as the run does
    rows = study_table.table([run])
    assert rows[0][3:5] == ["val 5-shot start", "val 5-shot best (it)"] and rows[1][3:5] == ["50.00", "50.00 (0)"]


def test_a_later_rescoring_with_the_test_time_flip_does_not_replace_the_runs_own_scores(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "cosine", [35.0, 36.0], gain=0.5)
    results = json.loads((run_dir / "results.json").read_text())
    rescored = [{**r, "accuracy": 99.0, "gain": 9.0, "flip_average": True} for r in results]  # `mtl meta-test --resume RUN views.flip=true`
    (run_dir / "results.json").write_text(json.dumps(results + rescored))
    assert {shot: r["gain"] for shot, r in study_table.read_run(run_dir)["test"].items()} == {1: 0.5, 5: 0.5}
    (run_dir / "config.yaml").write_text("model:\n  flip_average: true\n")  # a run that scores itself with the flip
    assert {shot: r["gain"] for shot, r in study_table.read_run(run_dir)["test"].items()} == {1: 9.0, 5: 9.0}


def test_a_later_rescoring_with_test_time_shifts_does_not_replace_the_runs_own_scores(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "cosine", [35.0, 36.0], gain=0.5)
    results = json.loads((run_dir / "results.json").read_text())
    rescored = [{**r, "gain": 7.0, "shift_views": 2} for r in results]  # `mtl meta-test --resume RUN views.shift_pixels=2`
    (run_dir / "results.json").write_text(json.dumps(results + rescored))
    assert {shot: r["gain"] for shot, r in study_table.read_run(run_dir)["test"].items()} == {1: 0.5, 5: 0.5}
    (run_dir / "config.yaml").write_text("model:\n  shift_views: 2\n")  # a run that scores itself with the shifts
    assert {shot: r["gain"] for shot, r in study_table.read_run(run_dir)["test"].items()} == {1: 7.0, 5: 7.0}
