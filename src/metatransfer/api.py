"""Few-shot classification of a user's own images with a trained MTL model: fit, then predict.

Two steps, as easyfsl's `FewShotClassifier`: `fit(support_images, labels)` fine-tunes the
base-learner (one FC layer, from the meta-learned initialisation theta) on the support features
with the batched inner loop of `models.head.BaseLearner`; `predict` / `predict_proba`
score query images with the adapted FC. The backbone (scaling-shifting folded into its convs) is
frozen throughout: Sun et al., CVPR 2019, section 4 (meta-test phase).

A model comes from a run directory (`from_run`: its best meta-train checkpoint, else its pre-trained
backbone with a zero head) or from a bundle written by `mtl export` (`from_export`); `load` tells
them apart. Images are PIL images, file paths or uint8 arrays of any size and mode; they are turned
into what the model saw in training by `Preprocessing` (square LANCZOS resize to the stored size,
as `mtl data prepare` does; alpha composited on white; inverted for Omniglot-style models, whose
cache holds ink 255 on a 0 background). Features are computed in float32 (no autocast), so a run
directory and its exports give the same predictions.

Reading a model from disk, and `Preprocessing` (re-exported here), live in `metatransfer.loading`,
a module below both this one and `metatransfer.export` (which writes bundles), so that the API
and the exporter share one reader without importing each other. This module holds what happens
after loading: images to inputs, features, fit and predict.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

from metatransfer.config import check_shift_views
from metatransfer.data._decode import RESAMPLE
from metatransfer.data.augment import to_float
from metatransfer.loading import BUNDLE_FILE, Preprocessing, load_bundle_parts, load_run_parts
from metatransfer.models.head import BaseLearner
from metatransfer.phases.features import batch_statistics, embed, images_per_forward

__all__ = ["ImageLike", "Preprocessing", "load_image", "load_images", "FewShotClassifier"]

ImageLike = Union[str, Path, Image.Image, np.ndarray]
_BATCH = 256  # images per backbone forward


def _describe(item: Any) -> str:
    return repr(str(item)) if isinstance(item, (str, Path)) else f"a {type(item).__name__}"


def _open(item: ImageLike, size: int, mode: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4))):
            raise ValueError(
                f"An image array must be uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {item.dtype} {item.shape}"
            )
        return Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"Image file {path} does not exist")
        image = Image.open(io.BytesIO(path.read_bytes()))
        if image.format == "JPEG":
            image.draft(mode, (size, size))  # decode at reduced scale, as the data preparation does
        return ImageOps.exif_transpose(image)  # phone photos: apply the stored orientation
    raise ValueError(f"Cannot use {type(item).__name__} as an image; pass a PIL image, a file path or a uint8 array")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image on white (a transparent PNG would otherwise turn black)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image


def load_image(item: ImageLike, preprocessing: Preprocessing) -> np.ndarray:
    """One image -> uint8 (image_size, image_size, channels), as the training cache stores images.

    Raises:
        ValueError: the item is not a readable image (the message names the file).
        FileNotFoundError: a path that does not exist.
    """
    size, mode = preprocessing.image_size, ("L" if preprocessing.channels == 1 else "RGB")
    try:
        image = _flatten_alpha(_open(item, size, mode)).convert(mode)
        if image.size != (size, size):
            image = image.resize((size, size), RESAMPLE)
        array = np.asarray(image, dtype=np.uint8)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as error:  # PIL raises many types for a file that is not an image
        raise ValueError(f"Cannot read {_describe(item)} as an image: {error}") from None
    if array.ndim == 2:
        array = array[..., None]
    return 255 - array if preprocessing.invert else array


def load_images(items: Sequence[ImageLike], preprocessing: Preprocessing) -> np.ndarray:
    """Images -> uint8 (N, image_size, image_size, channels)."""
    if isinstance(items, (str, Path, Image.Image)) or (isinstance(items, np.ndarray) and items.ndim <= 3):
        raise ValueError("Pass a list of images (or an (N, H, W[, C]) uint8 array), not a single image")
    arrays = [load_image(item, preprocessing) for item in items]
    if not arrays:
        raise ValueError("No images given")
    return np.stack(arrays)


def _sorted_classes(labels: Sequence[Hashable]) -> list[Hashable]:
    unique = list(dict.fromkeys(labels))
    try:
        return sorted(unique)
    except TypeError:  # labels of mixed types: keep the order of first appearance
        return unique


class FewShotClassifier:
    """An MTL model as a few-shot classifier of arbitrary classes: `fit` on support, `predict` queries.

    Sun et al., "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019: the base-learner is
    fine-tuned from theta on the support features for `steps` steps of size `lr`; for a number of
    classes other than theta's rows, every row starts at theta's mean row (`expand_head`).

    Args:
        backbone: maps normalised (B, C, H, W) float32 images to (B, D) features; an `nn.Module`
            (eval mode) or a callable such as an ONNX Runtime session wrapper.
        head_weight: theta, (N0, D).
        head_bias: (N0,).
        preprocessing: how inputs are prepared (`Preprocessing`).
        steps, lr: the inner loop's settings (the run's `base_learner.steps` and `.lr`).
        learner: the run's whole base-learner (`models.head.BaseLearner`: prototype init, cosine
            logits); when given, it supersedes `steps` and `lr`.
        temperature: the cosine logits' (meta-learned) temperature.
        device: where features and fine-tuning run ("auto", "cpu", "cuda", ...).
        bn_mode: "frozen" (running statistics) or "batch" (the support set and the query set each
            normalised by their own statistics, the transductive mode of the TF code).
        flip_average: each image's feature is the mean of its own and its mirror image's (the run's
            `model.flip_average`), as validation and meta-test scored the model.
        shift_views: also averaged over copies shifted by this many pixels (the run's
            `model.shift_views`), as meta-test scored the model; 0 = off.
        info: plain values describing the model (source, dataset, ...), for summaries.
    """

    def __init__(
        self,
        backbone: nn.Module | Callable[[torch.Tensor], torch.Tensor],
        head_weight: torch.Tensor,
        head_bias: torch.Tensor,
        *,
        preprocessing: Preprocessing,
        steps: int,
        lr: float,
        device: str | torch.device = "cpu",
        bn_mode: str = "frozen",
        flip_average: bool = False,
        shift_views: int = 0,
        info: dict[str, Any] | None = None,
        learner: BaseLearner | None = None,
        temperature: float = 10.0,
    ) -> None:
        from metatransfer.run import resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else device
        if isinstance(backbone, nn.Module):
            backbone = backbone.to(self.device).eval()
        self.backbone = backbone
        self.head_weight = head_weight.detach().float().to(self.device)
        self.head_bias = head_bias.detach().float().to(self.device)
        self.preprocessing = preprocessing
        self.learner = learner if learner is not None else BaseLearner(steps=int(steps), lr=float(lr))
        self.steps, self.lr, self.bn_mode, self.temperature = self.learner.steps, self.learner.lr, bn_mode, float(temperature)
        self.flip_average, self.shift_views = bool(flip_average), check_shift_views(int(shift_views))
        self.info = dict(info or {})
        self.classes_: list[Hashable] = []
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    # --- constructors --------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str | Path, *, data_root: str | Path | None = None, device: str = "auto",
                 checkpoint: str | None = None) -> "FewShotClassifier":
        """The model of a run directory (meta_train/best, else pretrain/best with a zero head).

        Args:
            run_dir: a directory written by `mtl run` (holds config.yaml and checkpoints).
            checkpoint: another meta_train checkpoint: last, or best-5shot (kept by 5-shot
                validation with meta_train.val_shots) when the support sets hold 5 images a class.
            data_root: where the prepared dataset lives, if not at the run's `data.root` any more;
                its manifest gives the image size, channels and mean/std.
            device: "auto", "cpu", "cuda", ...
        """
        return cls(**load_run_parts(Path(run_dir), data_root=data_root, checkpoint=checkpoint), device=device)

    @classmethod
    def from_export(cls, export_dir: str | Path, *, device: str = "auto") -> "FewShotClassifier":
        """The model of a bundle written by `mtl export` (safetensors, ONNX or TorchScript)."""
        return cls(**load_bundle_parts(Path(export_dir)), device=device)

    @classmethod
    def load(cls, path: str | Path, *, data_root: str | Path | None = None, device: str = "auto",
             checkpoint: str | None = None) -> "FewShotClassifier":
        """A run directory or an export bundle, whichever `path` is (`checkpoint`: run directories only)."""
        path = Path(path)
        if not path.is_dir():
            problem = "is a file, not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"Model directory {path} {problem}; pass a run directory or an `mtl export` folder")
        if (path / BUNDLE_FILE).is_file():
            if checkpoint is not None:
                raise ValueError(f"{path} is an exported model, which holds one checkpoint; choose the checkpoint when exporting "
                                 "(`mtl export --checkpoint`), or pass the run directory")
            return cls.from_export(path, device=device)
        if (path / "config.yaml").is_file():
            return cls.from_run(path, data_root=data_root, device=device, checkpoint=checkpoint)
        raise FileNotFoundError(
            f"{path} is neither a run directory (no config.yaml) nor an exported model (no {BUNDLE_FILE})"
        )

    # --- features ------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return len(self.classes_)

    @torch.no_grad()
    def features(self, images: Sequence[ImageLike] | np.ndarray) -> torch.Tensor:
        """Images -> (N, D) float32 features on `device`."""
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.dtype == np.uint8 and images.shape[1:] == (
            self.preprocessing.image_size, self.preprocessing.image_size, self.preprocessing.channels,
        ) and not self.preprocessing.invert:
            arrays = images  # already in the model's format
        else:
            arrays = load_images(list(images) if isinstance(images, np.ndarray) else images, self.preprocessing)
        prep = self.preprocessing
        batch_mode = self.bn_mode == "batch" and isinstance(self.backbone, nn.Module)
        if batch_mode:  # one set, one set of statistics: forward it whole
            with batch_statistics(self.backbone):
                x = to_float(torch.from_numpy(np.ascontiguousarray(arrays)), prep.mean, prep.std, device=self.device)
                return embed(self.backbone, x, self.flip_average, self.shift_views)
        chunks = []
        step = images_per_forward(_BATCH, self.shift_views)
        for start in range(0, len(arrays), step):
            batch = torch.from_numpy(np.ascontiguousarray(arrays[start : start + step]))
            x = to_float(batch, prep.mean, prep.std, device=self.device)
            chunks.append(embed(self.backbone, x, self.flip_average, self.shift_views).to(self.device))
        return torch.cat(chunks)

    # --- the two steps -------------------------------------------------------------------------

    @torch.no_grad()
    def fit(self, support_images: Sequence[ImageLike] | np.ndarray, labels: Sequence[Hashable]) -> "FewShotClassifier":
        """Fine-tune the base-learner on a support set; the classes are the sorted unique labels.

        Args:
            support_images: N images (paths, PIL images or uint8 arrays).
            labels: N hashable labels (strings, ints, ...), at least two distinct ones.

        Returns:
            self, with `classes_` set.

        Raises:
            ValueError: fewer than two classes, or a number of labels other than the number of images.
        """
        labels = list(labels)
        if len(labels) != len(support_images):
            raise ValueError(f"fit got {len(support_images)} support images but {len(labels)} labels")
        classes = _sorted_classes(labels)
        if len(classes) < 2:
            raise ValueError(f"fit needs at least 2 classes, got {len(classes)} ({classes}); add another class")
        index = {label: position for position, label in enumerate(classes)}
        support = self.features(support_images)  # (M, D)
        targets = torch.tensor([index[label] for label in labels], device=self.device)
        # The same base-learner as meta-train and meta-test (it takes care of autograd where it needs it).
        weight, bias = self.learner.adapt(support.unsqueeze(0), targets.unsqueeze(0), self.head_weight, self.head_bias, len(classes),
                                          temperature=self.temperature)
        self.classes_, self._weight, self._bias = classes, weight.detach(), bias.detach()
        return self

    def _check_fitted(self) -> None:
        if self._weight is None:
            raise RuntimeError("This FewShotClassifier is not fitted; call fit(support_images, labels) first")

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Class probabilities, (n_images, n_classes) float32; columns follow `classes_`."""
        self._check_fitted()
        query = self.features(images).unsqueeze(0)  # (1, n, D)
        logits = self.learner.logits_of(query, self._weight, self._bias, self.temperature)[0]
        return torch.softmax(logits, dim=-1).cpu().numpy()

    def predict(self, images: Sequence[ImageLike] | np.ndarray) -> list[Hashable]:
        """The most probable class of each image (labels as given to `fit`)."""
        return [self.classes_[i] for i in self.predict_proba(images).argmax(axis=1)]

    def __repr__(self) -> str:
        source = self.info.get("source", "?")
        return (f"FewShotClassifier(source={source!r}, classes={self.classes_!r}, steps={self.steps}, lr={self.lr}, "
                f"flip_average={self.flip_average}, shift_views={self.shift_views})")
