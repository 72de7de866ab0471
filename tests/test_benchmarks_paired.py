"""benchmarks/paired.py pairs two runs' per-episode accuracies, models and pre-trained starts, setting by setting."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from metatransfer.phases.meta_test import write_results

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired.py"
spec = importlib.util.spec_from_file_location("paired", SCRIPT)
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def _fake_run(run_dir: Path, model: list[float], start: list[float], flip: bool, seed: int = 1, split: str = "test", shift_views: int = 0) -> Path:
    """A run's results.json and episode files (per-episode accuracies as fractions), written by the same function meta-test uses."""
    result = {"dataset": "fc100", "split": split, "way": 5, "shot": 1, "query": 15, "protocol": "standard", "seed": seed,
              "checkpoint": "best", "flip_average": flip, "shift_views": shift_views, "accuracy": 100 * sum(model) / len(model), "start_accuracy": 100 * sum(start) / len(start),
              "per_episode": model, "start_per_episode": start}
    write_results([result], run_dir / "results.json", run_dir / "meta_test")
    return run_dir


def test_models_and_starts_are_paired_per_episode_and_flip_rows_are_found(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", model=[0.5, 0.6, 0.7], start=[0.4, 0.4, 0.4], flip=True)
    b = _fake_run(tmp_path / "b", model=[0.48, 0.58, 0.68], start=[0.4, 0.41, 0.42], flip=True)
    lines = paired.compare(paired._settings(a, None), paired._settings(b, None))
    assert len(lines) == 2 and "flip" in lines[0]
    assert lines[0].endswith("models: A 60.00 - B 58.00 = +2.00 +- 0.00 (paired)")  # every episode differs by exactly 2
    assert "starts: A 40.00 - B 41.00 = -1.00 +-" in lines[1] and not lines[1].endswith("+- 0.00 (paired)")


def test_other_episodes_or_other_scoring_are_not_paired(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", model=[0.5, 0.6], start=[0.4, 0.4], flip=True)
    other_seed = _fake_run(tmp_path / "b", model=[0.5, 0.6], start=[0.4, 0.4], flip=True, seed=2)
    no_flip = _fake_run(tmp_path / "c", model=[0.5, 0.6], start=[0.4, 0.4], flip=False)
    assert paired.compare(paired._settings(a, None), paired._settings(other_seed, None))[0].endswith("skipped")
    assert paired.compare(paired._settings(a, None), paired._settings(no_flip, None)) == []


def test_a_split_scored_later_keeps_its_own_episodes_and_pairs_only_with_that_split(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", model=[0.5, 0.6], start=[0.4, 0.4], flip=False)
    _fake_run(tmp_path / "a", model=[0.9, 0.9], start=[0.8, 0.8], flip=False, split="val")  # `mtl meta-test --resume a meta_test.split=val`
    b = _fake_run(tmp_path / "b", model=[0.5, 0.5], start=[0.4, 0.4], flip=False)
    assert sorted(p.name for p in (a / "meta_test").iterdir()) == ["episodes-5way-1shot-standard-val.json", "episodes-5way-1shot-standard.json"]
    lines = paired.compare(paired._settings(a, None), paired._settings(b, None))
    assert len(lines) == 2 and all(" test " in line for line in lines) and "A 55.00 - B 50.00 = +5.00" in lines[0]


def test_one_run_scored_with_and_without_test_time_shifts_pairs_with_itself(tmp_path: Path) -> None:
    """`mtl meta-test --resume RUN views.shift_pixels=2` keeps the unshifted rows: --shift-a 2 --shift-b 0 pairs them."""
    run = _fake_run(tmp_path / "a", model=[0.5, 0.6], start=[0.4, 0.4], flip=True)
    _fake_run(tmp_path / "a", model=[0.53, 0.63], start=[0.42, 0.42], flip=True, shift_views=2)
    assert sorted(p.name for p in (run / "meta_test").iterdir()) == ["episodes-5way-1shot-standard-flip-shift2.json",
                                                                     "episodes-5way-1shot-standard-flip.json"]
    assert paired.compare(paired._settings(run, None), paired._settings(run, None))[0].endswith("= +0.00 +- 0.00 (paired)")
    lines = paired.compare(paired._settings(run, None, 2), paired._settings(run, None, 0))
    assert len(lines) == 2 and "A shift 2, B shift 0" in lines[0]
    assert lines[0].endswith("models: A 58.00 - B 55.00 = +3.00 +- 0.00 (paired)")  # every episode differs by exactly 3
    assert "starts: A 42.00 - B 40.00 = +2.00 +- 0.00" in lines[1]


def test_one_source_prepared_at_two_sizes_pairs_only_when_its_manifests_list_the_same_images(tmp_path: Path) -> None:
    """glyphs (32 px) against glyphs-84: the same classes and counts give the same seeded episodes; other classes do not."""
    a = _fake_run(tmp_path / "a", model=[0.5, 0.6], start=[0.4, 0.4], flip=False)
    b = _fake_run(tmp_path / "b", model=[0.4, 0.5], start=[0.4, 0.4], flip=False)
    results = json.loads((b / "results.json").read_text())
    (b / "results.json").write_text(json.dumps([{**result, "dataset": "fc100-84"} for result in results]))
    splits = {"test": {"classes": ["apple", "bee"], "num_images": 4, "images_per_class": [2, 2]}}
    for name, test_classes in (("fc100", ["apple", "bee"]), ("fc100-84", ["apple", "bee"]), ("other", ["apple", "cat"])):
        (tmp_path / "data" / name).mkdir(parents=True)
        manifest = {"splits": {"test": {**splits["test"], "classes": test_classes}}}
        (tmp_path / "data" / name / "manifest.json").write_text(json.dumps(manifest))

    assert paired.compare(paired._settings(a, None), paired._settings(b, None))[0].endswith("skipped")  # names differ, nothing checked
    assert paired.same_splits(tmp_path / "data", "fc100", "fc100-84") and not paired.same_splits(tmp_path / "data", "fc100", "other")
    lines = paired.compare(paired._settings(a, None), paired._settings(b, None), tmp_path / "data")
    assert lines[0].startswith("fc100 / fc100-84 test") and lines[0].endswith("A 55.00 - B 45.00 = +10.00 +- 0.00 (paired)")


def test_a_run_not_yet_scored_is_named_with_the_command_that_scores_it(tmp_path: Path) -> None:
    (tmp_path / "unscored").mkdir()
    with pytest.raises(SystemExit, match=r"results-glyphs.json does not exist: score .*unscored first \(mtl meta-test --resume .* --dataset glyphs\)"):
        paired._settings(tmp_path / "unscored", "glyphs")
