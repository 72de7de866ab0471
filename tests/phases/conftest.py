"""Small prepared datasets for end-to-end runs of the phases, built once per session.

`fc100_small` keeps a few real FC100 images per class (all 60/20/20 classes), so every phase
runs on real data in seconds; `tiny84` is a generated 84x84 folder dataset standing in for
miniImageNet and tieredImageNet (whose images are not available here). Both return `(root, name)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.data.cache import SPLITS, load_split, write_cache
from metatransfer.data.prepare import prepare_dataset

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
def tiny84(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """15 generated classes (5 train, 5 val, 5 test) x 20 images of 84x84 RGB: noise plus a class colour."""
    source = tmp_path_factory.mktemp("tiny84_source") / "tiny84"
    rng = np.random.default_rng(0)
    for index in range(15):
        split = SPLITS[index // 5]
        colour = rng.integers(0, 256, 3)
        folder = source / split / f"class{index:02d}"
        folder.mkdir(parents=True)
        for image in range(20):
            pixels = np.clip(colour + rng.normal(0, 40, (84, 84, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{image:02d}.png")
    root = tmp_path_factory.mktemp("cache_tiny84")
    prepare_dataset("folder", source, root, image_size=84, log=lambda message: None)
    return root, "tiny84"
