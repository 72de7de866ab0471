"""Shared fixtures: the real data in ../shared/data and caches prepared once per test session.

`prepared_*` fixtures return `(root, name)` for `metatransfer.data.cache.load_split(root, name,
split)`. They are session-scoped and read-only by convention: do not write into them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.data.cache import SPLITS, load_split, write_cache
from metatransfer.data.prepare import prepare_dataset

# The repository sits next to shared/: /work/main/tests/conftest.py -> /work/shared/data.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; tests that need it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prepared_fc100(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """FC100 (60/20/20 classes x 600, 32x32 RGB) from the real CIFAR-100 PNG zip (~6 s)."""
    root = tmp_path_factory.mktemp("cache_fc100")
    prepare_dataset("fc100", shared_data / "cifar100" / "cifar100_png.zip", root, log=_quiet)
    return root, "fc100"


# Images kept per class: train enough for 1-shot 5-query meta-train tasks; val 16 for the
# phases' fixed 15-query validation; test 25 for the presets' 10-shot 15-query meta-test.
SMALL_PER_CLASS = {"train": 8, "val": 16, "test": 25}


@pytest.fixture(scope="session")
def fc100_small(prepared_fc100: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """FC100 with the first few images of every class (60 x 8 / 20 x 16 / 20 x 25, 32x32)."""
    source_root, source_name = prepared_fc100
    root = tmp_path_factory.mktemp("cache_fc100_small")
    splits = {}
    for split in SPLITS:
        data = load_split(source_root, source_name, split)
        keep = np.concatenate(
            [np.flatnonzero(data.labels == c)[: SMALL_PER_CLASS[split]] for c in range(data.num_classes)]
        )
        splits[split] = (np.asarray(data.images[keep]), data.labels[keep], data.class_names)
    write_cache(root, "fc100-small", splits, source_path=source_root / source_name, source_sha256=None,
                protocol="FC100, first images of each class (tests)", options={})
    return root, "fc100-small"


@pytest.fixture(scope="session")
def prepared_omniglot(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """Omniglot, Lake split (792/172/659 characters x 20, 28x28x1, ink bright) (~5 s)."""
    root = tmp_path_factory.mktemp("cache_omniglot")
    prepare_dataset("omniglot", shared_data / "omniglot", root, log=_quiet)
    return root, "omniglot"


@pytest.fixture(scope="session")
def prepared_omniglot_vinyals(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """Omniglot, Vinyals split with rotations (4112/688/1692 classes x 20, 28x28x1) (~5 s)."""
    root = tmp_path_factory.mktemp("cache_omniglot_vinyals")
    split_dir = shared_data / "omniglot" / "splits" / "vinyals"
    prepare_dataset(
        "omniglot",
        shared_data / "omniglot",
        root,
        split_dir=split_dir,
        output_name="omniglot-vinyals",
        log=_quiet,
    )
    return root, "omniglot-vinyals"


def make_image_folder(
    folder: Path,
    images_per_class: dict[str, int],
    *,
    size: int = 8,
    mode: str = "RGB",
    suffix: str = ".png",
    seed: int = 0,
) -> None:
    """Write `folder/<class>/<class>_NN<suffix>` random images (class names may hold '/')."""
    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for class_name, count in images_per_class.items():
        class_dir = folder / class_name
        class_dir.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            pixels = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
            image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
            image.save(class_dir / f"{Path(class_name).name}_{index:02d}{suffix}")


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny RGB folder dataset needing no real data: train 8, val 5, test 5 classes x 6 images,
    16x16x3. For sampler and loader tests that need speed, not realism."""
    source = tmp_path_factory.mktemp("tiny_source") / "tiny"
    layout = {"train": 8, "val": 5, "test": 5}
    for split, num_classes in layout.items():
        names = {f"{split}_class{index}": 6 for index in range(num_classes)}
        make_image_folder(source / split, names, size=16, seed=len(split))
    root = tmp_path_factory.mktemp("cache_tiny")
    prepare_dataset("folder", source, root, image_size=16, log=_quiet)
    return root, "tiny"


@pytest.fixture
def make_images():
    """The `make_image_folder` helper, as a fixture so test modules need not import conftest."""
    return make_image_folder
