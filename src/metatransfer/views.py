"""Test-time views: a feature averaged over an image's mirror image and shifted copies.

Wherever a trained model scores an image (validation, meta-test, `mtl predict`, bundles), its
feature may be the mean of the features of several views of it: its mirror image
(`views.flip`) and copies moved by -s, 0 and s pixels on a 3x3 grid (`views.shift_pixels`),
zero-padded as the pre-training crop pads. The mean is blind to left-right orientation and a few
pixels of position, and steadier on few images.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["shift_offsets", "images_per_forward", "shifted", "embed"]


def shift_offsets(shift_views: int) -> list[tuple[int, int]]:
    """(dx, dy) of the copies `embed` averages: the 3x3 grid of shifts by -s, 0 and s pixels, or the
    image alone for s = 0 (views.shift_pixels)."""
    steps = (-shift_views, 0, shift_views) if shift_views else (0,)
    return [(dx, dy) for dy in steps for dx in steps]


def images_per_forward(batch_size: int, shift_views: int) -> int:
    """Images to embed at once so that, with their shifted copies, a forward holds about `batch_size`
    (the flip's doubling was always within budget)."""
    return max(1, batch_size // len(shift_offsets(shift_views)))


def shifted(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(B, C, H, W) moved dx pixels right and dy down, zero-padded like the pre-training crop (zero
    is the mean colour once normalised)."""
    if dx == dy == 0:
        return x
    pad = max(abs(dx), abs(dy))
    H, W = x.shape[-2:]
    return F.pad(x, (pad, pad, pad, pad))[..., pad - dy : pad - dy + H, pad - dx : pad - dx + W]


def embed(backbone: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flip_average: bool = False,
          shift_views: int = 0) -> torch.Tensor:
    """Normalised (B, C, H, W) images -> (B, D) float32 features. With `flip_average`
    (views.flip) and/or `shift_views` (views.shift_pixels), the mean of the features of the
    image's views: its mirror image, and copies shifted as the pre-training crop shifts them. The
    mean is blind to left-right orientation and a few pixels of position, and steadier on few
    images. All views go through in one batch, so with batch-statistics BN they share one set of
    statistics."""
    views = [shifted(x, dx, dy) for dx, dy in shift_offsets(shift_views)]
    if flip_average:
        views += [view.flip(-1) for view in views]
    if len(views) == 1:
        return backbone(x).float()
    batch = torch.cat(views)
    if x.is_contiguous(memory_format=torch.channels_last):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return backbone(batch).float().reshape(len(views), len(x), -1).mean(dim=0)
