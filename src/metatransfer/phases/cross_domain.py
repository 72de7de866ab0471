"""Cross-domain meta-test: another prepared dataset's images, fitted to a trained run's input.

"How well does my FC100 model do on my classes?" is the question cross-domain few-shot benchmarks
(BSCD-FSL, Meta-Dataset) ask. The other dataset's images are resized to the run's image size (the
LANCZOS filter of `mtl data prepare`), converted grey <-> RGB where the channels differ (PIL: luma
for RGB -> grey, the channel repeated for grey -> RGB), and normalised with the run's own
statistics, as its backbone saw its training images. Images are taken as their cache stores them
(Omniglot's cache holds ink bright on a dark background).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from metatransfer.config import Config
from metatransfer.data._decode import RESAMPLE
from metatransfer.data.cache import ImageSplit, load_split, read_manifest

__all__ = ["fit_images", "load_foreign_split"]


def fit_images(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> uint8 (N, size, size, channels); the input itself when it already fits."""
    if images.shape[1:] == (size, size, channels):
        return images
    mode = "L" if channels == 1 else "RGB"
    fitted = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for index, array in enumerate(images):
        image = Image.fromarray(np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)).convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), RESAMPLE)
        fitted[index] = np.asarray(image).reshape(size, size, channels)
    return fitted


def load_foreign_split(config: Config, root, name: str, split: str) -> ImageSplit:
    """Split `split` of the prepared dataset `name` under `root`, as input for the run of `config`.

    Raises:
        FileNotFoundError: `name` is not prepared under `root`, or the run's own dataset (which gives
            its image size, channels and statistics) is missing.
        ValueError: the split has no images.
    """
    target = load_split(root, name, split)
    if not len(target.labels):
        raise ValueError(f"Dataset {name!r} has no {split} images; choose another --split.")
    try:
        manifest = read_manifest(config.data.root, config.data.name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"The run's own dataset {config.data.name!r} is missing from {config.data.root} (data.root); its image size, "
            "channels and statistics fit the other dataset's images to the run. Prepare it there again."
        ) from None
    size, channels = int(manifest["image_size"][0]), int(manifest["channels"])
    mean, std = (config.data.mean, config.data.std) if config.data.mean else (manifest["mean"], manifest["std"])
    return ImageSplit(images=fit_images(target.images, size, channels), labels=target.labels, class_names=target.class_names,
                      mean=tuple(mean), std=tuple(std), dataset=name, split=split)
