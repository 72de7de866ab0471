"""Seeded N-way K-shot Q-query tasks, sampled as index arrays and gathered into tensors.

Sampling yields indices rather than images so that meta-test can index a split's features that
were computed once, while meta-train gathers the images of a whole meta-batch for one forward.
Randomness comes from a NumPy PCG64 generator owned by the sampler: the same seed gives the same
episodes on every machine, and its state is a plain dict that checkpoints store as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["TaskIndices", "Episode", "TaskSampler", "gather_episode"]


@dataclass(frozen=True)
class TaskIndices:
    """Image indices of T tasks. Support is class-major: task t, class c, shot s at c * K + s."""

    support: np.ndarray  # (T, N * K) indices into the split
    query: np.ndarray  # (T, N * Q) indices into the split
    class_ids: np.ndarray  # (T, N) split-level class of each task label 0..N-1
    n_way: int
    n_shot: int
    n_query: int

    @property
    def n_tasks(self) -> int:
        return self.support.shape[0]

    def sliced(self, part: slice) -> "TaskIndices":
        """The tasks `part` selects (a chunk to score, a rank's shard), with the same N, K and Q."""
        return TaskIndices(self.support[part], self.query[part], self.class_ids[part], self.n_way, self.n_shot, self.n_query)

    def support_labels(self) -> torch.Tensor:
        """(T, N * K) labels 0..N-1."""
        return torch.arange(self.n_way).repeat_interleave(self.n_shot).expand(self.n_tasks, -1)

    def query_labels(self) -> torch.Tensor:
        """(T, N * Q) labels 0..N-1."""
        return torch.arange(self.n_way).repeat_interleave(self.n_query).expand(self.n_tasks, -1)


@dataclass(frozen=True)
class Episode:
    """T tasks as tensors; images are uint8 (T, M, H, W, C) straight from the cache."""

    support_images: torch.Tensor  # (T, N * K, H, W, C) uint8
    support_labels: torch.Tensor  # (T, N * K) int64 in 0..N-1
    query_images: torch.Tensor  # (T, N * Q, H, W, C) uint8
    query_labels: torch.Tensor  # (T, N * Q) int64 in 0..N-1
    class_ids: torch.Tensor  # (T, N) split-level class ids


class TaskSampler:
    """Draws tasks from a labelled split, optionally restricted to a set of classes.

    Args:
        labels: (num_images,) class index of every image of the split.
        n_way, n_shot, n_query: classes per task, support and query images per class.
        seed: seed of the sampler's own generator.
        class_names: used only to name a class in error messages.

    Raises:
        ValueError: if the split has fewer than n_way classes, or a class has fewer than
            n_shot + n_query images (the message names the class and both numbers).
    """

    def __init__(
        self,
        labels: np.ndarray,
        *,
        n_way: int,
        n_shot: int,
        n_query: int,
        seed: int,
        class_names: Sequence[str] | None = None,
    ) -> None:
        labels = np.asarray(labels)
        self.n_way, self.n_shot, self.n_query = n_way, n_shot, n_query
        self.rng = np.random.default_rng(seed)
        order = np.argsort(labels, kind="stable")
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self.num_classes = int(classes.max()) + 1 if len(classes) else 0
        self._class_images = [order[start : start + count] for start, count in zip(starts, counts)]
        self._present = classes
        self._counts = np.zeros(self.num_classes, dtype=np.int64)
        self._counts[classes] = counts
        self._check_split_has_enough_classes(n_way)
        self._check_classes_have_enough_images(classes, class_names)
        # Equal class sizes (every benchmark but tieredImageNet) allow one vectorised draw.
        self._table = np.stack(self._class_images) if len(set(counts.tolist())) == 1 else None
        self._row_of = np.full(self.num_classes, -1)
        self._row_of[classes] = np.arange(len(classes))

    def _check_split_has_enough_classes(self, n_way: int) -> None:
        if len(self._present) < n_way:
            raise ValueError(f"A {n_way}-way task needs {n_way} classes, but the split has only {len(self._present)}.")

    def _check_classes_have_enough_images(self, classes: np.ndarray, class_names: Sequence[str] | None) -> None:
        needed = self.n_shot + self.n_query
        short = [int(c) for c in classes if self._counts[c] < needed]
        if short:
            c = short[0]
            name = class_names[c] if class_names is not None else f"class {c}"
            raise ValueError(
                f"Class {name!r} has {self._counts[c]} images, fewer than the {needed} a task needs "
                f"({self.n_shot} shot + {self.n_query} query); {len(short)} class(es) are short. "
                "Lower n_shot/n_query or add images."
            )

    def sample(self, n_tasks: int, classes: Sequence[int] | None = None) -> TaskIndices:
        """Draw n_tasks tasks; with `classes`, each task's N classes come from that set only."""
        pool = self._present if classes is None else np.unique(np.asarray(classes, dtype=np.int64))
        if len(pool) < self.n_way:
            raise ValueError(f"Need {self.n_way} distinct classes to sample from, got {len(pool)}.")
        if classes is not None and (self._row_of[pool] < 0).any():
            raise ValueError(f"Classes {pool[self._row_of[pool] < 0].tolist()} have no images in this split.")
        # (T, N) distinct classes per task: argsort of uniform keys is a uniform permutation.
        picks = np.argsort(self.rng.random((n_tasks, len(pool))), axis=1)[:, : self.n_way]
        class_ids = pool[picks]
        per_class = self.n_shot + self.n_query
        if self._table is not None:
            rows = self._table[self._row_of[class_ids]]  # (T, N, images per class)
            chosen = np.argsort(self.rng.random(rows.shape), axis=2)[..., :per_class]
            images = np.take_along_axis(rows, chosen, axis=2)
        else:
            images = np.empty((n_tasks, self.n_way, per_class), dtype=np.int64)
            for t in range(n_tasks):
                for c in range(self.n_way):
                    members = self._class_images[self._row_of[class_ids[t, c]]]
                    images[t, c] = self.rng.choice(members, per_class, replace=False)
        support = images[..., : self.n_shot].reshape(n_tasks, -1)
        query = images[..., self.n_shot :].reshape(n_tasks, -1)
        return TaskIndices(support, query, class_ids, self.n_way, self.n_shot, self.n_query)

    def state_dict(self) -> dict:
        """The generator state, a JSON-able dict, for resumable runs."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def gather_episode(images: np.ndarray, tasks: TaskIndices) -> Episode:
    """Read the tasks' uint8 images from a (possibly memory-mapped) (N, H, W, C) array."""
    flat = np.concatenate([tasks.support.ravel(), tasks.query.ravel()])
    # One sorted read is much faster on a memory map than scattered ones.
    order = np.argsort(flat, kind="stable")
    batch = np.empty((len(flat), *images.shape[1:]), dtype=images.dtype)
    batch[order] = images[flat[order]]
    batch_t = torch.from_numpy(batch)
    n_support = tasks.support.size
    T = tasks.n_tasks
    return Episode(
        support_images=batch_t[:n_support].reshape(T, tasks.support.shape[1], *images.shape[1:]),
        support_labels=tasks.support_labels(),
        query_images=batch_t[n_support:].reshape(T, tasks.query.shape[1], *images.shape[1:]),
        query_labels=tasks.query_labels(),
        class_ids=torch.from_numpy(tasks.class_ids),
    )
