"""Export a trained run as a self-contained bundle: plain backbone, theta, settings, model card.

Scaling-shifting is folded into the conv weights (`fold_scale_shift`: W * Phi_S1, b + Phi_S2), so
the exported backbone is an ordinary network (Sun et al., CVPR 2019, section 4.2). This module is
the writing side only: `export_run` reads the run with `load_run_model`, writes the backbone
(safetensors, ONNX or TorchScript), theta, bundle.json and MODEL_CARD.md, then reads the bundle
back with `load_bundle_model` to check that it gives the run's features.

The bundle's layout, its constants (BUNDLE_FILE, BUNDLE_FORMAT, FORMATS, HEAD_FILE) and its reader
live in `metatransfer.loading`, below both this module and `metatransfer.api`, so that the API
loads models without importing the exporter; the names are re-exported here for older imports.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from metatransfer.data._sources import sha256_file
from metatransfer.loading import (  # noqa: F401  (OnnxBackbone: re-exported for older imports)
    BUNDLE_FILE,
    BUNDLE_FORMAT,
    FORMATS,
    HEAD_FILE,
    OnnxBackbone,
    load_bundle_model,
    load_run_model,
)
from metatransfer.run import read_run_config, write_json

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "FORMATS", "OnnxBackbone", "export_run"]

ONNX_OPSET = 17


# --- writing a bundle ---------------------------------------------------------------------------


def _write_backbone(backbone: nn.Module, path: Path, fmt: str, example: torch.Tensor) -> None:
    if fmt == "safetensors":
        save_file({k: v.detach().contiguous() for k, v in backbone.state_dict().items()}, str(path))
        return
    with warnings.catch_warnings():  # both exporters warn that TorchScript is deprecated
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(backbone, example), str(path))
            return
        try:
            import onnx  # noqa: F401  (the exporter needs it)
        except ImportError:
            raise ValueError("ONNX export needs the onnx package; pip install 'metatransfer[onnx]'") from None
        # The TorchScript-based exporter: the torch.export-based one needs onnxscript, not a dependency.
        torch.onnx.export(
            backbone, (example,), str(path), input_names=["images"], output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
        )


def _check_export(export_dir: Path, reference: nn.Module, example: torch.Tensor) -> float | None:
    """Max abs difference between the exported and the PyTorch backbone's features on `example`."""
    try:
        exported = load_bundle_model(export_dir)
    except ValueError as error:
        if "onnxruntime is not installed" in str(error):
            return None
        raise
    with torch.no_grad():
        return float((exported.backbone(example) - reference(example)).abs().max())


def _results(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        return []


def _init_lines(run_dir: Path) -> list[str]:
    """Where a transfer run's backbone came from (its init_from.json), for the model card."""
    path = run_dir / "init_from.json"
    if not path.is_file():
        return ["- backbone: pre-trained from scratch on the run's own base classes"]
    init = json.loads(path.read_text())
    return [f"- backbone started from `{init['path']}` ({init['kind']}, trained on {init['dataset']}), sha256 `{init['sha256']}`",
            f"- channels: {init['channel_conversion']}; input normalisation: {init['normalisation']}"]


def _model_card(bundle: dict[str, Any], run_dir: Path) -> str:
    config = read_run_config(run_dir)
    source, prep, spec = bundle["source"], bundle["preprocessing"], bundle["backbone"]
    lines = [
        f"# MTL few-shot model: {spec['name']} on {source['dataset']}",
        "",
        "Meta-Transfer Learning (Sun et al., CVPR 2019), exported by metatransfer "
        f"(`mtl export --format {bundle['format']}`) from `{source['run_dir']}`, checkpoint `{source['checkpoint']}`.",
        "",
        "## Backbone",
        f"- `{spec['name']}`, width x{spec['width']}, {spec['in_chans']} input channel(s), {spec['out_features']}-d features",
        f"- meta-transfer: {source['adapt']}" + (f" (scale mode `{source['ss_mode']}`), "
                                                 "folded into the conv weights" if source["adapt"] == "ss" else ""),
        f"- file: `{bundle['backbone_file']}` ({bundle['format']}); input `images` float32 (batch, {prep['channels']}, "
        f"{prep['image_size']}, {prep['image_size']}) normalised as (pixel/255 - mean)/std; output (batch, {spec['out_features']})",
        f"- BatchNorm: {bundle['bn_mode']}",
        "- test-time flip: each image's feature is the mean of its own and its mirror image's" if bundle["flip_average"] else
        "- test-time flip: off (one forward per image)",
        f"- test-time shifts: the feature is also averaged over copies shifted by {bundle['shift_views']} pixels "
        "(the 3x3 grid of -s, 0, s; zero-padded)" if bundle.get("shift_views") else "- test-time shifts: off",
        "",
        "## Data",
        f"- trained on `{source['dataset']}`: {source.get('dataset_protocol') or 'see the run config'}",
        f"- preprocessing: resize ({prep['resize']}) to {prep['image_size']}x{prep['image_size']}, "
        f"{'grayscale' if prep['channels'] == 1 else 'RGB'}, alpha {prep['alpha']}"
        + (", inverted (ink bright on dark, as the Omniglot cache)" if prep["invert"] else ""),
        f"- mean {[round(v, 4) for v in prep['mean']]}, std {[round(v, 4) for v in prep['std']]}",
        "",
        "## Training settings",
        *_init_lines(run_dir),
        f"- pre-train: {config.pretrain.epochs} epochs, batch {config.pretrain.batch_size}, lr {config.pretrain.lr} ({config.pretrain.schedule})",
        f"- meta-train: {config.meta_train.iterations} iterations, {config.meta_train.n_way}-way {config.meta_train.n_shot}-shot, "
        f"{config.meta_train.n_tasks} tasks per meta-batch, hard tasks {'on' if config.meta_train.hard_tasks.enabled else 'off'}",
        f"- base-learner (used again at prediction): {bundle['base_learner']['steps']} steps, lr {bundle['base_learner']['lr']}, "
        f"FC init {bundle['base_learner']['fc_init']}, {bundle['base_learner']['logits']} logits"
        + (f", E3BM ensemble over the steps ({bundle['base_learner']['ensemble_init']} init; hyperprior learners in "
           f"`{bundle['head_file']}`)" if bundle["base_learner"]["ensemble"] == "e3bm" else ""),
        "",
        "## Results (meta-test, from the run's results.json)",
    ]
    results = _results(run_dir)
    if results:
        # A run scores shots with their own checkpoints (meta_train.val_shots) or the last one too: name each row's.
        lines += [f"Rows scored with another checkpoint than this bundle's (`{source['checkpoint']}`) say so in `model`.", "",
                  "| split | way | shot | query | episodes | protocol | model | accuracy (95% CI) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['split']} | {r['way']} | {r['shot']} | {r['query']} | {r['episodes']} | {r['protocol']} | {r.get('model', '')} | "
                  f"{r['accuracy']:.2f} +- {r['ci95']:.2f} |" for r in results]
    else:
        lines.append("No results.json in the run: run `mtl meta-test` for numbers.")
    lines += [
        "",
        "## Use",
        "```",
        "mtl predict --model THIS_FOLDER --support SUPPORT_DIR --query QUERY_DIR --out preds.csv",
        "```",
        "```python",
        "from metatransfer import FewShotClassifier",
        "model = FewShotClassifier.from_export('THIS_FOLDER').fit(support_paths, support_labels)",
        "labels = model.predict(query_paths)",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out_dir: str | Path, fmt: str, *, data_root: str | Path | None = None,
               checkpoint: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Write a run's model as a bundle in `out_dir` (replaced whole if it already holds a bundle).

    Args:
        run_dir: a run directory with a meta_train/best (or pretrain/best) checkpoint.
        out_dir: the bundle folder; must be new, empty, or a previous bundle.
        fmt: "safetensors", "onnx" or "torchscript".
        data_root: where the run's prepared dataset lives, if it moved (for mean/std and image size).
        checkpoint: a meta_train checkpoint other than best (last, best-5shot, ...).

    Returns:
        `out_dir`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / BUNDLE_FILE).is_file())):
        raise ValueError(f"{out_dir} exists and is not an export folder; choose a new --out")
    model = load_run_model(run_dir, checkpoint=checkpoint, data_root=data_root)
    if fmt != "safetensors" and model.bn_mode == "batch":
        raise ValueError(f"{run_dir} uses bn_mode=batch (per-set statistics), which {fmt} cannot hold; export as safetensors")
    prep, info, backbone = model.preprocessing, model.info, model.backbone
    example = torch.randn(2, prep.channels, prep.image_size, prep.image_size, generator=torch.Generator().manual_seed(0))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_backbone(backbone, tmp / FORMATS[fmt], fmt, example)
        save_file(model.learner.tensors(), str(tmp / HEAD_FILE))  # theta, temperature, (E3BM) hyperprior learners
        bundle = {
            "format_version": BUNDLE_FORMAT,
            "format": fmt,
            "backbone_file": FORMATS[fmt],
            "head_file": HEAD_FILE,
            "backbone": {"name": info["backbone"], "width": info["width"], "in_chans": info["in_chans"],
                         "out_features": info["out_features"]},
            "input": {"name": "images", "dtype": "float32", "layout": "(batch, channels, height, width)",
                      "normalisation": "(pixel / 255 - mean) / std"},
            "preprocessing": prep.to_dict(),
            "base_learner": model.learner.to_dict(),
            "bn_mode": model.bn_mode,
            "flip_average": model.flip_average,
            "shift_views": model.shift_views,
            "source": {key: info[key] for key in ("run_dir", "checkpoint", "dataset", "dataset_protocol", "adapt", "ss_mode")},
            "sha256": {name: sha256_file(tmp / name) for name in (FORMATS[fmt], HEAD_FILE)},
        }
        write_json(tmp / BUNDLE_FILE, bundle)
        (tmp / "MODEL_CARD.md").write_text(_model_card(bundle, run_dir))
        difference = _check_export(tmp, backbone, example)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    check = "not checked (onnxruntime not installed)" if difference is None else f"max abs feature difference {difference:.1e}"
    log(f"exported {info['source']} as {fmt} to {out_dir} ({check})")
    return out_dir
