"""Run directories: resolved config, metrics, checkpoints (safetensors + JSON), device and seeding.

A run directory is the only channel between phases: pre-train writes `pretrain/best`, meta-train
reads it and writes `meta_train/best`, meta-test reads that. Checkpoints are a pair of files,
`<stem>.safetensors` (tensors only) and `<stem>.json` (plain values). Both are written in full to
temporary names first and then renamed, tensors then JSON, so a failed write (disk full, no
permission) leaves the previous pair untouched; a kill between the two renames leaves the new JSON
pending, and the next load completes the rename. Nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from metatransfer.config import Config, config_from_dict, config_to_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_exists",
    "prepare_run_dir",
    "lock_run_dir",
    "read_run_config",
    "MetricsLog",
    "resolve_device",
    "autocast",
    "native_bf16",
    "seed_everything",
    "tensors_under",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "write_json",
]

CHECKPOINT_FORMAT = 1


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, json.dumps(value, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(stem: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write `stem.safetensors` and `stem.json`; the JSON records the tensors' sha256 to pair them.

    Raises:
        OSError: the disk is full or the folder not writable; the previous pair is left as it was.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors_path, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    tensors_tmp = stem.with_name(f".{stem.name}.safetensors.tmp-{os.getpid()}")
    meta_tmp = stem.with_name(f".{stem.name}.json.tmp-{os.getpid()}")
    renamed = False
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensors_tmp))
        with open(tensors_tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = _sha256(tensors_tmp)
        _write_synced(meta_tmp, json.dumps({"format_version": CHECKPOINT_FORMAT, "sha256": digest, **meta}, indent=2))
        os.replace(tensors_tmp, tensors_path)
        renamed = True
        os.replace(meta_tmp, meta_path)
    finally:
        tensors_tmp.unlink(missing_ok=True)
        if not renamed:  # after the tensors' rename the pending JSON is the only valid partner
            meta_tmp.unlink(missing_ok=True)


def _complete_pending_save(stem: Path) -> bool:
    """After a kill between the two renames of a save: adopt the pending JSON that pairs with the tensors."""
    digest = _sha256(stem.with_suffix(".safetensors"))
    for pending in sorted(stem.parent.glob(f".{stem.name}.json.tmp-*")):
        try:
            if json.loads(pending.read_text()).get("sha256") == digest:
                os.replace(pending, stem.with_suffix(".json"))
                return True
        except (OSError, json.JSONDecodeError):
            continue
    return False


def checkpoint_exists(stem: Path) -> bool:
    return stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file()


def load_checkpoint(stem: Path, *, expect: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint pair, checking format, pairing and the `expect`ed plain values.

    Raises:
        FileNotFoundError: a file of the pair is missing.
        ValueError: the pair is corrupt, of another format version, or differs from `expect`
            (e.g. another backbone or number of classes); the message says what differs.
    """
    meta_path, tensors_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for path in (meta_path, tensors_path):
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file {path} is missing.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Checkpoint {meta_path} is not valid JSON ({error}); it is corrupt.") from None
    if meta.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"Checkpoint {meta_path} has format version {meta.get('format_version')!r}; this metatransfer reads version {CHECKPOINT_FORMAT}."
        )
    if meta.get("sha256") != _sha256(tensors_path) and _complete_pending_save(stem):
        meta = json.loads(meta_path.read_text())
    if meta.get("sha256") != _sha256(tensors_path):
        raise ValueError(f"Checkpoint {tensors_path} does not match the checksum in {meta_path.name}: it is corrupt or from another save.")
    for key, wanted in (expect or {}).items():
        if meta.get(key) != wanted:
            raise ValueError(f"Checkpoint {stem} was saved with {key}={meta.get(key)!r}, but this run expects {key}={wanted!r}.")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"Checkpoint {tensors_path} cannot be read: {error}") from None
    return tensors, meta


def tensors_under(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint saved as `prefix.<name>`, keyed by `<name>` (e.g. a module's state)."""
    return {key.removeprefix(f"{prefix}."): value for key, value in tensors.items() if key.startswith(f"{prefix}.")}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors and plain JSON values."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        plain[str(index)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                plain[str(index)][key] = value
    return tensors, {"param_groups": state["param_groups"], "plain_state": plain}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in meta["plain_state"].items()}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            index, key = name[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def prepare_run_dir(run_dir: Path, config: Config) -> None:
    """Create the run directory and write the resolved config; a differing one is an error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    resolved = config_to_dict(config)
    if path.is_file():
        # Through the Config again, so a run written before a setting existed reads it at its default.
        existing = config_to_dict(config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path)))
        if existing != resolved:
            changed = sorted(_diff_keys(existing, resolved))
            raise ValueError(
                f"{path} holds another configuration (differs in {', '.join(changed[:8])}). "
                "Use a new --out directory, or --resume to continue the run as configured."
            )
        return
    tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
    os.replace(tmp, path)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one process (the ranks of one torchrun are one user: rank 0 locks).

    An exclusive `flock` on `run_dir/.lock`, created with the directory if need be. The holder
    writes its pid, host, start time and command line into the file, and removes it when done. The
    kernel drops the lock when the process ends, however it ends, so a run killed with SIGKILL can be
    resumed at once (the file it leaves is taken over).

    Raises:
        ValueError: another process holds the directory; the message names it (pid, command) and
            what to do. Nothing is written into the directory then.
    """
    try:
        import fcntl
    except ImportError:  # Windows has no flock: runs there are not guarded against a second process
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"{run_dir} is in use by another process ({_lock_holder(path)}). Wait for it to finish (or stop it and "
                "continue the run with --resume), or give this run another --out directory."
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file as it finished, after we opened it: lock the new one
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S%z"), "command": list(sys.argv)}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still held, so that nobody locks a removed file
    finally:
        os.close(fd)  # releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        opened, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def _lock_holder(path: Path) -> str:
    """Who holds `path`, from what it wrote there; it writes just after taking the lock, so wait a moment for it."""
    deadline = time.monotonic() + 2.0
    while True:
        try:
            holder = json.loads(path.read_text())
            command = " ".join(str(part) for part in holder.get("command", []))
            return f"pid {holder['pid']} on {holder.get('host', '?')}, started {holder.get('started', '?')}: {command}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            if time.monotonic() > deadline:
                return f"it has not written who it is into {path}"
            time.sleep(0.05)


def _diff_keys(a: Any, b: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in set(a) | set(b):
            yield from _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
    elif a != b:
        yield prefix.rstrip(".")


def read_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml.")
    return config_from_dict(yaml.safe_load(path.read_text()), str(path))


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard if installed.

    Args:
        run_dir: the run directory.
        enabled: False on the processes that must not write (ranks other than 0).
        name: TensorBoard folder under `run_dir/tensorboard`, one per phase, so that rewinding one
            phase never hides another phase's curves.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, name: str = "") -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard_dir = run_dir / "tensorboard" / name
        self._purge_step: int | None = None
        self._writer = None
        self._writer_tried = False

    def rewind(self, phases: Sequence[str], step: int) -> None:
        """Forget what a killed attempt logged for `phases` after `step` (the resumed checkpoint's;
        -1 for a fresh start), so a resumed run logs each step once, as an uninterrupted run does."""
        if not self.enabled:
            return
        self._purge_step = step + 1  # TensorBoard hides older events at or after this step
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if not _logged_after(line, phases, step)]
        if len(kept) != len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            try:
                _write_synced(tmp, "".join(line + "\n" for line in kept))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def log(self, phase: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"phase": phase, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{phase}/{key}", value, step)

    def _tensorboard(self):
        if not self._writer_tried:
            self._writer_tried = True
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self._tensorboard_dir), purge_step=self._purge_step)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _logged_after(line: str, phases: Sequence[str], step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return True
    return record.get("phase") in phases and record.get("step", 0) > step


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` computes in bf16 at least as fast as in fp32.

    CUDA GPUs from Ampere on, and CPUs with AVX-512 (oneDNN's bf16 kernels; AVX512-BF16 and AMX
    make them 2-4x faster than fp32). On an AVX2-only CPU oneDNN emulates bf16 and a ResNet-12
    forward runs about 7x slower than in fp32, so there autocast must stay off.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            return False
    return False


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast if `enabled` (config `amp`) and the device has native bf16, else a no-op (fp32)."""
    if enabled and not native_bf16(device.type):
        warnings.warn(f"amp=true, but this {device.type} has no native bf16 (emulated bf16 is several times "
                      "slower than fp32): computing in fp32.", stacklevel=2)
        enabled = False
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def rng_state_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """The global torch random streams a checkpoint must carry for a resumed run to draw as an
    uninterrupted one: the CPU's, and on CUDA the device's own, from which dropout and DropBlock
    draw there (the CPU stream alone leaves a resumed GPU run on fresh masks)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of `rng_state_tensors`. A CUDA stream is restored only on CUDA: a GPU run resumed on a
    CPU (or a checkpoint from before the CUDA stream was saved) continues from the CPU stream alone."""
    torch.set_rng_state(tensors["rng.torch"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
