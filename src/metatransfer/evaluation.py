"""Few-shot accuracy with a 95% confidence interval: a `FewShotModel` on seeded episodes of one split.

What meta-test reports and what validation during pre-training and meta-training selects
checkpoints by. With BatchNorm frozen, the features of the images the episodes use are computed once
(scaling-shifting and BN folded into the convs) and the fine-tuning of all episodes runs as one
batched inner loop, so thousands of episodes cost at most one pass over the split, and a few hundred
episodes of a large split (tieredImageNet's 206k test images) only the images they draw. With
`bn_mode="batch"` every episode is forwarded on its own instead. Episodes depend only on the plan's
seed, way and shot: every model is scored on the same tasks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from metatransfer.data.cache import ImageSplit
from metatransfer.data.episodes import TaskIndices, TaskSampler
from metatransfer.model import FewShotModel, Preprocessing
from metatransfer.models.fuse import inference_copy
from metatransfer.models.head import BaseLearner

__all__ = ["confidence_interval", "EpisodePlan", "evaluate_split", "validation_model"]


def confidence_interval(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width (1.96 * std / sqrt(n)) of per-episode accuracies, in percent."""
    accuracies = np.asarray(accuracies, dtype=np.float64) * 100
    half = 1.96 * accuracies.std() / math.sqrt(len(accuracies)) if len(accuracies) > 1 else float("nan")
    return float(accuracies.mean()), float(half)


@dataclass(frozen=True)
class EpisodePlan:
    """Which seeded episodes to score: every (way, shot) of `ways` x `shots`, `episodes` of each.

    Args:
        ways, shots: the settings scored.
        episodes: episodes per setting.
        n_query: query images per class ("standard" protocol).
        protocol: "standard", or "paper" (as many queries as shots, the support images also flipped).
        seed: episodes depend on it, the way and the shot only.
    """

    ways: Sequence[int]
    shots: Sequence[int]
    episodes: int
    n_query: int
    protocol: str = "standard"
    seed: int = 0

    @classmethod
    def from_config(cls, test: Any) -> "EpisodePlan":
        """The plan of a `MetaTestConfig` (config `meta_test`)."""
        return cls(ways=list(test.n_way), shots=list(test.n_shot), episodes=test.episodes, n_query=test.n_query,
                   protocol=test.protocol, seed=test.seed)


def _on_used_images(all_tasks: Sequence[TaskIndices]) -> tuple[np.ndarray, list[TaskIndices]]:
    """The sorted split indices the tasks draw, and the tasks re-indexed into that list."""
    used = np.unique(np.concatenate([np.concatenate([t.support, t.query], axis=1).ravel() for t in all_tasks]))
    return used, [TaskIndices(np.searchsorted(used, t.support), np.searchsorted(used, t.query), t.class_ids, t.n_way, t.n_shot, t.n_query)
                  for t in all_tasks]


def evaluate_split(model: FewShotModel, split: ImageSplit, plan: EpisodePlan) -> list[dict[str, Any]]:
    """Score `model` on the plan's seeded episodes of `split`: one results row per (way, shot), with
    accuracy, 95% CI and the per-episode accuracies."""
    paper = plan.protocol == "paper"
    settings = []
    for n_way in plan.ways:
        for n_shot in plan.shots:
            n_query = n_shot if paper else plan.n_query
            sampler = TaskSampler(split.labels, n_way=n_way, n_shot=n_shot, n_query=n_query, seed=[plan.seed, n_way, n_shot],
                                  class_names=split.class_names)
            settings.append((n_way, n_shot, n_query, sampler.sample(plan.episodes)))
    frozen = model.bn_mode == "frozen"
    if frozen:  # one pass over the images the episodes use, with SS and BN folded into the convs
        used, reindexed = _on_used_images([tasks for *_, tasks in settings])
        settings = [(*setting[:3], tasks) for setting, tasks in zip(settings, reindexed)]
        plain = dataclasses.replace(model, backbone=inference_copy(model.backbone))
        features = plain.features(split.images, indices=used)
        flipped = None
        if paper:  # flip-averaged features are their mirror's already
            flipped = features if model.flip_average else plain.features(split.images, indices=used, flip=True)
    results = []
    for n_way, n_shot, n_query, tasks in settings:
        accuracies = model.score(features, tasks, flipped=flipped) if frozen else model.score_each(split.images, tasks, flipped=paper)
        accuracy, ci95 = confidence_interval(accuracies)
        results.append({
            "dataset": split.dataset, "split": split.split, "way": n_way, "shot": n_shot, "query": n_query,
            "episodes": plan.episodes, "accuracy": round(accuracy, 3), "ci95": round(ci95, 3), "protocol": plan.protocol,
            "bn_mode": model.bn_mode, "flip_average": model.flip_average, "shift_views": model.shift_views, "seed": plan.seed,
            "per_episode": accuracies.round(4).tolist(),
        })
    return results


def validation_model(config: Any, backbone: nn.Module, learner: BaseLearner, split: ImageSplit, device: torch.device) -> FewShotModel:
    """The model that validation during training scores: the backbone being trained (in whatever
    state it is) with `learner`, the run's BN mode, test-time flip and compute settings, normalised
    as `split`; without the test-time shifts, which would multiply the cost of every check."""
    return FewShotModel(backbone, learner, Preprocessing.from_split(split.images, split.mean, split.std), bn_mode=config.model.bn_mode,
                        flip_average=config.views.flip, shift_views=0, amp=config.amp, channels_last=config.channels_last,
                        device=device)
