"""Backbone construction and feature extraction shared by the three phases.

With BatchNorm frozen at its running statistics (the default), a backbone maps each image to one
feature vector whatever task it is in, so a split's features are computed once and every episode
indexes them. The transductive alternative (batch statistics per support or query set, as the
paper's TF code does) needs one forward per set: `batch_statistics` switches BN to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.config import Config, check_config
from metatransfer.data.augment import to_float
from metatransfer.models.backbones import create_backbone
from metatransfer.models.head import BaseLearner, init_head_weight
from metatransfer.data.cache import ImageSplit, load_split
from metatransfer.run import autocast, load_checkpoint, resolve_device, seed_everything, tensors_under

__all__ = ["load_run_split", "start_phase", "build_backbone", "backbone_meta", "pretrained_stem", "shot_best_stem", "load_pretrained_backbone", "held_out_classes", "class_subset", "untrained_theta", "untrained_learner", "extract_features", "batch_statistics", "embed", "forward_images", "shift_offsets", "images_per_forward"]


def load_run_split(config: Config, split: str) -> ImageSplit:
    """A split of the run's dataset, normalised as the run is: its `data.mean`/`data.std` where set
    (a transfer run with `model.init_normalisation=source`), else the prepared train statistics."""
    images = load_split(config.data.root, config.data.name, split)
    if not images.images.shape[0]:
        raise ValueError(f"Dataset {config.data.name!r} has no {split} images (an evaluation-only dataset?); train on a dataset "
                         f"with {split} classes, and score this one with `mtl meta-test --resume RUN --dataset {config.data.name}`.")
    if config.data.mean:
        images = dataclasses.replace(images, mean=tuple(config.data.mean), std=tuple(config.data.std))
    return images


def held_out_classes(config: Config, num_classes: int) -> np.ndarray:
    """The sorted base classes pre-training leaves out (`pretrain.held_out_classes` of them)."""
    count = config.pretrain.held_out_classes
    if not 0 <= count < num_classes:
        raise ValueError(f"pretrain.held_out_classes={count} must leave pre-training at least one of the {num_classes} base classes.")
    return np.sort(np.random.default_rng(count).choice(num_classes, count, replace=False))


def class_subset(split: ImageSplit, class_ids: np.ndarray) -> ImageSplit:
    """An in-memory copy of `split` with only the sorted `class_ids`, relabelled 0..len-1 in order."""
    keep = np.isin(split.labels, class_ids)
    relabel = np.full(split.num_classes, -1, dtype=np.int64)
    relabel[class_ids] = np.arange(len(class_ids))
    return dataclasses.replace(split, images=np.asarray(split.images[keep]), labels=relabel[split.labels[keep]],
                               class_names=[split.class_names[c] for c in class_ids])


def untrained_theta(config: Config, dim: int, n_way: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """theta as meta-training starts it (`base_learner.init`, drawn from a generator seeded by
    `seed`): what pre-training validates with, what meta-train learns from, the paired gain's start."""
    n_way = n_way or config.meta_train.n_way
    generator = torch.Generator().manual_seed(config.seed)
    return init_head_weight(n_way, dim, config.base_learner.init, generator=generator), torch.zeros(n_way)


def untrained_learner(config: Config, dim: int) -> BaseLearner:
    """The base-learner as meta-training starts it: `base_learner.*`, with E3BM's hyperprior learners
    (`base_learner.ensemble=e3bm`) at their init for D = `dim` features, drawn from a generator seeded
    by `seed`; what scores the pre-trained start wherever theta is untrained."""
    generator = torch.Generator().manual_seed(config.seed)
    return BaseLearner.from_config(config.base_learner).with_untrained_hyperprior(dim, generator)


def start_phase(config: Config) -> tuple[torch.device, ImageSplit, ImageSplit]:
    """Device, seeded RNGs, and the train and val splits that every training phase starts from;
    settings that do not work together are refused first (`config.check_config`)."""
    check_config(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    return device, load_run_split(config, "train"), load_run_split(config, "val")


def build_backbone(config: Config, in_chans: int) -> nn.Module:
    model = config.model
    drop_block = {"drop_block_rate": model.drop_block_rate, "drop_block_size": model.drop_block_size} if model.drop_block_rate else {}
    return create_backbone(model.backbone, in_chans=in_chans, width=model.width, drop_rate=model.drop_rate, **drop_block)


def backbone_meta(config: Config, backbone: nn.Module, in_chans: int) -> dict:
    """The plain values a checkpoint needs to rebuild (and check) its backbone."""
    return {
        "backbone": config.model.backbone,
        "width": config.model.width,
        "in_chans": in_chans,
        "out_features": backbone.out_features,
    }


def pretrained_stem(config: Config, run_dir: Path) -> Path:
    """The pre-training checkpoint meta-training starts from (`meta_train.init_checkpoint`, whose
    form `config.check_config` checks)."""
    return Path(run_dir) / "pretrain" / config.meta_train.init_checkpoint


def shot_best_stem(run_dir: Path, shot: int) -> Path:
    """The checkpoint validation at `shot` picked (meta_train.val_shots), which meta-test uses for that shot."""
    return Path(run_dir) / "meta_train" / f"best-{shot}shot"


def load_pretrained_backbone(config: Config, run_dir: Path, in_chans: int) -> nn.Module:
    """The run's pre-trained backbone (`pretrain/best`, or `meta_train.init_checkpoint`), rebuilt from
    the config; a checkpoint of another model is an error."""
    backbone = build_backbone(config, in_chans)
    tensors, _ = load_checkpoint(pretrained_stem(config, run_dir), expect=backbone_meta(config, backbone, in_chans))
    backbone.load_state_dict(tensors_under(tensors, "backbone"))
    return backbone


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


def shift_offsets(shift_views: int) -> list[tuple[int, int]]:
    """(dx, dy) of the copies `embed` averages: the 3x3 grid of shifts by -s, 0 and s pixels, or the
    image alone for s = 0 (model.shift_views)."""
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
    (model.flip_average) and/or `shift_views` (model.shift_views), the mean of the features of the
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


def forward_images(
    backbone: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp: bool,
    channels_last: bool,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    flip_average: bool = False,
    shift_views: int = 0,
) -> torch.Tensor:
    """uint8 (..., H, W, C) images -> float32 (B, D) features, in the backbone's current mode;
    `augment` maps the normalised (B, C, H, W) batch first (meta_train.augment); `flip_average`,
    `shift_views`: `embed`."""
    x = to_float(images, mean, std, device=device, channels_last=channels_last)
    if augment is not None:
        x = augment(x)
    with autocast(device, amp):
        return embed(backbone, x, flip_average, shift_views)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    amp: bool,
    channels_last: bool,
    batch_size: int = 256,
    flip: bool = False,
    indices: np.ndarray | None = None,
    flip_average: bool = False,
    shift_views: int = 0,
) -> torch.Tensor:
    """Features of a split's images (all, or the sorted `indices` only), (N, D) float32 on `device`,
    with BN at its running statistics; `flip` mirrors every image, `flip_average`, `shift_views`:
    `embed` (the shifted copies multiply each batch, so it shrinks to match)."""
    was_training = backbone.training
    backbone.eval()
    chunks = []
    count = len(images) if indices is None else len(indices)
    batch_size = images_per_forward(batch_size, shift_views)
    for start in range(0, count, batch_size):
        part = slice(start, start + batch_size) if indices is None else indices[start : start + batch_size]
        batch = torch.from_numpy(np.array(images[part]))  # a writable copy of the memmap rows
        if flip:
            batch = batch.flip(-2)  # (B, H, W, C): W is axis -2
        chunks.append(forward_images(backbone, batch, mean=mean, std=std, device=device, amp=amp, channels_last=channels_last,
                                     flip_average=flip_average, shift_views=shift_views))
    backbone.train(was_training)
    return torch.cat(chunks)
