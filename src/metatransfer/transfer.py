"""Start a run from another run's (or an export bundle's) backbone: meta-transfer to a new domain.

A user with a few dozen classes cannot pre-train a deep backbone well on their own images; MTL's
point is to *transfer* one pre-trained on a large dataset (Sun et al., CVPR 2019, section 3). With
`transfer.source` (CLI `--init-from PATH`) pre-training starts from the backbone of PATH: a run
directory (its `pretrain/best`) or a safetensors bundle written by `mtl export`. Pre-training then
fine-tunes it on the new base classes for `pretrain.epochs` (0 keeps it as it is, with a new
classifier only where needed), and meta-training learns the scaling-shifting on top.

Channels: grey data meets an RGB backbone by summing its first conv over the three input channels,
which is exactly repeating the grey channel; RGB data meets a grey backbone through luma weights
(ITU-R 601: 0.299, 0.587, 0.114, as PIL's "L"), exactly "convert to grey, then normalise" under the
new dataset's statistics. The run's backbone then takes the new data's channel count, so meta-test,
predict and export need nothing special.

Normalisation (`transfer.normalisation`): `dataset` (default) standardises the new images with
their own statistics, so the first conv sees zero-mean, unit-variance inputs as it did in its own
pre-training, and the channel conversion above is exact. `source` uses the statistics the backbone
was trained with (recorded into `data.mean`/`data.std` when the run starts, so every phase, predict
and export use them), which suits new data of the same kind of images; across grey and RGB it is an
approximation (the source's channel-averaged statistics).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from metatransfer.config import Config
from metatransfer.data.cache import read_manifest
from metatransfer.run import load_checkpoint, read_run_config, tensors_under

__all__ = ["LUMA", "InitSource", "read_init_source", "resolve_init", "adapt_input_conv", "load_init_backbone"]

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, PIL's convert("L")


@dataclass(frozen=True)
class InitSource:
    """A backbone to start from, with what is needed to check and record it.

    Attributes:
        path: the run directory or bundle folder.
        kind: "run" or "bundle".
        backbone, width, in_chans, out_features: its architecture.
        sha256: checksum of its tensors file (run: pretrain/best.safetensors; bundle: backbone file).
        mean, std: the input normalisation it was trained with (None if unknown).
        dataset: the dataset it was trained on.
        unfinished: for a run whose pre-training is still under way, says so ("" otherwise): its
            pretrain/best is the best epoch so far, not the run's final backbone.
    """

    path: Path
    kind: str
    backbone: str
    width: float
    in_chans: int
    out_features: int
    sha256: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    dataset: str
    bundle: dict[str, Any] | None = None  # a bundle's bundle.json, already checked
    unfinished: str = ""

    def describe(self) -> str:
        return f"{self.backbone} x{self.width:g} with {self.in_chans} input channel(s), trained on {self.dataset}"


def _run_source(path: Path) -> InitSource:
    stem = path / "pretrain" / "best"
    if not stem.with_suffix(".json").is_file():
        raise ValueError(f"--init-from {path}: this run directory has no pretrain/best checkpoint; pre-train it first "
                         "(`mtl pretrain --out ...`), or give another run or an `mtl export` bundle.")
    meta = json.loads(stem.with_suffix(".json").read_text())
    config = read_run_config(path)
    mean, std = (tuple(config.data.mean), tuple(config.data.std)) if config.data.mean else (None, None)
    if mean is None:
        try:
            manifest = read_manifest(config.data.root, config.data.name)
            mean, std = tuple(manifest["mean"]), tuple(manifest["std"])
        except (FileNotFoundError, ValueError):
            pass  # only transfer.normalisation=source needs them; it says so then
    last = path / "pretrain" / "last.json"
    progress = json.loads(last.read_text()) if last.is_file() else {}
    unfinished = "" if progress.get("complete", True) else (
        f"its pre-training is unfinished (at epoch {progress.get('epoch')} of {config.pretrain.epochs}): this is its best epoch so far, "
        f"{meta.get('epoch')}; finish it with `mtl run --resume {path}` for the final backbone")
    return InitSource(path=path, kind="run", backbone=meta["backbone"], width=float(meta["width"]), in_chans=int(meta["in_chans"]),
                      out_features=int(meta["out_features"]), sha256=meta["sha256"], mean=mean, std=std, dataset=meta.get("dataset", config.data.name),
                      unfinished=unfinished)


def _bundle_source(path: Path) -> InitSource:
    from metatransfer.loading import read_bundle

    bundle = read_bundle(path)
    if bundle["format"] != "safetensors":
        raise ValueError(f"--init-from {path}: a {bundle['format']} bundle cannot be trained; export the run with "
                         "`mtl export --format safetensors`, or give the run directory.")
    spec, prep = bundle["backbone"], bundle["preprocessing"]
    return InitSource(path=path, kind="bundle", backbone=spec["name"], width=float(spec["width"]), in_chans=int(spec["in_chans"]),
                      out_features=int(spec["out_features"]), sha256=bundle["sha256"][bundle["backbone_file"]],
                      mean=tuple(prep["mean"]), std=tuple(prep["std"]), dataset=bundle["source"]["dataset"], bundle=bundle)


def read_init_source(path: str | Path) -> InitSource:
    """Describe the backbone at `path`: a run directory or an `mtl export` bundle.

    Raises:
        ValueError: `path` is neither, or holds no trainable backbone; the message says what to give.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(f"--init-from {path}: {'not a directory' if path.exists() else 'does not exist'}; "
                         "give a run directory (with pretrain/best) or an `mtl export` bundle folder.")
    if (path / "bundle.json").is_file():
        return _bundle_source(path)
    if (path / "config.yaml").is_file():
        return _run_source(path)
    raise ValueError(f"--init-from {path}: neither a run directory (no config.yaml) nor an `mtl export` bundle "
                     "(no bundle.json).")


def _check_architecture(config: Config, source: InitSource) -> None:
    if (config.model.backbone, config.model.width) != (source.backbone, source.width):
        raise ValueError(
            f"--init-from {source.path} holds a {source.describe()}, but this run's model is {config.model.backbone} "
            f"x{config.model.width:g}; set model.backbone={source.backbone} model.width={source.width:g}."
        )


def _data_channels(config: Config) -> int:
    return int(read_manifest(config.data.root, config.data.name)["channels"])


def _converted_stats(source: InitSource, channels: int) -> tuple[list[float], list[float]]:
    """The source's normalisation for data with `channels` channels (channel-averaged across grey/RGB)."""
    assert source.mean is not None and source.std is not None
    if len(source.mean) == channels:
        return list(source.mean), list(source.std)
    mean, std = sum(source.mean) / len(source.mean), sum(source.std) / len(source.std)
    return [mean] * channels, [std] * channels


def resolve_init(config: Config) -> Config:
    """Check `transfer.source` against the run's model and record the source's checksum (and, for
    `transfer.normalisation=source`, its statistics in `data.mean`/`data.std`). Call before the run
    directory is written: every problem is reported with nothing on disk.

    Raises:
        ValueError: not a run or bundle, another architecture, or a source that changed since the run's
            config recorded it.
    """
    return _resolve(config)[0] if config.transfer.source else config


def _resolve(config: Config) -> tuple[Config, InitSource]:
    """`resolve_init`'s work, also returning the source it read."""
    source = read_init_source(config.transfer.source)
    _check_architecture(config, source)
    if config.transfer.sha256 and config.transfer.sha256 != source.sha256:
        raise ValueError(f"--init-from {source.path} has changed since this run recorded it (sha256 {config.transfer.sha256[:12]}..., "
                         f"now {source.sha256[:12]}...); start a new run directory.")
    config = dataclasses.replace(config, transfer=dataclasses.replace(config.transfer, source=str(source.path.resolve()), sha256=source.sha256))
    if config.transfer.normalisation == "source" and not config.data.mean:
        if source.mean is None:
            raise ValueError(f"--init-from {source.path}: its training statistics are unknown (its prepared dataset is missing); "
                             "use transfer.normalisation=dataset or set data.mean and data.std.")
        mean, std = _converted_stats(source, _data_channels(config))
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, mean=mean, std=std))
    return config, source


def adapt_input_conv(weight: torch.Tensor, in_chans: int, std: tuple[float, ...] | None = None) -> torch.Tensor:
    """A first-conv weight (out, C, k, k) for `in_chans` input channels (timm's adapt_input_conv idea).

    3 -> 1: summed over the input channels, i.e. the grey channel repeated three times.
    1 -> 3: the grey kernel times luma_c * std_c / sum_j(luma_j * std_j), with `std` the new RGB data's
    per-channel normalisation std: exactly grey = luma . rgb, normalised by the luma-weighted
    statistics. Without `std`, plain luma weights.
    """
    source = weight.shape[1]
    if source == in_chans:
        return weight
    if source == 3 and in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if source == 1 and in_chans == 3:
        stds = torch.tensor(std if std is not None else (1.0, 1.0, 1.0), dtype=weight.dtype)
        factors = torch.tensor(LUMA, dtype=weight.dtype) * stds
        return weight * (factors / factors.sum()).view(1, 3, 1, 1)
    raise ValueError(f"Cannot adapt a backbone with {source} input channels to {in_chans}-channel images (only grey <-> RGB).")


def _source_tensors(source: InitSource) -> dict[str, torch.Tensor]:
    if source.kind == "run":
        expect = {"backbone": source.backbone, "width": source.width, "in_chans": source.in_chans}
        tensors, _ = load_checkpoint(source.path / "pretrain" / "best", expect=expect)
        return tensors_under(tensors, "backbone")
    from metatransfer.loading import bundle_backbone

    return bundle_backbone(source.path, source.bundle).state_dict()


def load_init_backbone(config: Config, backbone: nn.Module, in_chans: int, std: tuple[float, ...]) -> dict[str, Any]:
    """Load the `transfer.source` backbone into `backbone` (built for `in_chans`), adapting its first
    conv to the data's channels; returns the provenance the run records (path, checksum, conversion).

    Raises:
        ValueError: the source changed, is of another architecture, or its state does not fit.
    """
    config, source = _resolve(config)
    state = dict(_source_tensors(source))
    target = backbone.state_dict()
    for name, value in state.items():  # the convs that read the image (ResNet-12: the first conv and its shortcut)
        if name in target and value.dim() == 4 and value.shape[1] == source.in_chans and target[name].shape[1] == in_chans != source.in_chans:
            state[name] = adapt_input_conv(value, in_chans, std)
    missing, unexpected = set(backbone.state_dict()) - set(state), set(state) - set(backbone.state_dict())
    if missing or unexpected:
        raise ValueError(f"--init-from {source.path}: its backbone's tensors do not fit a fresh {source.backbone} "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}, e.g. folded conv biases); "
                         "start from the run directory instead of its bundle.")
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:  # shapes that no channel conversion explains
        raise ValueError(f"--init-from {source.path}: its backbone does not fit this run's: {error}") from None
    conversion = "none" if source.in_chans == in_chans else (
        "grey data, RGB backbone: the convs that read the image summed over their 3 input channels (= the grey channel repeated)"
        if in_chans == 1 else "RGB data, grey backbone: the convs that read the image spread over R, G, B with luma weights (= grey by ITU-R 601)")
    return {"path": str(source.path), "kind": source.kind, "sha256": source.sha256, "dataset": source.dataset,
            "source_in_chans": source.in_chans, "in_chans": in_chans, "channel_conversion": conversion,
            "normalisation": config.transfer.normalisation, **({"unfinished": source.unfinished} if source.unfinished else {})}

