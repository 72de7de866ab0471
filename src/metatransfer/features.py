"""Images to features: normalised, forwarded through a backbone, averaged over test-time views.

With BatchNorm frozen at its running statistics (the default), a backbone maps each image to one
feature vector whatever task it is in, so a split's features are computed once and every episode
indexes them. The transductive alternative (batch statistics per support or query set, as the
paper's TF code does) needs one forward per set: `batch_statistics` switches BN to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from metatransfer.data.augment import to_float
from metatransfer.run import autocast
from metatransfer.views import embed, images_per_forward

__all__ = ["FeatureSettings", "batch_statistics", "forward_images", "extract_features"]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with each forward's own batch statistics, leaving the running statistics untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for m, (training, momentum) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum


@dataclass(frozen=True)
class FeatureSettings:
    """How uint8 images become features: their normalisation, where and how the backbone runs, and
    the test-time views averaged (`views.embed`).

    Args:
        mean, std: per-channel normalisation on the 0..1 scale.
        device: where the images go.
        amp: bf16 autocast (config `amp`; a no-op where the device has no native bf16).
        channels_last: the images in channels-last memory format (config `channels_last`).
        flip_average: the mean with the mirror image's feature (`views.flip`).
        shift_views: and with copies shifted by this many pixels (`views.shift_pixels`); 0 = off.
    """

    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device = torch.device("cpu")
    amp: bool = False
    channels_last: bool = False
    flip_average: bool = False
    shift_views: int = 0


def forward_images(
    backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: FeatureSettings,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 (..., H, W, C) images -> float32 (B, D) features, in the backbone's current mode;
    `augment` maps the normalised (B, C, H, W) batch first (meta_train.augment)."""
    x = to_float(images, settings.mean, settings.std, device=settings.device, channels_last=settings.channels_last)
    if augment is not None:
        x = augment(x)
    with autocast(settings.device, settings.amp):
        return embed(backbone, x, settings.flip_average, settings.shift_views)


@torch.no_grad()
def extract_features(
    backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    settings: FeatureSettings,
    *,
    indices: np.ndarray | None = None,
    flip: bool = False,
    batch_size: int = 256,
) -> torch.Tensor:
    """Features of a split's images (all, or the sorted `indices` only), (N, D) float32 on the
    settings' device, with BN at its running statistics; `flip` mirrors every image first. The
    shifted copies of `shift_views` multiply each batch, so it shrinks to match."""
    was_training = getattr(backbone, "training", False)  # an ONNX backbone is a plain callable
    if isinstance(backbone, nn.Module):
        backbone.eval()
    chunks = []
    count = len(images) if indices is None else len(indices)
    batch_size = images_per_forward(batch_size, settings.shift_views)
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size) if indices is None else indices[start : start + batch_size]
        batch = torch.from_numpy(np.array(images[part]))  # a writable copy of the memmap rows
        if flip:
            batch = batch.flip(-2)  # (B, H, W, C): W is axis -2
        chunks.append(forward_images(backbone, batch, settings).to(settings.device))
    if isinstance(backbone, nn.Module):
        backbone.train(was_training)
    return torch.cat(chunks)
