"""Batched image transforms on uint8 batches with plain torch ops (no torchvision).

Every random transform takes an explicit `torch.Generator`, so a run's augmentation is reproducible
from its seed and resumable from the generator's saved state. Draws happen on the CPU generator and
the arithmetic on the batch's device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["to_float", "hflip", "random_crop_flip", "random_resized_crop_flip", "color_jitter", "augment_batch"]


def to_float(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """(..., H, W, C) uint8 -> (B, C, H, W) float normalised per channel; leading dims are flattened."""
    images = images.reshape(-1, *images.shape[-3:]).to(device, non_blocking=True)
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _flip_mask(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(batch, generator=generator) < 0.5).to(device)


def random_crop_flip(
    x: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Zero-pad by `padding`, crop back to the original size at a random place, maybe flip (B, C, H, W)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * padding + 1, (B,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (left[:, None] + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch_idx = torch.arange(B, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows, cols]
    if flip:
        mask = _flip_mask(B, generator, x.device)
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else out


def random_resized_crop_flip(
    x: torch.Tensor,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random area/aspect crop resized back to (H, W) by one batched `grid_sample`, maybe flipped."""
    B = x.shape[0]
    area = torch.empty(B).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(B).uniform_(torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item(), generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # as fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(B, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(B, generator=generator) * 2 - 1) * (1 - height)
    sx = width * torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0) if flip else width
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def color_jitter(x: torch.Tensor, *, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - strength, 1 + strength]."""
    B = x.shape[0]

    def factors() -> torch.Tensor:
        return (1 + (torch.rand(B, generator=generator) * 2 - 1) * strength).to(x.device).view(B, 1, 1, 1)

    x = x * factors()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors() + mean
    if x.shape[1] == 3:
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * factors() + gray
    return x


def augment_batch(
    x: torch.Tensor,
    *,
    kind: str,
    padding: int,
    flip: bool,
    jitter: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Pre-training augmentation of a normalised float batch (B, C, H, W), by config name."""
    if kind == "crop_flip":
        x = random_crop_flip(x, padding=padding, flip=flip, generator=generator)
    elif kind == "resized_crop_flip":
        x = random_resized_crop_flip(x, flip=flip, generator=generator)
    elif kind != "none":
        raise ValueError(f"Unknown augmentation {kind!r}; use none, crop_flip or resized_crop_flip.")
    if jitter > 0:
        x = color_jitter(x, strength=jitter, generator=generator)
    return x
