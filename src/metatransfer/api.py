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

The model itself is a `metatransfer.model.FewShotModel`, the object meta-test scores; reading it
from disk lives in `metatransfer.loading`, below both this module and `metatransfer.export`, so
that the API and the exporter share one reader without importing each other. This module holds
what only a user of arbitrary images needs: images to inputs, labels to classes.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from metatransfer.config import check_shift_pixels
from metatransfer.data._decode import RESAMPLE
from metatransfer.loading import BUNDLE_FILE, load_bundle_model, load_run_model
from metatransfer.model import FewShotModel, Preprocessing

__all__ = ["ImageLike", "Preprocessing", "load_image", "load_images", "FewShotClassifier"]

ImageLike = Union[str, Path, Image.Image, np.ndarray]


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
    classes other than theta's rows, every row starts at theta's mean row (`expand_head`). This
    class is the user-facing shell of a `FewShotModel` (`model`): it turns images of any kind into
    the model's input and labels of any kind into class indices; the model does the rest, as it
    does in meta-test.

    Args:
        model: the trained model (backbone, base-learner with theta, preprocessing, test-time views),
            as `from_run` / `from_export` / `load` read it.
        device: where features and fine-tuning run ("auto", "cpu", "cuda", ...).
    """

    def __init__(self, model: FewShotModel, *, device: str | torch.device = "cpu") -> None:
        from metatransfer.run import resolve_device

        # float32 features without autocast, so a run directory and its exports give the same predictions
        self.model = dataclasses.replace(model, amp=False, channels_last=False)
        self.model.to(resolve_device(device) if isinstance(device, str) else device)
        self.classes_: list[Hashable] = []

    backbone = property(lambda self: self.model.backbone, doc="maps normalised (B, C, H, W) images to (B, D) features")
    preprocessing = property(lambda self: self.model.preprocessing, doc="how inputs are prepared (`Preprocessing`)")
    learner = property(lambda self: self.model.learner, doc="the base-learner, with its theta and temperature")
    info = property(lambda self: self.model.info, doc="plain values describing the model (source, dataset, ...)")
    device = property(lambda self: self.model.device)
    steps = property(lambda self: self.model.learner.steps, doc="the inner loop's steps (`base_learner.steps`)")
    lr = property(lambda self: self.model.learner.lr, doc="the inner loop's step size (`base_learner.lr`)")

    @property
    def flip_average(self) -> bool:
        """Each image's feature is the mean of its own and its mirror image's (the run's `views.flip`)."""
        return self.model.flip_average

    @flip_average.setter
    def flip_average(self, value: bool) -> None:
        self.model.flip_average = bool(value)

    @property
    def shift_views(self) -> int:
        """Features also averaged over copies shifted by this many pixels (the run's `views.shift_pixels`); 0 = off."""
        return self.model.shift_views

    @shift_views.setter
    def shift_views(self, value: int) -> None:
        self.model.shift_views = check_shift_pixels(int(value))

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
        return cls(load_run_model(Path(run_dir), checkpoint=checkpoint, data_root=data_root), device=device)

    @classmethod
    def from_export(cls, export_dir: str | Path, *, device: str = "auto") -> "FewShotClassifier":
        """The model of a bundle written by `mtl export` (safetensors, ONNX or TorchScript)."""
        return cls(load_bundle_model(Path(export_dir)), device=device)

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
        return self.model.features(arrays)

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
        self.model.fit(support.unsqueeze(0), targets.unsqueeze(0), len(classes))
        self.classes_ = classes
        return self

    def _check_fitted(self) -> None:
        if self.model.head is None or not self.classes_:
            raise RuntimeError("This FewShotClassifier is not fitted; call fit(support_images, labels) first")

    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Class probabilities, (n_images, n_classes) float32; columns follow `classes_`."""
        self._check_fitted()
        query = self.features(images).unsqueeze(0)  # (1, n, D)
        logits = self.model.logits(query)[0]
        return torch.softmax(logits, dim=-1).cpu().numpy()

    def predict(self, images: Sequence[ImageLike] | np.ndarray) -> list[Hashable]:
        """The most probable class of each image (labels as given to `fit`)."""
        return [self.classes_[i] for i in self.predict_proba(images).argmax(axis=1)]

    def __repr__(self) -> str:
        source = self.info.get("source", "?")
        return (f"FewShotClassifier(source={source!r}, classes={self.classes_!r}, steps={self.steps}, lr={self.lr}, "
                f"flip_average={self.flip_average}, shift_views={self.shift_views})")
