"""`mtl export`: SS folded into a plain backbone; safetensors, ONNX and TorchScript bundles give the
features of the run's model, and `mtl predict` the same predictions from a bundle as from the run."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures_run import fc100_folders, smoke_run  # noqa: F401  (fixtures)
from metatransfer import FewShotClassifier
from metatransfer.api import load_images
from metatransfer.cli import main
from metatransfer.export import export_run
from metatransfer.loading import BUNDLE_FILE, _add_folded_biases, build_backbone, load_run_model
from metatransfer.models.backbones import create_backbone, list_backbones
from metatransfer.models.scale_shift import apply_scale_shift, fold_scale_shift
from metatransfer.run import load_checkpoint, read_run_config


def _images(n: int = 6, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bundles(smoke_run, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    folder = tmp_path_factory.mktemp("bundles")
    formats = ["safetensors", "torchscript"]
    try:
        import onnxruntime  # noqa: F401

        formats.append("onnx")
    except ImportError:
        pass
    return {fmt: export_run(smoke_run, folder / fmt, fmt, log=lambda _: None) for fmt in formats}


def test_folding_the_meta_trained_ss_keeps_the_features(smoke_run):  # noqa: F811
    config = read_run_config(smoke_run)
    tensors, meta = load_checkpoint(smoke_run / "meta_train" / "last")  # best may be the untrained iteration 0
    assert any((t - 1).abs().max() > 0 for k, t in tensors.items() if k.endswith(".scale"))  # SS really learned
    backbone = build_backbone(config, 3)
    apply_scale_shift(backbone, mode=meta["ss_mode"], include_shortcuts=meta.get("ss_shortcuts", False))
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
    backbone.eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # and SS far from its init, as after a long meta-training
        for key, value in backbone.state_dict().items():
            if key.endswith((".scale", ".shift")):
                value.add_(0.2 * torch.randn(value.shape, generator=generator))
    x = _images()
    with torch.no_grad():
        before = backbone(x)
        after = fold_scale_shift(backbone)(x)
    assert (after - before).abs().max() < 1e-5


@pytest.mark.parametrize("name", list_backbones())
def test_folded_weights_load_into_a_fresh_plain_backbone(name):
    """Folding gives bias-less convs (resnet25) a bias; the bundle reader adds it back."""
    model = create_backbone(name, width=0.25)
    apply_scale_shift(model, include_shortcuts=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    model = fold_scale_shift(model).eval()
    state = model.state_dict()
    fresh = create_backbone(name, width=0.25)
    _add_folded_biases(fresh, state)
    fresh.load_state_dict(state)
    x = _images(3)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_exported_backbone_gives_the_run_features(fmt, bundles, smoke_run):  # noqa: F811
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'metatransfer[onnx]')")
    run = FewShotClassifier.from_run(smoke_run, device="cpu")
    exported = FewShotClassifier.from_export(bundles[fmt], device="cpu")
    x = _images(5)
    with torch.no_grad():
        assert (exported.backbone(x) - run.backbone(x)).abs().max() < 1e-5
    assert torch.equal(exported.learner.theta_weight, run.learner.theta_weight) and torch.equal(exported.learner.theta_bias, run.learner.theta_bias)
    assert exported.preprocessing == run.preprocessing and (exported.steps, exported.lr) == (run.steps, run.lr)


def test_bundle_is_self_contained_and_documented(bundles, smoke_run, tmp_path):  # noqa: F811
    moved = tmp_path / "elsewhere"
    shutil.copytree(bundles["safetensors"], moved)  # no run dir nor dataset needed from here on
    bundle = json.loads((moved / BUNDLE_FILE).read_text())
    assert bundle["preprocessing"]["image_size"] == 32 and bundle["preprocessing"]["invert"] is False
    assert len(bundle["preprocessing"]["mean"]) == 3 and bundle["backbone"]["name"] == "conv4"
    assert bundle["base_learner"] == {"steps": 5, "lr": 0.01, "fc_init": "theta", "prototype_normalise": False,
                                      "logits": "linear", "feature_centre": False, "ensemble": "none",
                                      "ensemble_init": "last"}
    card = (moved / "MODEL_CARD.md").read_text()
    result = json.loads((smoke_run / "results.json").read_text())[0]
    assert f"{result['accuracy']:.2f} +- {result['ci95']:.2f}" in card and "conv4" in card and "fc100" in card
    assert FewShotClassifier.load(moved, device="cpu").info["format"] == "safetensors"


def _predictions(model: Path, folders: tuple[Path, Path], out_dir: Path, *extra: str) -> list[tuple[str, float]]:
    """(predicted label, probability) per query image from `mtl predict --model MODEL`."""
    support, query = folders
    out = out_dir / f"{model.name}.json"
    assert main(["predict", "--model", str(model), "--support", str(support), "--query", str(query),
                 "--out", str(out), "--device", "cpu", *extra]) == 0
    return [(row["predicted"], row["probability"]) for row in json.loads(out.read_text())["predictions"]]


def test_predict_from_a_bundle_equals_predict_from_the_run(bundles, smoke_run, fc100_folders, tmp_path):  # noqa: F811
    expected = _predictions(smoke_run, fc100_folders, tmp_path)
    for fmt, folder in bundles.items():
        got = _predictions(folder, fc100_folders, tmp_path)
        assert [label for label, _ in got] == [label for label, _ in expected], fmt
        assert max(abs(p - q) for (_, p), (_, q) in zip(got, expected)) < 1e-4, fmt


def test_cli_export_and_its_errors(smoke_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bundle"
    assert main(["export", "--model", str(smoke_run), "--format", "safetensors", "--out", str(out)]) == 0
    assert main(["export", "--model", str(smoke_run), "--format", "safetensors", "--out", str(out)]) == 0  # replaces
    assert "exported" in capsys.readouterr().out
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("keep me")
    assert main(["export", "--model", str(smoke_run), "--out", str(occupied)]) == 2
    assert "not an export folder" in capsys.readouterr().err and (occupied / "thesis.tex").exists()
    assert main(["export", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "b2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_damaged_bundle_is_reported(bundles, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(bundles["safetensors"], damaged)
    with open(damaged / "head.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="checksum"):
        FewShotClassifier.from_export(damaged)
    (damaged / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        FewShotClassifier.from_export(damaged)


def test_bundles_of_formats_1_to_3_load_without_the_flip_shifts_or_ensemble_and_an_unknown_format_is_refused(bundles, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(bundles["safetensors"], old)
    bundle = json.loads((old / BUNDLE_FILE).read_text())
    assert bundle["format_version"] == 4 and bundle["flip_average"] is False and bundle["shift_views"] == 0
    bundle["base_learner"] = {key: bundle["base_learner"][key] for key in ("steps", "lr", "fc_init", "logits")}
    (old / BUNDLE_FILE).write_text(json.dumps({**bundle, "format_version": 3}))
    assert FewShotClassifier.from_export(old).learner.ensemble == "none"
    del bundle["shift_views"]
    (old / BUNDLE_FILE).write_text(json.dumps({**bundle, "format_version": 2}))
    assert FewShotClassifier.from_export(old).shift_views == 0
    del bundle["flip_average"]
    (old / BUNDLE_FILE).write_text(json.dumps({**bundle, "format_version": 1}))
    assert FewShotClassifier.from_export(old).flip_average is False
    (old / BUNDLE_FILE).write_text(json.dumps({**bundle, "format_version": 5}))
    with pytest.raises(ValueError, match="format_version 5.*export the model again, or update metatransfer"):
        FewShotClassifier.from_export(old)


def test_batch_norm_in_batch_mode_only_exports_as_safetensors(smoke_run, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    text = (run / "config.yaml").read_text()
    assert "bn_mode: frozen" in text
    (run / "config.yaml").write_text(text.replace("bn_mode: frozen", "bn_mode: batch"))
    with pytest.raises(ValueError, match="bn_mode=batch"):
        export_run(run, tmp_path / "out", "onnx", log=lambda _: None)


def test_export_of_a_chosen_checkpoint(smoke_run, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bundle-last"
    assert main(["export", "--model", str(smoke_run), "--out", str(out), "--checkpoint", "last"]) == 0
    assert FewShotClassifier.from_export(out).info["checkpoint"] == "meta_train/last"
    card = (out / "MODEL_CARD.md").read_text()
    assert "this bundle's (`meta_train/last`)" in card and "| meta_train/best |" in card  # the run's rows name their model
    with pytest.raises(ValueError, match="exported model, which holds one checkpoint"):
        FewShotClassifier.load(out, checkpoint="best")


def test_a_fine_tuned_nearest_prototype_model_predicts_the_same_from_its_bundle(smoke_run, fc100_folders, tmp_path):  # noqa: F811
    """All convs meta-trained (model.adapt=ft) for Meta-Baseline's classifier: cosine nearest prototype (steps=0)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(smoke_run / "pretrain", run / "pretrain")
    data = read_run_config(smoke_run).data
    assert main(["meta-train", "--preset", "smoke", "--out", str(run), f"data.root={data.root}", f"data.name={data.name}",
                 "device=cpu", "model.adapt=ft", "meta_train.lr_ss=0.01", "base_learner.steps=0", "base_learner.fc_init=prototypes",
                 "base_learner.prototype_normalise=true", "base_learner.logits=cosine", "base_learner.learn_temperature=true",
                 "base_learner.learn_theta=false", "meta_train.val_every=3"]) == 0
    checkpoint = "last"  # last differs from the pre-trained backbone whatever validation kept
    tensors, meta = load_checkpoint(run / "meta_train" / checkpoint)
    assert meta["adapt"] == "ft" and not any("scale" in key or "shift" in key for key in tensors)
    pretrained = load_checkpoint(run / "pretrain" / "best")[0]
    assert any(not tensors[k].equal(pretrained[k]) for k in pretrained if tensors[k].dim() == 4)  # the convs moved
    bundle = export_run(run, tmp_path / "bundle", "safetensors", log=lambda _: None, checkpoint=checkpoint)
    expected = _predictions(run, fc100_folders, tmp_path, "--checkpoint", checkpoint)
    got = _predictions(bundle, fc100_folders, tmp_path)
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert max(abs(p - q) for (_, p), (_, q) in zip(got, expected)) < 1e-4
    learner = FewShotClassifier.from_export(bundle).learner
    assert (learner.steps, learner.fc_init, learner.logits) == (0, "prototypes", "cosine")


def _with_setting(smoke_run: Path, tmp_path: Path, fc100_folders, line: str, changed: str) -> tuple[Path, Path]:
    """A copy of the smoke run whose config.yaml has `line` changed to `changed`, and its safetensors bundle;
    `mtl predict` gives the same probabilities from both, and other ones than from the smoke run."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    text = (run / "config.yaml").read_text()
    assert line in text
    (run / "config.yaml").write_text(text.replace(line, changed))
    bundle = export_run(run, tmp_path / "bundle", "safetensors", log=lambda _: None)
    expected = _predictions(run, fc100_folders, tmp_path)
    got = _predictions(bundle, fc100_folders, tmp_path)
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert max(abs(p - q) for (_, p), (_, q) in zip(got, expected)) < 1e-4
    assert expected != _predictions(smoke_run, fc100_folders, tmp_path)  # the setting changed the probabilities
    return run, bundle


def test_a_test_time_flip_model_carries_it_into_its_bundle(smoke_run, fc100_folders, tmp_path):  # noqa: F811
    """views.flip reaches `mtl predict`, the API and the bundle: mirrored queries get the same probabilities."""
    run, bundle = _with_setting(smoke_run, tmp_path, fc100_folders, "  flip: false", "  flip: true")
    assert json.loads((bundle / BUNDLE_FILE).read_text())["flip_average"] is True
    assert "flip_average=True" in repr(FewShotClassifier.from_export(bundle))
    assert "mean of its own and its mirror image's" in (bundle / "MODEL_CARD.md").read_text()

    support, query = fc100_folders
    support_images = sorted(support.glob("*/*.png"))
    for source, flip_average in ((run, True), (bundle, True), (smoke_run, False)):
        model = FewShotClassifier.load(source, device="cpu").fit(support_images, [path.parent.name for path in support_images])
        queries = load_images(sorted(query.glob("*/*.png")), model.preprocessing)
        mirrored = np.ascontiguousarray(queries[:, :, ::-1])
        same = np.allclose(model.predict_proba(queries), model.predict_proba(mirrored), atol=1e-5)
        assert same == flip_average, source


def test_a_test_time_shift_model_carries_it_into_its_bundle(smoke_run, fc100_folders, tmp_path):  # noqa: F811
    """views.shift_pixels reaches `mtl predict`, the API and the bundle, which all predict alike."""
    run, bundle = _with_setting(smoke_run, tmp_path, fc100_folders, "shift_pixels: 0", "shift_pixels: 2")
    assert json.loads((bundle / BUNDLE_FILE).read_text())["shift_views"] == 2
    assert "shift_views=2" in repr(FewShotClassifier.from_export(bundle))
    assert "shifted by 2 pixels" in (bundle / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="views.shift_pixels=-1 is a number of pixels"):
        dataclasses.replace(load_run_model(run), shift_views=-1)
