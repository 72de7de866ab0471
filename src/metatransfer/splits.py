"""The splits a run trains and scores on: normalised as the run is, and the base classes pre-training holds out."""

from __future__ import annotations

import dataclasses

import numpy as np

from metatransfer.config import Config
from metatransfer.data.cache import ImageSplit, load_split

__all__ = ["load_run_split", "held_out_classes", "class_subset"]


def load_run_split(config: Config, split: str) -> ImageSplit:
    """A split of the run's dataset, normalised as the run is: its `data.mean`/`data.std` where set
    (a transfer run with `transfer.normalisation=source`), else the prepared train statistics."""
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
