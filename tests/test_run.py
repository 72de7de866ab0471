"""Run directories: atomic safetensors + JSON checkpoints, optimizer round trip, config guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import metatransfer.run as run_module
from metatransfer.config import config_to_dict, load_config
from metatransfer.run import (
    CHECKPOINT_FORMAT,
    MetricsLog,
    autocast,
    checkpoint_exists,
    load_checkpoint,
    lock_run_dir,
    optimizer_from_tensors,
    optimizer_to_tensors,
    prepare_run_dir,
    read_run_config,
    restore_rng_state,
    rng_state_tensors,
    save_checkpoint,
    write_json,
)


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"backbone.weight": torch.randn(4, 3, generator=generator), "head.bias": torch.arange(5, dtype=torch.int64)}


def test_save_then_load_gives_the_same_tensors_and_values(tmp_path):
    stem = tmp_path / "phase" / "best"
    save_checkpoint(stem, _tensors(), {"backbone": "conv4", "epoch": 3, "nested": {"a": [1, 2]}})
    assert checkpoint_exists(stem)
    tensors, meta = load_checkpoint(stem, expect={"backbone": "conv4"})
    assert set(tensors) == {"backbone.weight", "head.bias"}
    for name, value in _tensors().items():
        assert torch.equal(tensors[name], value)
    assert meta["epoch"] == 3 and meta["nested"] == {"a": [1, 2]}
    assert meta["format_version"] == CHECKPOINT_FORMAT


def test_checkpoint_is_safetensors_and_plain_json_only(tmp_path):
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {"backbone": "conv4"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors"]
    meta = json.loads((tmp_path / "best.json").read_text())  # plain JSON, nothing to unpickle
    assert meta["backbone"] == "conv4"
    assert set(load_file(str(tmp_path / "best.safetensors"))) == {"backbone.weight", "head.bias"}


def test_no_temporary_files_are_left_behind(tmp_path):
    stem = tmp_path / "last"
    for step in range(3):  # overwriting an existing pair leaves no temp file either
        save_checkpoint(stem, _tensors(), {"step": step})
    write_json(tmp_path / "results.json", [1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors", "results.json"]
    assert load_checkpoint(stem)[1]["step"] == 2


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    stem = tmp_path / "last"
    save_checkpoint(stem, _tensors(), {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(stem, {"bad": "not a tensor"}, {"step": 2})  # type: ignore[dict-item]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.json", "last.safetensors"]
    assert load_checkpoint(stem)[1]["step"] == 1


def test_adam_state_round_trip_gives_an_identical_next_step(tmp_path):
    torch.manual_seed(0)

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
        optimizer = torch.optim.Adam(
            [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 3e-3}],
            betas=(0.8, 0.95),
        )
        return model, optimizer

    def step(model, optimizer, x):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()

    model, optimizer = make()
    inputs = [torch.randn(8, 6) for _ in range(4)]
    for x in inputs[:3]:
        step(model, optimizer, x)
    optim_tensors, optim_meta = optimizer_to_tensors(optimizer, "optimizer")
    model_tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "last", {**model_tensors, **optim_tensors}, {"optimizer": optim_meta})

    fresh_model, fresh_optimizer = make()
    tensors, meta = load_checkpoint(tmp_path / "last")
    fresh_model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    optimizer_from_tensors(fresh_optimizer, tensors, meta["optimizer"], "optimizer")

    step(model, optimizer, inputs[3])
    step(fresh_model, fresh_optimizer, inputs[3])
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    assert fresh_optimizer.param_groups[1]["lr"] == 3e-3
    assert tuple(fresh_optimizer.param_groups[0]["betas"]) == (0.8, 0.95)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


@pytest.mark.parametrize("device_name", DEVICES)
def test_random_streams_saved_in_a_checkpoint_draw_the_same_masks_after_restore(tmp_path, device_name):
    """Dropout draws from the device's own stream on CUDA: a resumed run needs it back, not only the CPU's."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    torch.rand(3)  # move the streams off their seeded start
    save_checkpoint(tmp_path / "last", rng_state_tensors(device), {})
    masks = [torch.nn.functional.dropout(torch.ones(64, device=device), 0.5) for _ in range(2)]
    torch.manual_seed(1)  # what a fresh process does before it resumes
    tensors, _ = load_checkpoint(tmp_path / "last")
    assert set(tensors) == ({"rng.torch", "rng.cuda"} if device.type == "cuda" else {"rng.torch"})
    restore_rng_state(tensors, device)
    assert all(torch.equal(m, torch.nn.functional.dropout(torch.ones(64, device=device), 0.5)) for m in masks)


def test_flipped_bytes_in_tensors_file_are_reported_as_corrupt(tmp_path):
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {})
    path = tmp_path / "best.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses, only the checksum tells
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(stem)


def test_truncated_json_is_reported_as_corrupt(tmp_path):
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {})
    path = tmp_path / "best.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(stem)


def test_another_format_version_is_refused_with_a_message(tmp_path):
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {})
    meta = json.loads((tmp_path / "best.json").read_text())
    meta["format_version"] = CHECKPOINT_FORMAT + 1
    (tmp_path / "best.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"format version {CHECKPOINT_FORMAT + 1}.*reads version {CHECKPOINT_FORMAT}"):
        load_checkpoint(stem)


def test_expect_mismatch_names_the_key_and_both_values(tmp_path):
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {"backbone": "conv4", "width": 0.25})
    with pytest.raises(ValueError) as error:
        load_checkpoint(stem, expect={"width": 0.25, "backbone": "resnet12"})
    message = str(error.value)
    assert "backbone" in message and "'conv4'" in message and "'resnet12'" in message


def test_missing_file_of_the_pair_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")
    stem = tmp_path / "best"
    save_checkpoint(stem, _tensors(), {})
    (tmp_path / "best.safetensors").unlink()
    assert not checkpoint_exists(stem)
    with pytest.raises(FileNotFoundError, match="best.safetensors"):
        load_checkpoint(stem)


def test_prepare_run_dir_writes_the_resolved_config(tmp_path):
    config = load_config("smoke", ["meta_train.iterations=3"])
    prepare_run_dir(tmp_path / "run", config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["meta_train"]["iterations"] == 3
    assert read_run_config(tmp_path / "run") == config
    prepare_run_dir(tmp_path / "run", config)  # the same config again is fine


def test_prepare_run_dir_refuses_a_different_config(tmp_path):
    prepare_run_dir(tmp_path, load_config("smoke"))
    with pytest.raises(ValueError, match="meta_train.iterations"):
        prepare_run_dir(tmp_path, load_config("smoke", ["meta_train.iterations=3"]))
    assert read_run_config(tmp_path) == load_config("smoke")  # untouched


def test_prepare_run_dir_reads_a_run_written_before_a_setting_existed(tmp_path):
    config = load_config("smoke")
    older = config_to_dict(config)
    del older["meta_test"]["checkpoint"]  # a key added after this run was made: it reads at its default
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(older))
    prepare_run_dir(tmp_path, config)
    with pytest.raises(ValueError, match="meta_test.checkpoint"):
        prepare_run_dir(tmp_path, load_config("smoke", ["meta_test.checkpoint=last"]))


def test_read_run_config_of_a_plain_folder_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_run_config(tmp_path)


def test_metrics_log_appends_json_lines(tmp_path):
    metrics = MetricsLog(tmp_path)
    metrics.log("meta_train", 1, loss=0.5)
    metrics.log("meta_train", 2, loss=0.25, note="x")
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"], r["loss"]) for r in records] == [("meta_train", 1, 0.5), ("meta_train", 2, 0.25)]


@pytest.mark.parametrize("native", [True, False])
def test_autocast_computes_in_bf16_only_where_the_device_has_native_bf16(monkeypatch, native):
    # On an AVX2-only CPU oneDNN emulates bf16 about 7x slower than fp32: amp must fall back to fp32.
    monkeypatch.setattr(run_module, "native_bf16", lambda device_type: native)
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    if native:
        with autocast(torch.device("cpu"), True):
            assert conv(x).dtype == torch.bfloat16
    else:
        with pytest.warns(UserWarning, match="no native bf16"), autocast(torch.device("cpu"), True):
            assert conv(x).dtype == torch.float32
    with autocast(torch.device("cpu"), False):
        assert conv(x).dtype == torch.float32


def test_native_bf16_is_false_for_a_device_type_without_bf16_kernels():
    assert run_module.native_bf16("meta") is False


def test_a_second_lock_on_a_held_run_dir_names_the_holder_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == sys.argv and holder["host"] and holder["started"]
        before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
        with pytest.raises(ValueError) as error:
            with lock_run_dir(run_dir):  # flock: a second open file, even in this process, is another holder
                pass
        message = str(error.value)
        assert str(run_dir) in message and f"pid {os.getpid()}" in message and "--out" in message
        assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert not (run_dir / ".lock").exists()  # released and removed on exit
    with lock_run_dir(run_dir):
        pass


_HOLD_LOCK = """
import sys, time
from metatransfer.run import lock_run_dir
with lock_run_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_the_lock_of_a_process_killed_with_sigkill_is_free_at_once(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"pid {holder.pid} "):
            with lock_run_dir(run_dir):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    assert (run_dir / ".lock").exists()  # left behind by the killed process, but no longer locked
    with lock_run_dir(run_dir):  # the kernel released it with the process: `--resume` can start now
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
