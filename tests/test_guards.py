"""Guarded failures: a NaN loss stops the run and keeps the last good checkpoint; a failed
checkpoint write (disk full, no permission, a kill between the two renames) never leaves a corrupt
pair; a checkpoint of another backbone, class count or format is refused with what differs; and
nothing the package reads back is ever unpickled.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path

import pytest
import torch

import metatransfer
import metatransfer.run as run_module
from metatransfer.cli import main
from metatransfer.config import load_config
from metatransfer.phases import meta_test, meta_train, pretrain
from metatransfer.run import load_checkpoint, save_checkpoint

PRETRAIN = ["amp=false", "pretrain.batch_size=32", "checkpoint_every=2"]  # 15 steps, checkpoints at 2, 4, ...


def _args(data: tuple[Path, str], out: Path, *overrides: str) -> list[str]:
    root, name = data
    return ["--preset", "smoke", "--data-root", str(root), "--out", str(out), f"data.name={name}", *PRETRAIN, *overrides]


def _config(data: tuple[Path, str], *overrides: str):
    root, name = data
    return load_config("smoke", [f"data.root={root}", f"data.name={name}", *PRETRAIN, *overrides])


def _tensors() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6.0).view(2, 3), "bias": torch.ones(2)}


def _no_temp_files(folder: Path) -> bool:
    return not [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# NaN and infinite losses ---------------------------------------------------------------------------

def _augment_calls(monkeypatch, at_call: int, action) -> None:
    """Make pre-training's `at_call`-th augmentation (0-based step) raise or return `action(x)`."""
    calls = {"n": 0}
    augment = pretrain.augment_batch

    def patched(x, **kwargs):
        calls["n"] += 1
        x = augment(x, **kwargs)
        return action(x) if calls["n"] == at_call + 1 else x

    monkeypatch.setattr(pretrain, "augment_batch", patched)


def _interrupt(x):
    raise KeyboardInterrupt


def test_nan_loss_stops_pretrain_with_a_message_and_keeps_the_pre_nan_checkpoint(fc100_small, tmp_path, monkeypatch, capsys):
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    _augment_calls(monkeypatch, 5, _interrupt)  # the reference: stopped cleanly before step 5
    assert main(["pretrain", *_args(fc100_small, clean)]) == 130
    _augment_calls(monkeypatch, 5, lambda x: x * float("nan"))  # step 5 sees NaN images
    assert main(["pretrain", *_args(fc100_small, poisoned)]) == 2
    error = capsys.readouterr().err
    assert re.search(r"mtl: error: pre-train loss became nan at epoch 0, step 5; .*last holds the last good state", error), error
    good, meta = load_checkpoint(poisoned / "pretrain" / "last")
    reference, reference_meta = load_checkpoint(clean / "pretrain" / "last")
    assert meta["step"] == reference_meta["step"] == 4 and not meta["complete"]
    assert all(torch.isfinite(t).all() for t in good.values() if t.is_floating_point())
    assert set(good) == set(reference) and all(good[k].equal(reference[k]) for k in good)
    assert _no_temp_files(poisoned)


def test_exploding_meta_train_stops_with_a_message_and_a_loadable_checkpoint(fc100_small, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert main(["pretrain", *_args(fc100_small, run_dir, "checkpoint_every=1")]) == 0
    real_loss, calls = meta_train.meta_batch_loss, []

    def loss_that_explodes_at_the_fourth_meta_batch(*args, **kwargs):
        loss, accuracy, class_loss = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 4 else loss), accuracy, class_loss

    monkeypatch.setattr(meta_train, "meta_batch_loss", loss_that_explodes_at_the_fourth_meta_batch)
    assert main(["meta-train", *_args(fc100_small, run_dir, "checkpoint_every=1")]) == 2
    error = capsys.readouterr().err
    assert re.search(r"mtl: error: meta-train loss became (nan|inf) at iteration \d+; .*last holds the last good state", error), error
    iteration = int(re.search(r"at iteration (\d+)", error).group(1))
    tensors, meta = load_checkpoint(run_dir / "meta_train" / "last")
    assert meta["iteration"] == iteration and not meta["complete"]  # saved after the last finite step
    assert torch.isfinite(tensors["head.weight"]).all()


# failed checkpoint writes --------------------------------------------------------------------------

def _fail(error: OSError):
    def raise_error(*args, **kwargs):
        raise error

    return raise_error


@pytest.mark.parametrize(
    "target, error",
    [
        ("save_file", OSError(errno.ENOSPC, "No space left on device")),  # the tensors do not fit
        ("_write_synced", OSError(errno.ENOSPC, "No space left on device")),  # the JSON does not fit
        ("os.replace", PermissionError(errno.EACCES, "Permission denied")),  # the folder refuses the rename
    ],
)
def test_failed_save_keeps_the_previous_checkpoint_loadable(tmp_path, monkeypatch, target, error):
    stem = tmp_path / "last"
    save_checkpoint(stem, _tensors(), {"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if target == "os.replace":
        monkeypatch.setattr(run_module.os, "replace", _fail(error))
    else:
        monkeypatch.setattr(run_module, target, _fail(error))
    with pytest.raises(OSError):
        save_checkpoint(stem, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, {"step": 2})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # untouched, no temp file
    tensors, meta = load_checkpoint(stem)
    assert meta["step"] == 1 and tensors["weight"].equal(_tensors()["weight"])


def test_a_kill_between_the_two_renames_is_completed_on_load(tmp_path, monkeypatch):
    """The tensors were renamed, the JSON was not: the pending JSON pairs with them and is adopted."""
    stem = tmp_path / "last"
    save_checkpoint(stem, _tensors(), {"step": 1})
    replace = os.replace
    calls = {"n": 0}

    def second_rename_fails(source, target):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "Input/output error")
        replace(source, target)

    monkeypatch.setattr(run_module.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        save_checkpoint(stem, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, {"step": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(stem)
    assert meta["step"] == 2 and tensors["weight"].equal(torch.zeros(2, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_folder_keeps_the_previous_checkpoint(tmp_path):
    stem = tmp_path / "ckpt" / "last"
    save_checkpoint(stem, _tensors(), {"step": 1})
    stem.parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            save_checkpoint(stem, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, {"step": 2})
    finally:
        stem.parent.chmod(0o755)
    assert load_checkpoint(stem)[1]["step"] == 1


def test_disk_full_during_pretrain_exits_2_with_a_message_and_keeps_the_last_checkpoint(fc100_small, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    calls = {"n": 0}
    save_file = run_module.save_file

    def full_on_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_file(*args, **kwargs)

    monkeypatch.setattr(run_module, "save_file", full_on_second_save)
    assert main(["pretrain", *_args(fc100_small, run_dir)]) == 2
    assert "mtl: error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert load_checkpoint(run_dir / "pretrain" / "last")[1]["step"] == 2
    assert _no_temp_files(run_dir)


# checkpoints of another model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(fc100_small, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("guards") / "run"
    assert main(["run", *_args(fc100_small, run_dir, "meta_test.episodes=5")]) == 0
    return run_dir


def _edit_json(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "phase, overrides, message",
    [
        (pretrain, ["model.width=0.5"], "width=0.25, but this run expects width=0.5"),
        (pretrain, ["model.backbone=resnet12"], "backbone='conv4', but this run expects backbone='resnet12'"),
        (meta_train, ["meta_train.n_way=4"], "n_way=5, but this run expects n_way=4"),
        (meta_train, ["model.adapt=ft"], "adapt='ss', but this run expects adapt='ft'"),
        (meta_test, ["model.backbone=resnet12"], "backbone='conv4', but this run expects backbone='resnet12'"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused_saying_what_differs(trained, fc100_small, phase, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        phase.run(_config(fc100_small, "meta_test.episodes=5", *overrides), trained, log=lambda m: None)


def test_a_checkpoint_with_another_number_of_classes_is_refused(trained, fc100_small, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _edit_json(run_dir / "pretrain" / "last.json", num_classes=64)  # as if from miniImageNet's 64 classes
    with pytest.raises(ValueError, match="num_classes=64, but this run expects num_classes=60"):
        pretrain.run(_config(fc100_small, "meta_test.episodes=5"), run_dir, log=lambda m: None)


def test_a_checkpoint_of_another_format_version_is_refused(trained, fc100_small, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    _edit_json(run_dir / "meta_train" / "best.json", format_version=2)
    assert main(["meta-test", "--resume", str(run_dir)]) == 2
    assert "has format version 2; this metatransfer reads version 1" in capsys.readouterr().err


# nothing is unpickled ------------------------------------------------------------------------------

def test_the_package_never_unpickles_except_the_md5_checked_cifar_archive():
    package = Path(metatransfer.__file__).parent
    users = {}
    for path in package.rglob("*.py"):
        text = path.read_text()
        found = [word for word in ("pickle", "torch.load", "torch.save", "weights_only", "marshal", "shelve", "joblib") if word in text]
        if found:
            users[str(path.relative_to(package))] = found
    # run.py only says, in its docstring, that nothing is unpickled
    assert users.pop("run.py", ["pickle"]) == ["pickle"] and "unpickled" in (package / "run.py").read_text()
    assert users == {"data/_cifar.py": ["pickle"]}
    assert "md5" in (package / "data" / "_cifar.py").read_text()
