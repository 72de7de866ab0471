"""Read a trained model from a run directory or an `mtl export` bundle.

The one place that turns what training or `mtl export` left on disk into a `FewShotModel`
(backbone, base-learner with its theta, preprocessing, test-time views), and where a run keeps its
checkpoints. It sits below all of its users and imports none of them: the phases (meta-test
scores `load_run_model`, meta-training starts from `load_pretrained_backbone`),
`metatransfer.api` (`FewShotClassifier.from_run` / `from_export` / `load`) and
`metatransfer.export`, which writes bundles with the constants here and reads each one back once
to check it; `read_bundle` and `bundle_backbone` also give a bare backbone from a bundle to
whoever needs one.

A bundle is a folder holding

    bundle.json          format, backbone name/width/in_chans, preprocessing (image size, channels,
                         mean, std, invert), base-learner settings (all of `BaseLearner.to_dict()`:
                         what scoring needs), file checksums
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
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file

from metatransfer.config import Config
from metatransfer.data._sources import sha256_file
from metatransfer.data.cache import read_manifest
from metatransfer.model import FewShotModel, Preprocessing
from metatransfer.models.backbones import create_backbone
from metatransfer.models.head import BaseLearner
from metatransfer.models.scale_shift import apply_scale_shift, fold_scale_shift
from metatransfer.run import checkpoint_exists, load_checkpoint, read_run_config, tensors_under

__all__ = [
    "BUNDLE_FILE", "BUNDLE_FORMAT", "FORMATS", "HEAD_FILE", "Preprocessing", "OnnxBackbone", "read_bundle",
    "bundle_backbone", "load_bundle_model", "load_run_model", "load_start_model", "build_backbone", "backbone_meta", "pretrained_stem",
    "shot_best_stem", "load_pretrained_backbone",
]

BUNDLE_FILE = "bundle.json"
# 2 added flip_average (the test-time flip), 3 shift_views (test-time shifts), 4 base_learner.ensemble (E3BM's
# hyperprior learners): an older reader would silently drop them
BUNDLE_FORMAT = 4
_READABLE_FORMATS = tuple(range(1, BUNDLE_FORMAT + 1))  # a format-1 bundle has no test-time flip, 1-2 no shifts, 1-3 no ensemble
FORMATS = {"safetensors": "backbone.safetensors", "onnx": "backbone.onnx", "torchscript": "backbone.pt"}
HEAD_FILE = "head.safetensors"


# --- a run's checkpoints -----------------------------------------------------------------------


def build_backbone(config: Config, in_chans: int) -> nn.Module:
    """A fresh backbone of the run's architecture (`model.*`), as pre-training starts it and checkpoints rebuild it."""
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


# --- reading a run directory --------------------------------------------------------------------


def _run_preprocessing(run_dir: Path, config: Config, root: Path) -> tuple[Preprocessing, dict[str, Any]]:
    """The run's input, from its prepared dataset's manifest, normalised with `data.mean`/`data.std`
    where set (a transfer run with `transfer.normalisation=source`)."""
    try:
        manifest = read_manifest(root, config.data.name)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{run_dir}: the model's preprocessing (image size, channels, mean/std) is read from its prepared "
            f"dataset {config.data.name!r}, expected at {root / config.data.name} (data.root in config.yaml), which is missing. "
            f"Pass the folder that holds it with --data-root (Python: data_root=), or predict from a bundle "
            f"made by `mtl export` while the data is present: bundles are self-contained"
        ) from None
    preprocessing = Preprocessing.from_manifest(manifest)
    if config.data.mean:
        preprocessing = dataclasses.replace(preprocessing, mean=tuple(config.data.mean), std=tuple(config.data.std))
    return preprocessing, manifest


def _run_model(config: Config, backbone: nn.Module, learner: BaseLearner, preprocessing: Preprocessing,
               info: dict[str, Any]) -> FewShotModel:
    """The run's parts as one model with the run's test-time views: on the CPU in eval mode, in float32
    (as a bundle is; meta-test opts into the run's `amp` and `channels_last`)."""
    return FewShotModel(backbone.eval(), learner, preprocessing, bn_mode=config.model.bn_mode, flip_average=config.views.flip,
                        shift_views=config.views.shift_pixels, info=info)


def load_start_model(run_dir: Path, config: Config, *, data_root: str | Path | None = None) -> FewShotModel:
    """What meta-training starts from: the pre-trained backbone (`meta_train.init_checkpoint`,
    identity SS) with the base-learner at its untrained init, drawn as meta-training draws it; the
    start the paired gain is measured against, and the run's model before meta-training."""
    preprocessing, _ = _run_preprocessing(run_dir, config, Path(data_root) if data_root is not None else Path(config.data.root))
    backbone = load_pretrained_backbone(config, run_dir, preprocessing.channels)
    learner = BaseLearner.untrained(config.base_learner, backbone.out_features, n_way=config.meta_train.n_way, seed=config.seed)
    source = f"pretrain/{pretrained_stem(config, run_dir).name} (no meta-training)"
    return _run_model(config, backbone, learner, preprocessing, {"checkpoint": source})


def load_run_model(run_dir: Path, config: Config | None = None, *, checkpoint: str | None = None,
                   data_root: str | Path | None = None) -> FewShotModel:
    """The model of a run directory, on the CPU: the meta-trained backbone (SS folded) and
    base-learner of meta_train/`checkpoint` (default `meta_test.checkpoint`); without
    meta-training, `load_start_model`'s (the paper's 'no meta-training' row).

    Args:
        run_dir: a directory written by `mtl run`.
        config: the run's config, as rescoring may override it (default: its config.yaml).
        checkpoint: a meta_train checkpoint (best, last, best-5shot with meta_train.val_shots).
        data_root: where the run's prepared dataset lives, if not at its `data.root` any more
            (its manifest gives the image size, channels and statistics).

    Raises:
        FileNotFoundError: no run directory, no such checkpoint, or the prepared dataset is missing.
        ValueError: a checkpoint that does not fit the run's config.
    """
    if not run_dir.is_dir():
        raise FileNotFoundError(f"Run directory {run_dir} does not exist")
    config = config if config is not None else read_run_config(run_dir)
    chosen = checkpoint or config.meta_test.checkpoint
    if checkpoint is not None and not checkpoint_exists(run_dir / "meta_train" / checkpoint):
        kept = sorted(p.stem for p in (run_dir / "meta_train").glob("*.json") if checkpoint_exists(p.with_suffix("")))
        raise FileNotFoundError(f"{run_dir} has no meta_train/{checkpoint} checkpoint; it has: {', '.join(kept) or 'none (not meta-trained)'}")
    root = Path(data_root) if data_root is not None else Path(config.data.root)
    meta_stem, pre_stem = run_dir / "meta_train" / chosen, pretrained_stem(config, run_dir)
    if checkpoint_exists(meta_stem):
        preprocessing, manifest = _run_preprocessing(run_dir, config, root)
        backbone = build_backbone(config, preprocessing.channels)
        expect = {"backbone": config.model.backbone, "width": config.model.width, "in_chans": preprocessing.channels, "adapt": config.model.adapt}
        tensors, meta = load_checkpoint(meta_stem, expect=expect)
        if meta["adapt"] == "ss":
            apply_scale_shift(backbone, mode=meta["ss_mode"], include_shortcuts=meta.get("ss_shortcuts", False))
        backbone.load_state_dict(tensors_under(tensors, "backbone"))
        fold_scale_shift(backbone)
        model = _run_model(config, backbone, BaseLearner.from_config(config.base_learner, tensors, source=f"checkpoint {meta_stem}"), preprocessing,
                           {"checkpoint": f"meta_train/{chosen}"})
    elif checkpoint_exists(pre_stem):
        model = load_start_model(run_dir, config, data_root=root)
        manifest = read_manifest(root, config.data.name)
    else:
        raise FileNotFoundError(f"{run_dir} has no meta_train/{chosen} nor pretrain/{pre_stem.name} checkpoint; "
                                "run `mtl pretrain` (and `mtl meta-train`) first.")
    source = model.info["checkpoint"]
    model.info = {
        "source": f"{run_dir} ({source})",
        "checkpoint": source,
        "run_dir": str(run_dir.resolve()),
        "dataset": config.data.name,
        "dataset_protocol": manifest.get("protocol"),
        "backbone": config.model.backbone,
        "width": config.model.width,
        "in_chans": model.preprocessing.channels,
        "out_features": model.backbone.out_features,
        "adapt": config.model.adapt if source.startswith("meta_train") else "none (pre-trained backbone only)",
        "ss_mode": config.model.ss_mode,
    }
    return model


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


def load_bundle_model(export_dir: Path) -> FewShotModel:
    """The model of an export bundle, on the CPU, float32 without autocast (`amp` off).

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a damaged bundle, or an ONNX bundle without onnxruntime.
    """
    bundle = read_bundle(export_dir)
    head = load_file(str(export_dir / bundle["head_file"]))
    keys = ("image_size", "channels", "mean", "std", "invert")
    info = {**bundle["source"], "source": f"{export_dir} ({bundle['format']} export of {bundle['source']['checkpoint']})",
            "format": bundle["format"]}
    return FewShotModel(
        bundle_backbone(export_dir, bundle),
        BaseLearner.from_config(bundle["base_learner"], head, source=f"bundle {export_dir / bundle['head_file']}"),  # older bundles hold steps and lr only: the defaults
        Preprocessing.from_dict({key: bundle["preprocessing"][key] for key in keys}),
        bn_mode=bundle["bn_mode"],
        flip_average=bundle.get("flip_average", False),  # older bundles: off, as their runs scored
        shift_views=bundle.get("shift_views", 0),
        info=info,
    )
