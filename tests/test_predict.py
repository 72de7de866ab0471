"""`mtl predict`: folders in, CSV/JSON and a summary out; every bad input a clear `mtl: error:`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fixtures_run import CLASSES, N_QUERY, N_SHOT, fc100_folders, smoke_run  # noqa: F401  (fixtures)
from metatransfer.cli import main
from metatransfer.predict import read_queries, read_support


def _predict(model: Path, support: Path, *query: Path | str, extra: tuple[str, ...] = ()) -> int:
    return main(["predict", "--model", str(model), "--support", str(support), "--query", *map(str, query), "--device", "cpu", *extra])


def test_csv_has_one_row_per_query_and_the_summary_an_accuracy(smoke_run, fc100_folders, tmp_path, capsys):  # noqa: F811
    support, query = fc100_folders
    out = tmp_path / "preds.csv"
    assert _predict(smoke_run, support, query, extra=("--out", str(out))) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(CLASSES) * N_QUERY
    assert list(rows[0]) == ["query", "true", "predicted", "probability", "top1", "top1_probability",
                             "top2", "top2_probability", "top3", "top3_probability"]
    for row in rows:
        assert row["predicted"] == row["top1"] and row["true"] == Path(row["query"]).parent.name
        assert float(row["top1_probability"]) >= float(row["top2_probability"]) >= float(row["top3_probability"])
    printed = capsys.readouterr().out
    correct = sum(row["predicted"] == row["true"] for row in rows)
    assert f"({correct}/{len(rows)} queries in class folders" in printed
    assert f"support    {len(CLASSES)} classes, {len(CLASSES) * N_SHOT} images" in printed


def test_json_output_and_unlabelled_files(smoke_run, fc100_folders, tmp_path, capsys):  # noqa: F811
    support, query = fc100_folders
    files = sorted(query.glob("bee/*.png"))[:3]
    out = tmp_path / "preds.json"
    assert _predict(smoke_run, support, *files, extra=("--out", str(out), "--top-k", "9")) == 0
    result = json.loads(out.read_text())
    assert result["classes"] == sorted(CLASSES) and result["accuracy"] is None
    assert [row["query"] for row in result["predictions"]] == list(map(str, files))
    assert all(len(row["top_k"]) == len(CLASSES) for row in result["predictions"])  # top-k clipped to the classes
    assert "accuracy" not in capsys.readouterr().out


def test_without_out_every_prediction_is_printed(smoke_run, fc100_folders, capsys):  # noqa: F811
    support, query = fc100_folders
    assert _predict(smoke_run, support, query / "fox") == 0  # a folder of loose images: unlabelled
    lines = capsys.readouterr().out.splitlines()
    assert sum(".png" in line for line in lines) == N_QUERY


def test_folder_reading_skips_hidden_and_non_image_files(fc100_folders, tmp_path):  # noqa: F811
    support = tmp_path / "support"
    shutil.copytree(fc100_folders[0], support)
    (support / "bee" / ".DS_Store").write_text("x")
    (support / "bee" / "notes.txt").write_text("x")
    found = read_support(support)
    assert len(found.paths) == len(CLASSES) * N_SHOT and [p.name for p in found.skipped] == ["notes.txt"]
    assert found.labels == sorted(found.labels)
    queries = read_queries([fc100_folders[1]])
    assert set(queries.labels) == set(CLASSES) and len(queries.paths) == len(CLASSES) * N_QUERY


def _error(capsys) -> str:
    return capsys.readouterr().err


@pytest.fixture
def support_copy(fc100_folders, tmp_path) -> Path:  # noqa: F811
    target = tmp_path / "support"
    shutil.copytree(fc100_folders[0], target)
    return target


def test_empty_class_folder(smoke_run, support_copy, fc100_folders, capsys):  # noqa: F811
    (support_copy / "zebra").mkdir()
    assert _predict(smoke_run, support_copy, fc100_folders[1]) == 2
    assert "mtl: error: Support class folder" in _error(capsys)


def test_single_class(smoke_run, support_copy, fc100_folders, capsys):  # noqa: F811
    for name in CLASSES[1:]:
        shutil.rmtree(support_copy / name)
    assert _predict(smoke_run, support_copy, fc100_folders[1]) == 2
    assert "at least 2" in _error(capsys)


def test_file_that_is_not_an_image_is_named(smoke_run, support_copy, fc100_folders, tmp_path, capsys):  # noqa: F811
    (support_copy / "bee" / "broken.jpg").write_text("this is text")
    assert _predict(smoke_run, support_copy, fc100_folders[1]) == 2
    assert "broken.jpg" in _error(capsys)
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    assert _predict(smoke_run, fc100_folders[0], text) == 2
    assert "readme.txt" in _error(capsys)


def test_images_outside_class_folders(smoke_run, support_copy, fc100_folders, capsys):  # noqa: F811
    shutil.copy(next(support_copy.glob("bee/*.png")), support_copy / "loose.png")
    assert _predict(smoke_run, support_copy, fc100_folders[1]) == 2
    assert "outside class folders (loose.png)" in _error(capsys)


@pytest.mark.parametrize("problem, message", [
    ("missing", "model does not exist"),
    ("empty", "model is neither a run directory (no config.yaml) nor an exported model"),
    ("no-checkpoint", "model has no meta_train/best nor pretrain/best checkpoint; run `mtl pretrain`"),
])
def test_unreadable_model_directory(problem, message, smoke_run, fc100_folders, tmp_path, capsys):  # noqa: F811
    model = tmp_path / "model"
    if problem != "missing":
        model.mkdir()
    if problem == "no-checkpoint":
        shutil.copy(smoke_run / "config.yaml", model / "config.yaml")
    assert _predict(model, *fc100_folders) == 2
    error = _error(capsys)
    assert error.startswith("mtl: error: ") and message in error, error


def test_bad_out_suffix_and_top_k(smoke_run, fc100_folders, capsys):  # noqa: F811
    assert _predict(smoke_run, *fc100_folders, extra=("--out", "preds.txt")) == 2
    assert ".csv or a .json" in _error(capsys)
    assert _predict(smoke_run, *fc100_folders, extra=("--top-k", "0")) == 2
    assert "--top-k" in _error(capsys)


def test_missing_support_and_query(smoke_run, fc100_folders, tmp_path, capsys):  # noqa: F811
    assert _predict(smoke_run, tmp_path / "nope", fc100_folders[1]) == 2
    assert "Support folder" in _error(capsys)
    assert _predict(smoke_run, fc100_folders[0], tmp_path / "nope") == 2
    assert "Query" in _error(capsys)


def test_a_chosen_checkpoint_is_used_and_a_missing_one_is_named(smoke_run, fc100_folders, tmp_path, capsys):  # noqa: F811
    support, query = fc100_folders
    out = tmp_path / "preds.json"
    assert _predict(smoke_run, support, query / "fox", extra=("--out", str(out), "--checkpoint", "last")) == 0
    assert json.loads(out.read_text())["model"].endswith("(meta_train/last)")
    assert _predict(smoke_run, support, query / "fox", extra=("--checkpoint", "best-5shot")) == 2
    assert "no meta_train/best-5shot checkpoint; it has: best, last" in capsys.readouterr().err
