"""Transfer (`--init-from`): a run starts from another run's or bundle's backbone, on other data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures_run import smoke_run  # noqa: F401  (a session fixture)

from metatransfer.cli import main
from metatransfer.config import load_config
from metatransfer.run import load_checkpoint, tensors_under
from metatransfer.transfer import LUMA, adapt_input_conv, read_init_source, resolve_init


def test_grey_data_on_an_rgb_conv_equals_the_grey_channel_repeated():
    generator = torch.Generator().manual_seed(0)
    weight, grey = torch.randn(4, 3, 3, 3, generator=generator), torch.randn(2, 1, 8, 8, generator=generator)
    expected = F.conv2d(grey.repeat(1, 3, 1, 1), weight, padding=1)
    assert torch.allclose(F.conv2d(grey, adapt_input_conv(weight, 1), padding=1), expected, atol=1e-5)


def test_rgb_data_on_a_grey_conv_equals_luma_grey_normalised_by_luma_statistics():
    generator = torch.Generator().manual_seed(0)
    weight, pixels = torch.randn(4, 1, 3, 3, generator=generator), torch.rand(2, 3, 8, 8, generator=generator)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.2, 0.3])
    rgb = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # the RGB run's inputs
    luma = torch.tensor(LUMA)
    grey = ((luma.view(1, 3, 1, 1) * pixels).sum(1, keepdim=True) - (luma * mean).sum()) / (luma * std).sum()
    adapted = adapt_input_conv(weight, 3, tuple(std.tolist()))
    assert torch.allclose(F.conv2d(rgb, adapted, padding=1), F.conv2d(grey, weight, padding=1), atol=1e-5)


def test_a_path_that_is_neither_run_nor_bundle_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_init_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a run directory"):
        read_init_source(tmp_path)
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match="no pretrain/best checkpoint"):
        read_init_source(tmp_path)


def test_another_architecture_is_refused_with_the_fix(smoke_run):  # noqa: F811
    config = load_config("smoke", [f"transfer.source={smoke_run}", "model.width=0.5"])
    with pytest.raises(ValueError, match=r"conv4 x0.25 .* but this run's model is conv4 x0.5; set model.backbone=conv4 model.width=0.25"):
        resolve_init(config)


def test_source_normalisation_records_the_source_statistics(smoke_run, prepared_omniglot):  # noqa: F811
    root, name = prepared_omniglot
    config = resolve_init(load_config("smoke", [f"transfer.source={smoke_run}", "transfer.normalisation=source",
                                                f"data.root={root}", f"data.name={name}"]))
    source = yaml.safe_load((smoke_run / "config.yaml").read_text())["data"]
    manifest = json.loads((Path(source["root"]) / source["name"] / "manifest.json").read_text())
    assert config.data.mean == pytest.approx([sum(manifest["mean"]) / 3])  # RGB statistics, averaged for grey data
    assert len(config.transfer.sha256) == 64


def test_cli_errors_name_the_problem_and_write_nothing(tmp_path, capsys, smoke_run):  # noqa: F811
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out), "--init-from", str(tmp_path / "nothing")]) == 2
    assert "mtl: error: --init-from" in capsys.readouterr().err
    assert main(["run", "--preset", "smoke", "--out", str(out), "--init-from", str(smoke_run), "model.backbone=resnet12"]) == 2
    assert "set model.backbone=conv4" in capsys.readouterr().err
    assert main(["meta-test", "--preset", "smoke", "--out", str(out), "--dataset", "fc100"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_run_from_an_fc100_run_on_omniglot_records_its_start_and_gain(tmp_path, smoke_run, prepared_omniglot):  # noqa: F811
    root, name = prepared_omniglot
    out = tmp_path / "transfer"
    assert main(["run", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--init-from", str(smoke_run),
                 f"data.name={name}", "pretrain.epochs=0", "device=cpu"]) == 0
    provenance = json.loads((out / "init_from.json").read_text())
    assert provenance["source_in_chans"] == 3 and provenance["in_chans"] == 1 and "repeated" in provenance["channel_conversion"]
    assert yaml.safe_load((out / "config.yaml").read_text())["transfer"]["sha256"] == provenance["sha256"]
    source, _ = load_checkpoint(smoke_run / "pretrain" / "best")
    start, meta = load_checkpoint(out / "pretrain" / "best")
    assert meta["epoch"] == 0 and meta["init_from"] == str(smoke_run.resolve()) and meta["in_chans"] == 1
    source, start = tensors_under(source, "backbone"), tensors_under(start, "backbone")
    first = "features.0.0.weight"
    assert torch.equal(start[first], source[first].sum(1, keepdim=True))
    assert all(torch.equal(start[key], source[key]) for key in source if key != first)
    (result,) = json.loads((out / "results.json").read_text())
    assert {"start_accuracy", "start_ci95", "gain", "gain_ci95"} <= set(result)
    episodes = json.loads((out / "meta_test" / "episodes-5way-1shot-standard.json").read_text())
    differences = torch.tensor(episodes["per_episode_accuracy"]) - torch.tensor(episodes["start_per_episode_accuracy"])
    assert result["gain"] == pytest.approx(100 * differences.double().mean().item(), abs=1e-3)


@pytest.mark.slow
def test_meta_train_alone_starts_from_a_safetensors_bundle(tmp_path, smoke_run, prepared_omniglot):  # noqa: F811
    root, name = prepared_omniglot
    assert main(["export", "--model", str(smoke_run), "--out", str(tmp_path / "bundle")]) == 0
    out = tmp_path / "from-bundle"
    assert main(["meta-train", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--init-from", str(tmp_path / "bundle"),
                 f"data.name={name}", "device=cpu"]) == 0
    assert json.loads((out / "init_from.json").read_text())["kind"] == "bundle"
    assert (out / "pretrain" / "best.json").is_file() and (out / "meta_train" / "best.json").is_file()
    before = (out / "pretrain" / "best.safetensors").read_bytes()
    assert main(["run", "--resume", str(out)]) == 0  # the config says 1 pre-training epoch; the 0-epoch start stands
    assert (out / "pretrain" / "best.safetensors").read_bytes() == before


def test_an_onnx_bundle_cannot_start_training(tmp_path, smoke_run):  # noqa: F811
    pytest.importorskip("onnx")
    assert main(["export", "--model", str(smoke_run), "--format", "onnx", "--out", str(tmp_path / "bundle")]) == 0
    with pytest.raises(ValueError, match="onnx bundle cannot be trained"):
        read_init_source(tmp_path / "bundle")


def test_cross_domain_meta_test_writes_beside_the_run_results(tmp_path, capsys, smoke_run, make_images):  # noqa: F811
    import shutil

    from metatransfer.data.prepare import prepare_dataset

    smoke_run = shutil.copytree(smoke_run, tmp_path / "run")  # the session's run stays as other tests expect it  # noqa: F811
    make_images(tmp_path / "glyphs", {f"glyph{i}": 20 for i in range(6)}, size=20, mode="L")
    prepare_dataset("folder", tmp_path / "glyphs", tmp_path / "data", image_size=20, split_ratios=(0, 0, 1), log=lambda m: None)
    own = (smoke_run / "results.json").read_bytes()
    assert main(["meta-test", "--resume", str(smoke_run), "--dataset", "glyphs", "--data-root", str(tmp_path / "data")]) == 0
    assert "glyphs" in capsys.readouterr().out
    assert (smoke_run / "results.json").read_bytes() == own  # the run's own results are untouched
    (result,) = json.loads((smoke_run / "results-glyphs.json").read_text())
    assert result["dataset"] == "glyphs" and result["split"] == "test" and 0 <= result["accuracy"] <= 100
    assert (smoke_run / "meta_test" / "glyphs" / "episodes-5way-1shot-standard.json").is_file()
    assert main(["meta-test", "--resume", str(smoke_run), "--dataset", "nowhere", "--data-root", str(tmp_path / "data")]) == 2
    assert "No prepared dataset 'nowhere'" in capsys.readouterr().err
    assert not (smoke_run / "results-nowhere.json").exists()


def test_fit_images_resizes_and_converts_channels():
    import numpy as np

    from metatransfer.phases.cross_domain import fit_images

    grey = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 1), dtype=np.uint8)
    rgb = fit_images(grey, 32, 3)
    assert rgb.shape == (3, 32, 32, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])  # grey repeated
    assert fit_images(rgb, 32, 3) is rgb and fit_images(rgb, 16, 1).shape == (3, 16, 16, 1)


def test_every_conv_that_reads_the_image_is_adapted_resnet12_shortcut_too(tmp_path):
    from metatransfer.models.backbones import create_backbone
    from metatransfer.run import save_checkpoint
    from metatransfer.transfer import load_init_backbone

    source = create_backbone("resnet12", in_chans=3, width=0.125)
    run = tmp_path / "source"
    config = load_config("smoke", ["model.backbone=resnet12", "model.width=0.125"])
    from metatransfer.run import prepare_run_dir

    prepare_run_dir(run, config)
    save_checkpoint(run / "pretrain" / "best", {f"backbone.{k}": v for k, v in source.state_dict().items()},
                    {"backbone": "resnet12", "width": 0.125, "in_chans": 3, "out_features": source.out_features, "dataset": "fc100"})
    grey = create_backbone("resnet12", in_chans=1, width=0.125)
    provenance = load_init_backbone(load_config("smoke", ["model.backbone=resnet12", "model.width=0.125", f"transfer.source={run}"]),
                                    grey, 1, (0.3,))
    assert provenance["in_chans"] == 1
    image = torch.randn(2, 1, 16, 16)
    source.eval(), grey.eval()
    assert torch.allclose(grey(image), source(image.repeat(1, 3, 1, 1)), atol=1e-4)  # the same network on the grey channel


def test_runs_from_before_init_from_still_resume(tmp_path, smoke_run):  # noqa: F811
    import shutil

    run = shutil.copytree(smoke_run, tmp_path / "old")
    for stem in ("last", "best"):  # what a pre-training checkpoint written before --init-from holds
        path = run / "pretrain" / f"{stem}.json"
        meta = json.loads(path.read_text())
        meta.pop("init_from"), meta.pop("init_sha256")
        path.write_text(json.dumps(meta))
    assert main(["run", "--resume", str(run)]) == 0


@pytest.mark.slow
def test_a_finished_transfer_resumes_without_its_source(tmp_path, smoke_run, prepared_omniglot):  # noqa: F811
    import shutil

    root, name = prepared_omniglot
    source = shutil.copytree(smoke_run, tmp_path / "source")
    out = tmp_path / "transfer"
    args = ["--data-root", str(root), "--out", str(out), f"data.name={name}", "pretrain.epochs=0", "meta_train.iterations=2",
            "meta_train.val_every=2", "device=cpu"]
    assert main(["pretrain", "--preset", "smoke", "--init-from", str(source), *args]) == 0
    shutil.rmtree(source)  # moved away or rebuilt: pre-training no longer reads it
    assert main(["run", "--resume", str(out)]) == 0


def test_a_run_still_pre_training_is_named_unfinished_where_its_backbone_is_used(tmp_path, smoke_run, prepared_omniglot):  # noqa: F811
    assert read_init_source(smoke_run).unfinished == ""
    running = tmp_path / "running"
    shutil.copytree(smoke_run, running)
    last = running / "pretrain" / "last.json"
    last.write_text(json.dumps({**json.loads(last.read_text()), "complete": False, "epoch": 1}))
    unfinished = read_init_source(running).unfinished
    assert "unfinished (at epoch 1 of" in unfinished and f"mtl run --resume {running}" in unfinished
    root, name = prepared_omniglot
    out, said = tmp_path / "transfer", []
    assert main(["pretrain", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--init-from", str(running),
                 f"data.name={name}", "pretrain.epochs=0", "device=cpu"]) == 0
    assert json.loads((out / "init_from.json").read_text())["unfinished"] == unfinished
