"""Session fixtures for the predict/export tests: a smoke run and folders of real CIFAR-100 images.

Test modules import the fixtures (`from fixtures_run import smoke_run, fc100_folders`); the work
is memoised here, so the run is trained once per session whichever modules use it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from metatransfer.cli import main

# Unseen FC100 test classes (superclasses aquatic_mammals, insects, medium_mammals, people).
CLASSES = ("dolphin", "bee", "fox", "girl", "whale")
N_SHOT, N_QUERY = 5, 10
_CACHE: dict[str, object] = {}


@pytest.fixture(scope="session")
def smoke_run(prepared_fc100: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`mtl run --preset smoke` on the FC100 cache (~10 s): a run dir with every checkpoint."""
    if "run" not in _CACHE:
        root, _ = prepared_fc100
        run_dir = tmp_path_factory.mktemp("smoke_run") / "run"
        assert main(["run", "--preset", "smoke", "--data-root", str(root), "--out", str(run_dir), "device=cpu"]) == 0
        _CACHE["run"] = run_dir
    return _CACHE["run"]


@pytest.fixture(scope="session")
def fc100_folders(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """SUPPORT/<class>/ (5 images) and QUERY/<class>/ (10 images) of 5 FC100 test classes."""
    if "folders" not in _CACHE:
        base = tmp_path_factory.mktemp("fc100_folders")
        with zipfile.ZipFile(shared_data / "cifar100" / "cifar100_png.zip") as archive:
            for name in CLASSES:
                for index in range(N_SHOT + N_QUERY):
                    kind = "support" if index < N_SHOT else "query"
                    target = base / kind / name / f"{name}_{index:03d}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(f"cifar100/{name}/{name}_{index:03d}.png"))
        _CACHE["folders"] = (base / "support", base / "query")
    return _CACHE["folders"]
