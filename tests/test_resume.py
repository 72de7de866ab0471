"""A phase killed with SIGKILL at some point resumes with `--resume` to exactly what an
uninterrupted run with the same seed gives: the same checkpoints (bit for bit), the same metrics
lines (each step once) and the same results.

Each test starts a real `mtl` process on small FC100, polls its `last.json` until a mid-phase
checkpoint exists, kills it, resumes it, and compares with a straight run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from metatransfer.cli import main

pytestmark = pytest.mark.slow

PRETRAIN = ["amp=false", "pretrain.epochs=4", "pretrain.batch_size=32", "checkpoint_every=2"]
META_TRAIN = ["amp=false", "meta_train.iterations=30", "meta_train.val_every=10", "checkpoint_every=4"]


def _args(data: tuple[Path, str], out: Path, overrides: list[str]) -> list[str]:
    root, name = data
    return ["--preset", "smoke", "--data-root", str(root), "--out", str(out), f"data.name={name}", *overrides]


def _mtl(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "metatransfer", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err


def _kill_mid_phase(process: subprocess.Popen, last_json: Path, counter: str) -> dict:
    """SIGKILL the process once `last_json` records progress; returns the checkpoint left behind."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.loads(last_json.read_text()).get(counter, 0) > 0:
                break
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, "the phase ended before it could be killed"
    saved = json.loads(last_json.read_text())
    assert not saved["complete"], "killed too late: the phase had finished"
    return saved


def _checkpoints(run_dir: Path, phase: str) -> dict[str, object]:
    found = {}
    for stem in ("last", "best"):
        found[f"{stem}.json"] = json.loads((run_dir / phase / f"{stem}.json").read_text())
        found[f"{stem}.safetensors"] = load_file(str(run_dir / phase / f"{stem}.safetensors"))
    return found


def _assert_same_checkpoints(a: Path, b: Path, phase: str) -> None:
    first, second = _checkpoints(a, phase), _checkpoints(b, phase)
    for name in first:
        if name.endswith(".json"):
            assert first[name] == second[name], name  # includes the tensors' sha256
        else:
            assert set(first[name]) == set(second[name])
            assert all(first[name][k].equal(second[name][k]) for k in first[name]), name


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


@pytest.mark.parametrize("extra", [[], ["pretrain.rotation_weight=1"]], ids=["plain", "rotation"])
def test_pretrain_killed_mid_epoch_resumes_to_the_same_checkpoints_and_metrics(fc100_small, tmp_path, extra):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_mtl("pretrain", *_args(fc100_small, straight, [*PRETRAIN, *extra])))
    saved = _kill_mid_phase(_mtl("pretrain", *_args(fc100_small, killed, [*PRETRAIN, *extra])), killed / "pretrain" / "last.json", "step")
    process = _mtl("pretrain", "--resume", "--out", str(killed))
    _finish(process)
    _assert_same_checkpoints(straight, killed, "pretrain")
    assert _metrics(killed) == _metrics(straight)
    assert saved["epoch"] < 4


@pytest.fixture(scope="module")
def pretrained(fc100_small, tmp_path_factory) -> Path:
    """A run directory holding the config and `pretrain/` that both meta-train runs start from."""
    run_dir = tmp_path_factory.mktemp("resume") / "pretrained"
    assert main(["pretrain", *_args(fc100_small, run_dir, META_TRAIN)]) == 0
    return run_dir


def test_meta_train_killed_mid_phase_resumes_to_the_same_model_and_results(pretrained, fc100_small, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    shutil.copytree(pretrained, straight)
    shutil.copytree(pretrained, killed)
    _finish(_mtl("run", *_args(fc100_small, straight, META_TRAIN)))  # pre-train complete: skipped
    saved = _kill_mid_phase(_mtl("meta-train", *_args(fc100_small, killed, META_TRAIN)), killed / "meta_train" / "last.json", "iteration")
    _finish(_mtl("run", "--resume", str(killed)))  # skips pre-train, finishes meta-train, meta-tests
    _assert_same_checkpoints(straight, killed, "meta_train")
    _assert_same_checkpoints(straight, killed, "pretrain")
    assert _metrics(killed) == _metrics(straight)
    for name in ("results.json", "meta_train/hard_classes.json", "meta_test/episodes-5way-1shot-standard.json"):
        assert (killed / name).read_text() == (straight / name).read_text(), name
    assert 0 < saved["iteration"] < 30


def test_a_best_saved_after_the_last_checkpoint_is_kept_on_resume(pretrained, fc100_small, tmp_path):
    """A kill between a validation that writes `meta_train/best` and the next save of `last` leaves
    `last` with an older best accuracy; resuming must not let a lower validation replace that best."""
    from metatransfer.phases import meta_train
    from metatransfer.run import read_run_config

    run_dir = tmp_path / "run"
    shutil.copytree(pretrained, run_dir)
    assert main(["meta-train", *_args(fc100_small, run_dir, META_TRAIN)]) == 0
    best = json.loads((run_dir / "meta_train" / "best.json").read_text())["val_accuracy"]
    last = run_dir / "meta_train" / "last.json"
    last.write_text(json.dumps({**json.loads(last.read_text()), "best_accuracy": best - 5.0}))  # as if saved before that best
    assert meta_train.run(read_run_config(run_dir), run_dir, log=lambda message: None)["best_val_accuracy"] == best
