"""A trained few-shot model as one object: input normalisation, backbone, test-time views, base-learner.

`FewShotModel` is what meta-test, cross-domain scoring, validation during pre-training and
meta-training, `FewShotClassifier` (and so `mtl predict`) and `mtl export` all hold. It is built
once, by `metatransfer.loading` from a run directory or an export bundle, or by a training phase
from the backbone it is training, and then does the two few-shot steps on features, as easyfsl's
`FewShotClassifier` does on images: `fit(support, labels, n_way)` fine-tunes the base-learner (from its
theta) on support features, `predict(query)` reads queries with the adapted FC. `features` turns
uint8 images into those features (normalised as the training split was, averaged over the test-time
views, BatchNorm frozen or per set), and `score` runs fit and predict on a batch of episodes that
index precomputed features. Sun et al., CVPR 2019, section 4 (meta-test phase).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from metatransfer.config import check_shift_pixels
from metatransfer.data.episodes import TaskIndices, gather_episode
from metatransfer.features import FeatureSettings, batch_statistics, extract_features, forward_images
from metatransfer.models.head import BaseLearner

__all__ = ["Preprocessing", "FewShotModel"]

Backbone = nn.Module | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a model input, recorded with the model (export bundle: bundle.json).

    Attributes:
        image_size: side of the square images the model was trained on.
        channels: 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation on the 0..1 scale (the training split's statistics).
        invert: store 255 - pixel, as the Omniglot cache does (ink bright on a dark background).
    """

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    invert: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} value(s) each, got {self.mean} and {self.std}")

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> "Preprocessing":
        """From a prepared dataset's manifest.json: Omniglot caches are stored inverted."""
        height, width = manifest["image_size"]
        if height != width:
            raise ValueError(f"Dataset {manifest.get('dataset')!r} has non-square {height}x{width} images")
        benchmark = manifest.get("options", {}).get("benchmark", manifest.get("dataset"))
        return cls(
            image_size=int(height), channels=int(manifest["channels"]), mean=tuple(manifest["mean"]),
            std=tuple(manifest["std"]), invert=benchmark == "omniglot",
        )

    @classmethod
    def from_split(cls, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> "Preprocessing":
        """For a split's cached uint8 (N, H, W, C) images and its statistics (a phase scoring its own data)."""
        return cls(image_size=int(images.shape[1]), channels=int(images.shape[-1]), mean=tuple(mean), std=tuple(std))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resize": "square, lanczos",
                "alpha": "composited on white"}


@dataclass
class FewShotModel:
    """A trained few-shot model: images -> features -> a base-learner fitted on support, read on queries.

    Args:
        backbone: maps normalised (B, C, H, W) float32 images to (B, D) features; an `nn.Module`
            (scaling-shifting folded in, eval mode) or a callable such as an ONNX Runtime wrapper.
        learner: the base-learner with its theta, temperature and (E3BM) hyperprior learners.
        preprocessing: image size, channels and the mean/std that normalise inputs.
        bn_mode: "frozen" (running statistics) or "batch" (each forwarded set normalised by its own
            statistics, the transductive mode of the TF code).
        flip_average: each feature is the mean of the image's and its mirror image's (`views.flip`).
        shift_views: also averaged over copies shifted by this many pixels (`views.shift_pixels`); 0 = off.
        amp: bf16 autocast for the backbone (config `amp`; off for the API, whose features are float32).
        channels_last: the backbone runs in channels-last memory format (config `channels_last`).
        info: plain values describing the model (source, checkpoint, dataset, ...), for summaries.
    """

    backbone: Backbone
    learner: BaseLearner
    preprocessing: Preprocessing
    bn_mode: str = "frozen"
    flip_average: bool = False
    shift_views: int = 0
    amp: bool = False
    channels_last: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    head: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # the FC `fit` adapted

    def __post_init__(self) -> None:
        check_shift_pixels(int(self.shift_views))

    def to(self, device: torch.device) -> "FewShotModel":
        """Move the backbone (in channels-last format where set) and the base-learner to `device`; returns self."""
        if isinstance(self.backbone, nn.Module):
            self.backbone.to(device)
            if self.channels_last:
                self.backbone.to(memory_format=torch.channels_last)
        self.learner, self.device = self.learner.to(device), device
        return self

    # --- images to features ---------------------------------------------------------------------

    def feature_settings(self) -> FeatureSettings:
        """How this model turns images into features (its normalisation, views and compute settings)."""
        return FeatureSettings(mean=self.preprocessing.mean, std=self.preprocessing.std, device=self.device, amp=self.amp,
                               channels_last=self.channels_last, flip_average=self.flip_average, shift_views=self.shift_views)

    @torch.no_grad()
    def features(self, images: np.ndarray | torch.Tensor, *, indices: np.ndarray | None = None, flip: bool = False) -> torch.Tensor:
        """uint8 (..., H, W, C) images (all, or the sorted `indices` of the first axis) -> (N, D)
        float32 features on `device`, averaged over the test-time views. With BN frozen the images
        go through in batches; with `bn_mode="batch"` all of them form one set, forwarded at once
        with its own statistics. `flip` mirrors every image first."""
        settings = self.feature_settings()
        if self.bn_mode == "batch" and isinstance(self.backbone, nn.Module):
            images = images if indices is None else images[indices]
            batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
            batch = batch.flip(-2) if flip else batch  # (..., H, W, C): W is axis -2
            was_training = self.backbone.training
            self.backbone.eval()  # no dropout; batch_statistics puts only BN on batch statistics
            with batch_statistics(self.backbone):
                features = forward_images(self.backbone, batch, settings)
            self.backbone.train(was_training)
            return features
        return extract_features(self.backbone, images, settings, indices=indices, flip=flip)

    # --- the two few-shot steps -----------------------------------------------------------------

    @torch.no_grad()
    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> "FewShotModel":
        """Fine-tune the base-learner on (T, M, D) support features with (T, M) labels in 0..n_way-1
        (T tasks at once); returns self, holding the T adapted FCs. Without a gradient: the
        learner's tensors (E3BM's hyperprior learners are parameters) would otherwise keep every
        inner step in an autograd graph; the cosine logits' step enables its own where it needs one."""
        weight, bias = self.learner.adapt(support, labels, n_way)
        self.head = (weight.detach(), bias.detach())
        return self

    def logits(self, query: torch.Tensor) -> torch.Tensor:
        """(T, Q, D) query features -> (T, Q, n_way) logits of the FCs `fit` adapted."""
        if self.head is None:
            raise RuntimeError("This model is not fitted; call fit(support, labels, n_way) first")
        return self.learner.logits_of(query, *self.head)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        """(T, Q, D) query features -> (T, Q) predicted classes."""
        return self.logits(query).argmax(dim=-1)

    # --- scoring a batch of episodes ------------------------------------------------------------

    @torch.no_grad()
    def score(self, features: torch.Tensor, tasks: TaskIndices, *, flipped: torch.Tensor | None = None,
              chunk: int = 500) -> np.ndarray:
        """Per-episode query accuracy, (n_tasks,), of tasks indexing precomputed (num_images, D)
        features, `chunk` tasks fitted at once. `flipped`: the mirror images' features, which join
        every support set (the paper's protocol)."""
        accuracies = []
        for start in range(0, tasks.n_tasks, chunk):
            part = tasks.sliced(slice(start, start + chunk))
            support, support_labels, query, query_labels = _support_query(features, part, flipped)
            predictions = self.fit(support, support_labels, tasks.n_way).predict(query)
            accuracies.append((predictions == query_labels).float().mean(dim=1).cpu())
        return torch.cat(accuracies).numpy()

    @torch.no_grad()
    def score_each(self, images: np.ndarray, tasks: TaskIndices, *, flipped: bool = False) -> np.ndarray:
        """Per-episode query accuracy with every episode forwarded on its own (`bn_mode="batch"`:
        its support set and its query set each normalised by their own statistics); `flipped`: the
        mirror images join every support set (the paper's protocol)."""
        from metatransfer.progress import progress_bar

        accuracies = []
        for t in progress_bar(range(tasks.n_tasks), desc="meta-test episodes", leave=False):
            episode = gather_episode(images, tasks.sliced(slice(t, t + 1)))
            support_images, support_labels = episode.support_images, episode.support_labels.to(self.device)
            if flipped:
                support_images = torch.cat([support_images, support_images.flip(-2)], dim=1)
                support_labels = torch.cat([support_labels, support_labels], dim=1)
            support, query = self.features(support_images).unsqueeze(0), self.features(episode.query_images).unsqueeze(0)
            predictions = self.fit(support, support_labels, tasks.n_way).predict(query)
            accuracies.append((predictions == episode.query_labels.to(self.device)).float().mean().item())
        return np.asarray(accuracies)


def _support_query(features: torch.Tensor, tasks: TaskIndices,
                   flipped: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, M, D) support and (T, Q, D) query features of tasks indexing `features`, with their labels."""
    support = features[torch.from_numpy(tasks.support).to(features.device)]
    labels = tasks.support_labels().to(features.device)
    if flipped is not None:  # the paper's protocol: every support image also enters flipped
        support = torch.cat([support, flipped[torch.from_numpy(tasks.support).to(features.device)]], dim=1)
        labels = torch.cat([labels, labels], dim=1)
    query = features[torch.from_numpy(tasks.query).to(features.device)]
    return support, labels, query, tasks.query_labels().to(features.device)
