"""The `mtl` command: help, listings, config printing and error exits.

Runs of the phases through the CLI (`mtl run`, `mtl meta-test`, resuming, refusing another config)
are in tests/phases/test_phases.py, next to the small datasets they need. Here: one process per run
directory (a second `mtl run` on it exits 2), and a run logged to a file (no progress bars).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from metatransfer.cli import build_parser, main
from metatransfer.config import list_presets
from metatransfer.models.backbones import list_backbones


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every (nested) subcommand path of the parser, e.g. ('data', 'prepare')."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths.extend(_subcommands(sub, prefix + (name,)))
    return paths


SUBCOMMANDS = _subcommands(build_parser())


def test_the_expected_subcommands_exist():
    for path in [("run",), ("pretrain",), ("meta-train",), ("meta-test",), ("presets",), ("backbones",),
                 ("config",), ("data",), ("data", "prepare"), ("data", "info")]:
        assert path in SUBCOMMANDS


@pytest.mark.parametrize("path", [()] + SUBCOMMANDS, ids=lambda p: " ".join(p) or "mtl")
def test_help_of_every_subcommand_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mtl" in capsys.readouterr().out


def test_presets_lists_the_shipped_presets(capsys):
    assert main(["presets"]) == 0
    assert capsys.readouterr().out.split() == list_presets()


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == list(list_backbones())
    assert {"conv4", "resnet12"} <= set(listed)


def test_config_prints_the_resolved_config_with_overrides(capsys):
    assert main(["config", "--preset", "smoke", "meta_train.iterations=3", "meta_train.lr_ss=1e-3"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["meta_train"]["iterations"] == 3
    assert config["meta_train"]["lr_ss"] == pytest.approx(1e-3)
    assert config["model"]["backbone"] == "conv4"  # from the preset


def test_config_data_root_option(capsys, tmp_path):
    assert main(["config", "--preset", "smoke", "--data-root", str(tmp_path)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["root"] == str(tmp_path)


def test_overrides_may_come_before_and_after_options_and_apply_in_the_order_typed(capsys, tmp_path):
    argv = ["config", "seed=3", "--preset", "smoke", "meta_train.iterations=3", "--data-root", str(tmp_path), "meta_train.iterations=5"]
    assert main(argv) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert (config["seed"], config["meta_train"]["iterations"], config["data"]["root"]) == (3, 5, str(tmp_path))


@pytest.mark.parametrize("argv", [["config", "--preset", "smoke", "--no-such-option"], ["presets", "seed=3"], ["config", "seed=1", "--preset", "smoke", "seed"]])
def test_words_that_are_neither_options_nor_overrides_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_bad_preset_name_exits_2_with_a_message(capsys, tmp_path):
    assert main(["config", "--preset", "no-such-preset"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mtl: error:") and "no-such-preset" in error and "smoke" in error
    assert main(["run", "--preset", "no-such-preset", "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # nothing written before the config is valid


def test_bad_override_exits_2_naming_the_key(capsys):
    assert main(["config", "--preset", "smoke", "meta_train.iteration=3"]) == 2
    assert "meta_train.iteration" in capsys.readouterr().err
    assert main(["config", "model.bn_mode=xyz"]) == 2
    assert "model.bn_mode" in capsys.readouterr().err


def test_missing_dataset_exits_2_saying_how_to_prepare(capsys, tmp_path):
    args = ["pretrain", "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "mtl data prepare" in capsys.readouterr().err


def test_meta_test_without_checkpoints_exits_2(capsys, tmp_path, fake_dataset):
    root, name = fake_dataset
    args = ["meta-test", "--preset", "smoke", "--data-root", str(root), "--out", str(tmp_path / "run"), f"data.name={name}"]
    assert main(args) == 2
    assert "mtl pretrain" in capsys.readouterr().err


def test_resume_with_overrides_is_refused(capsys, tmp_path):
    assert main(["meta-test", "--out", str(tmp_path), "--resume", "meta_train.iterations=3"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_of_a_folder_without_config_exits_2(capsys, tmp_path):
    assert main(["meta-test", "--out", str(tmp_path), "--resume"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--preset", "smoke"])  # no --out
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_python_dash_m_metatransfer_help():
    result = subprocess.run([sys.executable, "-m", "metatransfer", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: mtl" in result.stdout and "meta-train" in result.stdout


@pytest.fixture
def fake_dataset(tmp_path):
    """A minimal valid cache: 5 classes x 20 images of 8x8 per split."""
    import numpy as np

    from metatransfer.data.cache import SPLITS, write_cache

    labels = np.repeat(np.arange(5), 20)
    images = np.zeros((100, 8, 8, 3), dtype=np.uint8)
    names = [f"c{i}" for i in range(5)]
    write_cache(tmp_path / "data", "fake", {s: (images, labels, names) for s in SPLITS},
                source_path=tmp_path, source_sha256=None, protocol="test", options={})
    return tmp_path / "data", "fake"


def _mtl_run(data, out, **popen) -> subprocess.Popen:
    """A real `mtl run --preset smoke` process on the small FC100 cache."""
    root, name = data
    command = [sys.executable, "-m", "metatransfer", "run", "--preset", "smoke", "--data-root", str(root), "--out", str(out),
               f"data.name={name}", "device=cpu"]
    return subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, **popen)


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_directory_the_second_exits_2_naming_the_first(fc100_small, tmp_path):
    out = tmp_path / "run"
    processes = [_mtl_run(fc100_small, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    codes = [process.returncode for process in processes]
    assert sorted(codes) == [0, 2], errors
    first, second = (processes[0], errors[1]) if codes[0] == 0 else (processes[1], errors[0])
    refusal = next(line for line in second.splitlines() if line.startswith("mtl: error:"))
    assert str(out) in refusal and f"pid {first.pid} " in refusal and "another --out" in refusal
    steps = [(record["phase"], record["step"]) for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and ("meta_train_val", 6) in steps  # each step logged once, by the first
    assert (out / "results.json").is_file() and not (out / ".lock").exists()


@pytest.mark.slow
def test_a_run_logged_to_a_file_has_no_progress_bars_and_a_line_per_epoch_and_validation(fc100_small, tmp_path):
    log = tmp_path / "run.log"
    with open(log, "w") as output:  # as `nohup mtl run ... > run.log 2>&1`
        assert _mtl_run(fc100_small, tmp_path / "run", stdout=output, stderr=subprocess.STDOUT).wait(timeout=300) == 0
    raw = log.read_bytes()
    assert b"\r" not in raw  # no tqdm redraws
    text = raw.decode()
    assert "pre-train epoch 1/1: loss" in text
    validations = re.findall(r"^meta-train (\d+)/6: (?:loss [\d.]+, task acc [\d.]+%, )?val [\d.]+ \+- [\d.]+% \(best [\d.]+%\)$", text, re.M)
    assert validations == ["0", "3", "6"], text
    assert re.search(r"^meta-train 6/6: loss [\d.]+, task acc [\d.]+%, val ", text, re.M), text


@pytest.mark.parametrize("command", [["run"], ["meta-test"], ["ablate", "--report-only"]])
def test_a_command_on_a_run_dir_in_use_exits_2_and_writes_nothing(command, capsys, tmp_path):
    from metatransfer.run import lock_run_dir

    out = tmp_path / "run"
    with lock_run_dir(out):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        assert main([*command, "--preset", "smoke", "--out", str(out)]) == 2
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no config.yaml, no metrics
    error = capsys.readouterr().err
    assert error.startswith("mtl: error:") and f"pid {os.getpid()} " in error and "in use" in error
