"""Read a trained model from a run directory or an `mtl export` bundle.

The one place that turns what training or `mtl export` left on disk into the parts of a model
(backbone, theta, preprocessing, base-learner settings). It sits below both of its users and
imports neither: `metatransfer.api` (`FewShotClassifier.from_run` / `from_export` / `load`) builds
classifiers from `load_run_parts` and `load_bundle_parts`; `metatransfer.export` writes bundles
with the constants here and reads each one back once to check it; `read_bundle` and
`bundle_backbone` also give a bare backbone from a bundle to whoever needs one.

A bundle is a folder holding

    bundle.json          format, backbone name/width/in_chans, preprocessing (image size, channels,
                         mean, std, invert), base-learner settings (steps, lr), file checksums
    backbone.safetensors | backbone.onnx | backbone.pt    the backbone in the chosen format
    head.safetensors     the meta-learned FC initialisation theta: head.weight (N0, D), head.bias (N0,),
                         head.temperature () (cosine logits); with base_learner.ensemble=e3bm also
                         E3BM's hyperprior learners, hyperprior.* (`models.head.Hyperprior`)
    MODEL_CARD.md        backbone, data, training settings, results with 95% CI

Every backbone file maps normalised float32 images (batch, channels, size, size), i.e.
(pixel / 255 - mean) / std, to (batch, out_features) features; scaling-shifting is folded into the
conv weights (Sun et al., CVPR 2019, section 4.2), so a safetensors backbone loads into the plain
network once the folded biases are added (`_add_folded_biases`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file

from metatransfer.data._sources import sha256_file
from metatransfer.data.cache import read_manifest
from metatransfer.models.backbones import create_backbone
from metatransfer.models.head import BaseLearner
from metatransfer.phases.meta_test import load_meta_model
from metatransfer.run import checkpoint_exists, read_run_config

__all__ = [
    "BUNDLE_FILE", "BUNDLE_FORMAT", "FORMATS", "HEAD_FILE", "Preprocessing", "OnnxBackbone", "read_bundle",
    "bundle_backbone", "load_bundle_parts", "load_run_parts",
]

BUNDLE_FILE = "bundle.json"
# 2 added flip_average (the test-time flip), 3 shift_views (test-time shifts), 4 base_learner.ensemble (E3BM's
# hyperprior learners): an older reader would silently drop them
BUNDLE_FORMAT = 4
_READABLE_FORMATS = tuple(range(1, BUNDLE_FORMAT + 1))  # a format-1 bundle has no test-time flip, 1-2 no shifts, 1-3 no ensemble
FORMATS = {"safetensors": "backbone.safetensors", "onnx": "backbone.onnx", "torchscript": "backbone.pt"}
HEAD_FILE = "head.safetensors"


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
    def from_dict(cls, values: dict[str, Any]) -> "Preprocessing":
        return cls(**{**values, "mean": tuple(values["mean"]), "std": tuple(values["std"])})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std), "resize": "square, lanczos",
                "alpha": "composited on white"}


# --- reading a run directory --------------------------------------------------------------------


def _run_preprocessing(run_dir: Path, dataset: str, root: Path) -> tuple[Preprocessing, dict[str, Any]]:
    try:
        manifest = read_manifest(root, dataset)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{run_dir}: the model's preprocessing (image size, channels, mean/std) is read from its prepared "
            f"dataset {dataset!r}, expected at {root / dataset} (data.root in config.yaml), which is missing. "
            f"Pass the folder that holds it with --data-root (Python: data_root=), or predict from a bundle "
            f"made by `mtl export` while the data is present: bundles are self-contained"
        ) from None
    return Preprocessing.from_manifest(manifest), manifest


def load_run_parts(run_dir: Path, *, data_root: str | Path | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `FewShotClassifier` for a run directory (backbone on the CPU).

    `checkpoint` names a meta_train checkpoint (best, last, best-5shot with meta_train.val_shots);
    by default meta_train/best, else the pre-trained backbone.

    Raises:
        FileNotFoundError: no run directory, no checkpoint, or the prepared dataset is missing.
        ValueError: a checkpoint that does not fit the run's config.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist")
    config = read_run_config(run_dir)
    if checkpoint is not None and not checkpoint_exists(run_dir / "meta_train" / checkpoint):
        kept = sorted(p.stem for p in (run_dir / "meta_train").glob("*.json") if checkpoint_exists(p.with_suffix("")))
        raise FileNotFoundError(f"{run_dir} has no meta_train/{checkpoint} checkpoint; it has: {', '.join(kept) or 'none (not meta-trained)'}")
    root = Path(data_root) if data_root is not None else Path(config.data.root)
    preprocessing, manifest = _run_preprocessing(run_dir, config.data.name, root)
    if config.data.mean:  # a transfer run normalised with its source's statistics (model.init_normalisation=source)
        preprocessing = dataclasses.replace(preprocessing, mean=tuple(config.data.mean), std=tuple(config.data.std))
    backbone, weight, bias, temperature, source, learner = load_meta_model(run_dir, config, preprocessing.channels, torch.device("cpu"), checkpoint)
    backbone = backbone.to(memory_format=torch.contiguous_format).float().eval()
    info = {
        "source": f"{run_dir} ({source})",
        "checkpoint": source,
        "run_dir": str(run_dir.resolve()),
        "dataset": config.data.name,
        "dataset_protocol": manifest.get("protocol"),
        "backbone": config.model.backbone,
        "width": config.model.width,
        "in_chans": preprocessing.channels,
        "out_features": backbone.out_features,
        "adapt": config.model.adapt if source.startswith("meta_train") else "none (pre-trained backbone only)",
        "ss_mode": config.model.ss_mode,
        "ss_shortcuts": config.model.ss_shortcuts,
    }
    return {
        "backbone": backbone, "head_weight": weight, "head_bias": bias, "preprocessing": preprocessing,
        "steps": config.base_learner.steps, "lr": config.base_learner.lr, "bn_mode": config.model.bn_mode, "info": info,
        "flip_average": config.model.flip_average, "shift_views": config.model.shift_views,
        "learner": learner, "temperature": temperature,
    }


# --- reading a bundle ---------------------------------------------------------------------------


class OnnxBackbone:
    """An ONNX backbone run by ONNX Runtime: normalised (B, C, H, W) float32 -> (B, D) features."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ValueError(
                f"{path} is an ONNX model and onnxruntime is not installed; pip install 'metatransfer[onnx]'"
            ) from None
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _add_folded_biases(backbone: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Folding gives every scale-shifted conv a bias (b + Phi_S2), also where the plain conv has none."""
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d) and module.bias is None and f"{name}.bias" in state:
            module.bias = nn.Parameter(torch.zeros(module.out_channels))


def read_bundle(export_dir: Path) -> dict[str, Any]:
    """The checked contents of a bundle's bundle.json: its format, and every listed file present and intact.

    Raises:
        FileNotFoundError: the folder, its bundle.json, or a file it lists is missing.
        ValueError: bundle.json is not JSON or of another format version, or a file fails its checksum.
    """
    if not export_dir.is_dir():
        raise FileNotFoundError(f"Export directory {export_dir} does not exist")
    path = export_dir / BUNDLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir} is not an exported model: it has no {BUNDLE_FILE} (write one with `mtl export`)")
    try:
        bundle = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); export the model again") from None
    if bundle.get("format_version") not in _READABLE_FORMATS:
        raise ValueError(f"{path} has format_version {bundle.get('format_version')!r}; this metatransfer reads "
                         f"{', '.join(map(str, _READABLE_FORMATS))}: export the model again, or update metatransfer")
    for name, digest in bundle["sha256"].items():
        file = export_dir / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}, listed in {BUNDLE_FILE}, is missing; copy the whole export folder")
        if sha256_file(file) != digest:
            raise ValueError(f"{file} does not match its checksum in {BUNDLE_FILE}: it is damaged or from another export")
    return bundle


def bundle_backbone(export_dir: Path, bundle: dict[str, Any]) -> nn.Module | Callable[[torch.Tensor], torch.Tensor]:
    """The backbone of a bundle read by `read_bundle`, on the CPU in eval mode.

    A safetensors bundle gives the plain `nn.Module` (scaling-shifting folded in), TorchScript a
    `ScriptModule`, ONNX an `OnnxBackbone` (a callable, not a module; needs onnxruntime).
    """
    path, spec = export_dir / bundle["backbone_file"], bundle["backbone"]
    if bundle["format"] == "onnx":
        return OnnxBackbone(path)
    if bundle["format"] == "torchscript":
        with warnings.catch_warnings():  # as when it was written: the user chose TorchScript, deprecated in torch
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    backbone = create_backbone(spec["name"], in_chans=spec["in_chans"], width=spec["width"], drop_rate=0.0)
    state = load_file(str(path))
    _add_folded_biases(backbone, state)
    backbone.load_state_dict(state)
    return backbone.eval()


def load_bundle_parts(export_dir: Path) -> dict[str, Any]:
    """The keyword arguments of `FewShotClassifier` for an export bundle.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a damaged bundle, or an ONNX bundle without onnxruntime.
    """
    bundle = read_bundle(export_dir)
    head = load_file(str(export_dir / bundle["head_file"]))
    keys = ("image_size", "channels", "mean", "std", "invert")
    info = {**bundle["source"], "source": f"{export_dir} ({bundle['format']} export of {bundle['source']['checkpoint']})",
            "format": bundle["format"]}
    return {
        "backbone": bundle_backbone(export_dir, bundle), "head_weight": head["head.weight"], "head_bias": head["head.bias"],
        "preprocessing": Preprocessing.from_dict({key: bundle["preprocessing"][key] for key in keys}),
        "steps": bundle["base_learner"]["steps"], "lr": bundle["base_learner"]["lr"], "bn_mode": bundle["bn_mode"], "info": info,
        "flip_average": bundle.get("flip_average", False),  # older bundles: off, as their runs scored
        "shift_views": bundle.get("shift_views", 0),
        "learner": BaseLearner.from_config(bundle["base_learner"], head),  # older bundles hold steps and lr only: the defaults
        "temperature": float(head["head.temperature"]) if "head.temperature" in head else 10.0,  # unused by linear logits
    }
