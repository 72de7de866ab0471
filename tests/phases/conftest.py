"""Small prepared datasets for end-to-end runs of the phases, built once per session.

`fc100_small` (in ../conftest.py, shared with the resume, distributed and guard tests) keeps a few
real FC100 images per class; `tiny84` is a generated 84x84 folder dataset standing in for
miniImageNet and tieredImageNet (whose images are not available here). Both return `(root, name)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.data.cache import SPLITS
from metatransfer.data.prepare import prepare_dataset


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
