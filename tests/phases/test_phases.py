"""End to end: `mtl run` and the three phases on small real FC100 data, their variants, and the
paper-scale presets with tiny step counts.

The runs use `fc100_small` (real FC100 images, a few per class) rather than the full cache so that
all of them fit in about a minute on a shared 2-core CPU; the code paths are the same.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from metatransfer.cli import main
from metatransfer.config import check_config, load_config
from metatransfer.data.augment import to_float
from metatransfer.data.cache import load_split
from metatransfer.phases import meta_test, meta_train, pretrain
from metatransfer.run import load_checkpoint, prepare_run_dir, save_checkpoint

pytestmark = pytest.mark.slow

RESULT_KEYS = {"dataset", "way", "shot", "query", "episodes", "accuracy", "ci95"}


def _quiet(message: str) -> None:
    pass


def _run_args(data: tuple[Path, str], out: Path, *overrides: str) -> list[str]:
    root, name = data
    return ["--preset", "smoke", "--data-root", str(root), "--out", str(out), f"data.name={name}", *overrides]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and "tensorboard" not in p.parts}


@pytest.fixture(scope="module")
def small_smoke_run(fc100_small, tmp_path_factory) -> Path:
    """`mtl run --preset smoke` on small FC100: every phase, every checkpoint (fixtures_run.smoke_run is on the full cache)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", *_run_args(fc100_small, run_dir)]) == 0
    return run_dir


def _variant(base: Path, target: Path, data, overrides: list[str], copy: tuple[str, ...] = ("pretrain",)):
    """A new run dir with another config that reuses the base run's checkpoints of `copy`."""
    root, name = data
    config = load_config("smoke", [f"data.root={root}", f"data.name={name}", *overrides])
    prepare_run_dir(target, config)
    for folder in copy:
        shutil.copytree(base / folder, target / folder)
    return config


# mtl run ------------------------------------------------------------------------------------------

def test_run_dir_holds_config_metrics_checkpoints_and_results(small_smoke_run, fc100_small):
    for name in ("config.yaml", "metrics.jsonl", "results.json"):
        assert (small_smoke_run / name).is_file(), name
    for phase in ("pretrain", "meta_train"):
        for stem in ("best", "last"):
            assert (small_smoke_run / phase / f"{stem}.json").is_file()
            assert (small_smoke_run / phase / f"{stem}.safetensors").is_file()
    config = yaml.safe_load((small_smoke_run / "config.yaml").read_text())
    assert config["data"]["root"] == str(fc100_small[0]) and config["model"]["backbone"] == "conv4"
    results = json.loads((small_smoke_run / "results.json").read_text())
    assert len(results) == 1
    result = results[0]
    assert RESULT_KEYS <= set(result)
    assert (result["dataset"], result["way"], result["shot"], result["query"], result["episodes"]) == ("fc100-small", 5, 1, 15, 20)
    assert 0 <= result["accuracy"] <= 100 and result["ci95"] > 0


def test_per_episode_file_agrees_with_the_result(small_smoke_run):
    result = json.loads((small_smoke_run / "results.json").read_text())[0]
    episodes = json.loads((small_smoke_run / "meta_test" / "episodes-5way-1shot-standard.json").read_text())["per_episode_accuracy"]
    assert len(episodes) == 20 and all(0 <= a <= 1 for a in episodes)
    assert sum(episodes) / len(episodes) * 100 == pytest.approx(result["accuracy"], abs=0.01)


def test_checkpoints_are_safetensors_and_json_without_temp_files(small_smoke_run):
    names = [p.name for p in small_smoke_run.rglob("*") if p.is_file()]
    assert not [n for n in names if ".tmp" in n], names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".ckpt"))]
    meta = json.loads((small_smoke_run / "meta_train" / "best.json").read_text())
    assert meta["backbone"] == "conv4" and meta["adapt"] == "ss" and meta["dataset"] == "fc100-small"
    tensors = load_file(str(small_smoke_run / "meta_train" / "best.safetensors"))
    assert tensors["head.weight"].shape == (5, meta["out_features"])
    assert any("scale" in key for key in tensors)  # the scale-shift parameters are saved


def test_metrics_log_hard_task_accuracy_and_hard_classes_have_names(small_smoke_run, fc100_small):
    records = _records(small_smoke_run)
    assert {r["phase"] for r in records} >= {"pretrain", "meta_train", "meta_train_val"}
    meta_records = [r for r in records if r["phase"] == "meta_train"]
    assert meta_records and "normal_task_accuracy" in meta_records[-1] and "hard_task_accuracy" in meta_records[-1]
    assert 0 <= meta_records[-1]["hard_task_accuracy"] <= 100
    hard_classes = json.loads((small_smoke_run / "meta_train" / "hard_classes.json").read_text())
    train_names = set(load_split(*fc100_small, "train").class_names)
    assert hard_classes and set(hard_classes) <= train_names
    # every normal task contributes one failure class
    assert sum(hard_classes.values()) == meta_records[-1]["normal_tasks"]


def test_meta_test_alone_on_the_run_dir_is_deterministic(small_smoke_run, fc100_small, capsys):
    """Frozen BN: the same seed gives the same episodes and exactly the same accuracies."""
    before = json.loads((small_smoke_run / "results.json").read_text())
    episodes_path = small_smoke_run / "meta_test" / "episodes-5way-1shot-standard.json"
    episodes_before = episodes_path.read_text()
    assert main(["meta-test", *_run_args(fc100_small, small_smoke_run)]) == 0
    assert "meta-test of meta_train/best" in capsys.readouterr().out
    assert json.loads((small_smoke_run / "results.json").read_text()) == before
    assert episodes_path.read_text() == episodes_before


def test_meta_test_with_resume_reads_the_saved_config(small_smoke_run):
    before = json.loads((small_smoke_run / "results.json").read_text())
    assert main(["meta-test", "--out", str(small_smoke_run), "--resume"]) == 0
    assert json.loads((small_smoke_run / "results.json").read_text()) == before


def test_meta_test_resume_rescores_with_the_last_checkpoint_beside_the_best(small_smoke_run, tmp_path, capsys):
    run_dir = tmp_path / "rescored"
    shutil.copytree(small_smoke_run, run_dir)
    best = json.loads((run_dir / "results.json").read_text())
    config_before = (run_dir / "config.yaml").read_text()
    assert main(["meta-test", "--resume", str(run_dir), "meta_test.checkpoint=last", "meta_test.n_shot=1"]) == 0
    assert "meta-test of meta_train/last" in capsys.readouterr().out
    results = json.loads((run_dir / "results.json").read_text())
    last = [r for r in results if r["checkpoint"] == "last"]
    assert [r["shot"] for r in last] == [1] and all(r["model"] == "meta_train/last" for r in last)
    assert [r for r in results if r.get("checkpoint", "best") == "best"] == best  # kept, not replaced
    assert (run_dir / "meta_test" / "episodes-5way-1shot-standard-last.json").is_file()
    assert (run_dir / "config.yaml").read_text() == config_before  # the run's own config stays as trained
    assert main(["meta-test", "--resume", str(run_dir), "model.backbone=conv4"]) == 2  # not a meta_test.* key


def test_meta_test_resume_rescores_with_the_test_time_flip_and_shifts_beside_the_plain_scores(small_smoke_run, tmp_path):
    run_dir = tmp_path / "rescored"
    shutil.copytree(small_smoke_run, run_dir)
    plain = json.loads((run_dir / "results.json").read_text())
    config_before = (run_dir / "config.yaml").read_text()
    assert main(["meta-test", "--resume", str(run_dir), "views.flip=true"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert [r for r in results if not r["flip_average"]] == plain  # kept, not replaced
    flipped = [r for r in results if r["flip_average"]]
    assert [r["shot"] for r in flipped] == [r["shot"] for r in plain] and all("gain" in r for r in flipped)
    episodes = json.loads((run_dir / "meta_test" / "episodes-5way-1shot-standard-flip.json").read_text())
    assert len(episodes["per_episode_accuracy"]) == len(episodes["start_per_episode_accuracy"]) == flipped[0]["episodes"]
    assert (run_dir / "config.yaml").read_text() == config_before
    assert main(["meta-test", "--resume", str(run_dir), "views.shift_pixels=2"]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert [r for r in results if not r["shift_views"]] == plain + flipped  # kept, not replaced
    shifts = [r for r in results if r["shift_views"]]
    assert [r["shift_views"] for r in shifts] == [2] * len(plain) and all("gain" in r for r in shifts)
    assert (run_dir / "meta_test" / "episodes-5way-1shot-standard-shift2.json").is_file()
    assert main(["meta-test", "--resume", str(run_dir), "views.shift_pixels=-2"]) == 2  # refused before scoring
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert (run_dir / "config.yaml").read_text() == config_before


def test_test_time_shifts_change_the_scores_of_the_delivered_model_only(small_smoke_run, fc100_small, tmp_path):
    """views.shift_pixels is left out of validation: a run with it trains, validates and keeps exactly
    what the same run without it does, and only its meta-test rows score otherwise."""
    out = tmp_path / "shifted"
    assert main(["run", *_run_args(fc100_small, out, "views.shift_pixels=2")]) == 0

    def trained(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "time"} for r in _records(run_dir)]

    assert trained(out) == trained(small_smoke_run) and any("val_accuracy" in r for r in trained(out))
    for stem in ("pretrain/best", "meta_train/best"):
        mine, theirs = load_checkpoint(out / stem)[0], load_checkpoint(small_smoke_run / stem)[0]
        assert mine.keys() == theirs.keys() and all(mine[k].equal(theirs[k]) for k in mine)
    rows, plain = (json.loads((run / "results.json").read_text()) for run in (out, small_smoke_run))
    assert [r["shift_views"] for r in rows] == [2] * len(plain) and [r["shift_views"] for r in plain] == [0] * len(plain)
    shifted = json.loads((out / "meta_test" / "episodes-5way-1shot-standard-shift2.json").read_text())
    unshifted = json.loads((small_smoke_run / "meta_test" / "episodes-5way-1shot-standard.json").read_text())
    assert shifted["per_episode_accuracy"] != unshifted["per_episode_accuracy"]
    assert shifted["start_per_episode_accuracy"] != unshifted["start_per_episode_accuracy"]  # the start is scored alike


def test_run_again_on_a_complete_run_resumes_and_trains_nothing(small_smoke_run, fc100_small, capsys):
    checkpoints = {k: v for k, v in _files(small_smoke_run).items() if k.startswith(("pretrain", "meta_train"))}
    assert main(["run", *_run_args(fc100_small, small_smoke_run)]) == 0
    out = capsys.readouterr().out
    assert "pre-train already complete" in out and "meta-train already complete" in out
    assert {k: v for k, v in _files(small_smoke_run).items() if k.startswith(("pretrain", "meta_train"))} == checkpoints


def test_run_with_other_overrides_on_the_same_out_fails(small_smoke_run, fc100_small, capsys):
    config_before = (small_smoke_run / "config.yaml").read_text()
    assert main(["run", *_run_args(fc100_small, small_smoke_run, "meta_train.iterations=9")]) == 2
    error = capsys.readouterr().err
    assert "another configuration" in error and "meta_train.iterations" in error
    assert (small_smoke_run / "config.yaml").read_text() == config_before


# variants from the smoke run's checkpoints ----------------------------------------------------------

def test_meta_test_paper_protocol(small_smoke_run, fc100_small, tmp_path):
    config = _variant(small_smoke_run, tmp_path, fc100_small, ["meta_test.protocol=paper"], copy=("pretrain", "meta_train"))
    (result,) = meta_test.run(config, tmp_path, log=_quiet)
    assert (result["protocol"], result["shot"], result["query"]) == ("paper", 1, 1)
    assert 0 <= result["accuracy"] <= 100
    episodes = json.loads((tmp_path / "meta_test" / "episodes-5way-1shot-paper.json").read_text())["per_episode_accuracy"]
    assert len(episodes) == 20
    assert all(round(a * 5) == pytest.approx(a * 5) for a in episodes)  # 5 queries: multiples of 1/5


def test_batch_statistics_meta_train_and_meta_test(small_smoke_run, fc100_small, tmp_path):
    config = _variant(small_smoke_run, tmp_path, fc100_small, ["model.bn_mode=batch"])
    meta_train.run(config, tmp_path, log=_quiet)
    (result,) = meta_test.run(config, tmp_path, log=_quiet)
    assert result["bn_mode"] == "batch" and result["episodes"] == 20
    assert 0 <= result["accuracy"] <= 100


def test_fine_tuning_ablation_meta_trains_the_convs(small_smoke_run, fc100_small, tmp_path):
    config = _variant(small_smoke_run, tmp_path, fc100_small, ["model.adapt=ft"])
    meta_train.run(config, tmp_path, log=_quiet)
    pretrained = load_file(str(tmp_path / "pretrain" / "best.safetensors"))
    last = load_file(str(tmp_path / "meta_train" / "last.safetensors"))
    assert json.loads((tmp_path / "meta_train" / "last.json").read_text())["adapt"] == "ft"
    assert not any("scale" in key or "shift" in key for key in last)
    conv_weights = [k for k in pretrained if k.endswith("weight") and pretrained[k].dim() == 4]
    assert conv_weights
    assert any(not pretrained[k].equal(last[k]) for k in conv_weights)  # the convs were meta-trained
    (result,) = meta_test.run(config, tmp_path, log=_quiet)
    assert 0 <= result["accuracy"] <= 100


def test_base_learner_options_meta_train_and_reach_meta_test_predict_and_export(small_smoke_run, fc100_small, tmp_path):
    """Prototype init, cosine logits with a learned temperature and a frozen theta: meta-train learns
    only what it should, and meta-test, the Python API and an export bundle score with the same learner."""
    import numpy as np

    from metatransfer.api import FewShotClassifier
    from metatransfer.export import export_run

    options = ["base_learner.fc_init=prototypes", "base_learner.prototype_normalise=true", "base_learner.logits=cosine",
               "base_learner.learn_temperature=true", "base_learner.learn_theta=false", "meta_train.lr_head=0.1"]
    config = _variant(small_smoke_run, tmp_path / "run", fc100_small, options)
    meta_train.run(config, tmp_path / "run", log=_quiet)
    last = load_file(str(tmp_path / "run" / "meta_train" / "last.safetensors"))
    assert torch.equal(last["head.weight"], torch.zeros_like(last["head.weight"]))  # frozen theta: no offset learned
    assert last["head.temperature"].item() != pytest.approx(10.0)  # the temperature was meta-learned
    (result,) = meta_test.run(config, tmp_path / "run", log=_quiet)
    assert {"gain", "start_accuracy"} <= set(result)
    split = load_split(*fc100_small, "test")
    support, query = np.flatnonzero(split.labels < 3)[::8][:6], np.flatnonzero(split.labels < 3)[1::8][:6]
    from_run = FewShotClassifier.from_run(tmp_path / "run", device="cpu")
    best = load_file(str(tmp_path / "run" / "meta_train" / "best.safetensors"))  # what the run's model is
    assert from_run.learner.logits == "cosine" and from_run.learner.temperature == pytest.approx(best["head.temperature"].item())
    export_run(tmp_path / "run", tmp_path / "bundle", "safetensors", log=_quiet)
    from_bundle = FewShotClassifier.from_export(tmp_path / "bundle", device="cpu")
    assert from_bundle.learner == from_run.learner and from_bundle.learner.temperature == pytest.approx(from_run.learner.temperature)
    for model in (from_run, from_bundle):
        model.fit(split.images[support], split.labels[support])
    assert np.allclose(from_run.predict_proba(split.images[query]), from_bundle.predict_proba(split.images[query]), atol=1e-4)


E3BM = ["base_learner.ensemble=e3bm", "base_learner.logits=cosine", "base_learner.fc_init=prototypes", "base_learner.feature_centre=true",
        "base_learner.learn_theta=false", "base_learner.temperature=8", "base_learner.lr=0.1", "meta_train.lr_hyperprior=0.01"]


def test_e3bm_runs_end_to_end_and_its_hyperprior_learners_reach_meta_test_predict_and_export(fc100_small, tmp_path):
    """`mtl run` with E3BM's classifier: the hyperprior learners are meta-learned, saved, scored by meta-test (with the
    paired gain over the untrained start), and the run and its bundle predict alike."""
    from metatransfer.api import FewShotClassifier
    from metatransfer.export import export_run
    from metatransfer.loading import BUNDLE_FILE
    from metatransfer.models.head import BaseLearner

    run = tmp_path / "run"
    assert main(["run", *_run_args(fc100_small, run, *E3BM)]) == 0
    (result,) = json.loads((run / "results.json").read_text())
    assert {"start_accuracy", "start_ci95", "gain", "gain_ci95"} <= set(result) and result["model"].startswith("meta_train/")
    last, best = (load_file(str(run / "meta_train" / f"{stem}.safetensors")) for stem in ("last", "best"))
    config = load_config("smoke", E3BM)
    start = BaseLearner.untrained(config.base_learner, last["head.weight"].shape[1], n_way=config.meta_train.n_way, seed=config.seed).tensors()
    learned = sorted(k for k in start if k.startswith("hyperprior."))  # theta is not learned here (learn_theta=false)
    assert set(start) <= set(last) and len(learned) == 6 and any(k.endswith("_init") for k in learned)
    unmoved = [k for k in learned if last[k].equal(start[k])]
    assert not unmoved, f"hyperprior tensors left at their start: {unmoved}"  # each one meta-learned, not just one of them
    from_run = FewShotClassifier.from_run(run, device="cpu")
    assert all(from_run.learner.tensors()[k].equal(best[k]) for k in start)  # the run's model is meta_train/best's
    export_run(run, tmp_path / "bundle", "safetensors", log=_quiet)
    assert json.loads((tmp_path / "bundle" / BUNDLE_FILE).read_text())["format_version"] == 4
    assert "E3BM ensemble over the steps (last init" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    from_bundle = FewShotClassifier.from_export(tmp_path / "bundle", device="cpu")
    assert from_bundle.learner == from_run.learner and from_bundle.learner.ensemble == "e3bm"
    assert all(from_bundle.learner.tensors()[k].equal(best[k]) for k in start)
    split = load_split(*fc100_small, "test")
    support, query = np.flatnonzero(split.labels < 3)[::8][:6], np.flatnonzero(split.labels < 3)[1::8][:6]
    for model in (from_run, from_bundle):
        model.fit(split.images[support], split.labels[support])
    assert np.allclose(from_run.predict_proba(split.images[query]), from_bundle.predict_proba(split.images[query]), atol=1e-4)


def test_meta_training_options_augment_and_bn_affine(small_smoke_run, fc100_small, tmp_path):
    common = ["meta_train.lr_ss=0.05"]
    plain = _variant(small_smoke_run, tmp_path / "plain", fc100_small, common)
    meta_train.run(plain, tmp_path / "plain", log=_quiet)
    pulled = _variant(small_smoke_run, tmp_path / "pulled", fc100_small, [*common, "meta_train.augment=true", "model.ss_bn_affine=true"])
    meta_train.run(pulled, tmp_path / "pulled", log=_quiet)
    pretrained = load_file(str(small_smoke_run / "pretrain" / "best.safetensors"))
    for run, learned in (("plain", False), ("pulled", True)):
        last = load_file(str(tmp_path / run / "meta_train" / "last.safetensors"))
        bn = [k for k in pretrained if k.startswith("backbone.features") and k.endswith(".1.weight")]  # conv4: conv, BN, ...
        assert bn and any(not last[k].equal(pretrained[k]) for k in bn) == learned


def test_meta_train_augment_is_seeded_by_iteration():

    from metatransfer.phases.meta_train import _augmentation

    config = load_config("smoke", ["meta_train.augment=true"])
    images = torch.randn(4, 3, 8, 8)
    assert torch.equal(_augmentation(config, 5, "cpu")(images), _augmentation(config, 5, "cpu")(images))
    assert not torch.equal(_augmentation(config, 5, "cpu")(images), images)
    assert _augmentation(load_config("smoke"), 5, "cpu") is None


def test_meta_training_starts_from_a_chosen_pre_training_epoch(fc100_small, tmp_path):
    out = tmp_path / "run"
    args = _run_args(fc100_small, out, "pretrain.epochs=2", "pretrain.save_epochs=1", "meta_train.init_checkpoint=epoch-1")
    assert main(["pretrain", *args]) == 0 and main(["meta-train", *args]) == 0
    epoch_1 = load_file(str(out / "pretrain" / "epoch-1.safetensors"))
    meta = json.loads((out / "pretrain" / "epoch-1.json").read_text())
    assert meta["epoch"] == 1 and not epoch_1["backbone.features.0.0.weight"].equal(
        load_file(str(out / "pretrain" / "last.safetensors"))["backbone.features.0.0.weight"])
    start = load_file(str(out / "meta_train" / "best.safetensors"))  # iteration 0 or later: frozen convs are epoch 1's
    assert start["backbone.features.0.0.weight"].equal(epoch_1["backbone.features.0.0.weight"])
    config = load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}", "meta_train.init_checkpoint=epoch-7"])
    with pytest.raises(FileNotFoundError, match="epoch-7.json is missing.*save_epochs"):
        meta_train.prepare_meta_model(config, out, 3)


def test_pre_training_holds_out_base_classes_that_meta_training_then_uses(fc100_small, tmp_path):
    from metatransfer.splits import held_out_classes

    out = tmp_path / "run"
    args = _run_args(fc100_small, out, "pretrain.held_out_classes=12", "meta_train.classes=held_out")
    assert main(["pretrain", *args]) == 0 and main(["meta-train", *args]) == 0
    assert json.loads((out / "pretrain" / "best.json").read_text())["num_classes"] == 48  # 60 FC100 base classes - 12
    held_out = held_out_classes(load_config("smoke", ["pretrain.held_out_classes=12"]), 60)
    names = load_split(*fc100_small, "train").class_names
    hard = json.loads((out / "meta_train" / "hard_classes.json").read_text())
    assert hard and set(hard) <= {names[c] for c in held_out}  # every meta-training task drew held-out classes
    config = load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}", "meta_train.classes=held_out"])
    with pytest.raises(ValueError, match="needs pretrain.held_out_classes"):
        meta_train.run(config, out, log=_quiet)


def test_each_validated_shot_keeps_its_own_checkpoint_and_meta_test_scores_that_shot_with_it(small_smoke_run, fc100_small, tmp_path):
    config = _variant(small_smoke_run, tmp_path, fc100_small, ["meta_train.val_shots=5", "meta_test.n_shot=5,1", "meta_test.n_query=5", "meta_train.lr_ss=0.05"])
    lines: list[str] = []
    meta_train.run(config, tmp_path, log=lines.append)
    val = [r for r in _records(tmp_path) if r["phase"] == "meta_train_val"]
    assert [r["step"] for r in val] == [0, 3, 6] and all({"accuracy", "accuracy_5shot", "ci95_5shot"} <= set(r) for r in val)
    assert f"5-shot {max(r['accuracy_5shot'] for r in val):.2f}%" in lines[-1]  # the closing line names each shot's best
    for stem, key in (("best", "accuracy"), ("best-5shot", "accuracy_5shot")):
        kept = json.loads((tmp_path / "meta_train" / f"{stem}.json").read_text())
        first_max = next(r for r in val if r[key] == max(v[key] for v in val))  # a later tie does not replace the kept one
        assert (kept["iteration"], kept["val_accuracy"], kept["val_shot"]) == (first_max["step"], first_max[key], 5 if "5" in stem else 1)
    results = meta_test.run(config, tmp_path, log=_quiet)
    assert [(r["shot"], r["model"], r["checkpoint"]) for r in results] == [(5, "meta_train/best-5shot", "best"), (1, "meta_train/best", "best")]
    assert all("gain" in r for r in results)
    unlisted = load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}", "meta_test.n_shot=5,1", "meta_test.n_query=5"])
    assert {r["model"] for r in meta_test.run(unlisted, tmp_path, log=_quiet)} == {"meta_train/best"}  # a config without val_shots ignores the file
    last = meta_test.run(load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}", "meta_test.n_shot=5,1", "meta_test.n_query=5",
                                               "meta_train.val_shots=5", "meta_test.checkpoint=last"]), tmp_path, log=_quiet)
    assert {r["model"] for r in last} == {"meta_train/last"}
    with pytest.raises(ValueError, match="val_shots"):
        check_config(load_config("smoke", ["meta_train.val_shots=0"]))


def test_meta_test_without_meta_training_uses_the_pretrained_backbone(small_smoke_run, fc100_small, tmp_path):
    config = _variant(small_smoke_run, tmp_path, fc100_small, [])
    (result,) = meta_test.run(config, tmp_path, log=_quiet)
    assert result["model"].startswith("pretrain/best")


@pytest.mark.parametrize("overrides", [[], ["meta_train.val_shots=5", "meta_test.n_query=5"], ["base_learner.ensemble=e3bm", "meta_train.lr_hyperprior=0.01"]],
                         ids=["one-shot", "val-shots", "e3bm"])
def test_interrupted_meta_train_resumes_to_the_same_model(small_smoke_run, fc100_small, tmp_path, monkeypatch, overrides):
    """Stopped after the checkpoint at iteration 3 of 6, a rerun continues to identical weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    config = _variant(small_smoke_run, straight, fc100_small, overrides)
    _variant(small_smoke_run, resumed, fc100_small, overrides)
    meta_train.run(config, straight, log=_quiet)

    calls = {"n": 0}
    gather = meta_train.gather_episode

    def interrupt_at_iteration_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return gather(*args, **kwargs)

    monkeypatch.setattr(meta_train, "gather_episode", interrupt_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        meta_train.run(config, resumed, log=_quiet)
    assert json.loads((resumed / "meta_train" / "last.json").read_text())["iteration"] == 3
    monkeypatch.setattr(meta_train, "gather_episode", gather)
    messages = []
    meta_train.run(config, resumed, log=messages.append)
    assert any("resuming meta-train at iteration 3" in m for m in messages)
    a = load_file(str(straight / "meta_train" / "last.safetensors"))
    b = load_file(str(resumed / "meta_train" / "last.safetensors"))
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    assert (straight / "meta_train" / "hard_classes.json").read_text() == (resumed / "meta_train" / "hard_classes.json").read_text()
    kept = sorted(p.name for p in (straight / "meta_train").glob("best*.json"))
    assert kept == (["best-5shot.json", "best.json"] if "meta_train.val_shots=5" in overrides else ["best.json"])
    assert all((straight / "meta_train" / name).read_text() == (resumed / "meta_train" / name).read_text() for name in kept)


# paper-scale presets with tiny step counts -------------------------------------------------------

TINY = [
    "pretrain.epochs=1", "pretrain.batch_size=32", "pretrain.val_episodes=5",
    "meta_train.iterations=2", "meta_train.val_every=2", "meta_train.val_episodes=5", "meta_train.n_query=5",
    "meta_test.episodes=5", "base_learner.steps=2", "model.width=0.125", "checkpoint_every=1",
]


@pytest.mark.parametrize(
    "preset, data_fixture",
    [("fc100", "fc100_small"), ("cifar-fs", "fc100_small"), ("miniimagenet", "tiny84"), ("tieredimagenet", "tiny84")],
)
def test_paper_preset_runs_end_to_end(preset, data_fixture, request, tmp_path):
    root, name = request.getfixturevalue(data_fixture)
    extra = ["pretrain.batch_size=16"] if data_fixture == "tiny84" else []
    out = tmp_path / "run"
    assert main(["run", "--preset", preset, "--data-root", str(root), "--out", str(out), f"data.name={name}", *TINY, *extra]) == 0
    expected = load_config(preset)
    meta = json.loads((out / "meta_train" / "best.json").read_text())
    assert meta["backbone"] == expected.model.backbone == "resnet12"
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["way"], r["shot"]) for r in results) == sorted(
        (way, shot) for way in expected.meta_test.n_way for shot in expected.meta_test.n_shot
    )
    assert all(r["episodes"] == 5 and 0 <= r["accuracy"] <= 100 for r in results)


def test_pre_training_distils_a_finished_run(small_smoke_run, fc100_small, tmp_path, capsys):
    """pretrain.distill_from: weight 0 is plain cross-entropy bit for bit (dropout on, so the teacher must not
    draw from the random stream); weight 1 ends nearer the teacher's predictions than weight 0 does."""
    student = ["seed=1", "model.drop_rate=0.1"]
    teach = [f"pretrain.distill_from={small_smoke_run}"]
    runs = {"plain": student, "0": [*student, *teach, "pretrain.distill_weight=0"], "1": [*student, *teach, "pretrain.distill_weight=1"]}
    for name, overrides in runs.items():
        assert main(["pretrain", *_run_args(fc100_small, tmp_path / name, *overrides)]) == 0
    first_conv = {name: load_file(str(tmp_path / name / "pretrain" / "last.safetensors"))["backbone.features.0.0.weight"] for name in runs}
    assert first_conv["0"].equal(first_conv["plain"]) and not first_conv["1"].equal(first_conv["plain"])
    saved = yaml.safe_load((tmp_path / "1" / "config.yaml").read_text())["pretrain"]
    assert saved["distill_from"] == str(small_smoke_run.resolve()) and len(saved["distill_sha256"]) == 64  # pinned when the run starts

    config = load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}"])
    train = load_split(*fc100_small, "train")
    images = torch.from_numpy(np.array(train.images[::4]))
    x = to_float(images, train.mean, train.std, device=torch.device("cpu"))

    def logits_of(run_dir: Path) -> torch.Tensor:
        network = pretrain.load_teacher(pretrain.resolve_teacher(replace(config, pretrain=replace(config.pretrain, distill_from=str(run_dir)))),
                                        3, train.num_classes, torch.device("cpu"))
        with torch.no_grad():
            return network(x)

    teacher = logits_of(small_smoke_run)
    distance = {name: float(pretrain.distillation_loss(logits_of(tmp_path / name), teacher, 4.0)) for name in ("0", "1")}
    assert distance["1"] < distance["0"]


def test_generations_pre_train_their_teachers_within_the_run(small_smoke_run, fc100_small, tmp_path, capsys):
    """pretrain.generations=2 is `mtl pretrain` twice, the second taught by the first, bit for bit; a
    resumed run keeps the finished generation; meta-training a given backbone pre-trains nothing."""
    student = ["seed=1", "model.drop_rate=0.1"]
    assert main(["pretrain", *_run_args(fc100_small, tmp_path / "first", *student)]) == 0
    assert main(["pretrain", *_run_args(fc100_small, tmp_path / "second", *student, f"pretrain.distill_from={tmp_path / 'first'}")]) == 0
    born = tmp_path / "born"
    assert main(["pretrain", *_run_args(fc100_small, born, *student, "pretrain.generations=2")]) == 0
    weights = {name: load_file(str(run_dir / "pretrain" / "last.safetensors"))
               for name, run_dir in (("first", tmp_path / "first"), ("second", tmp_path / "second"),
                                     ("born-1", born / "generations" / "1"), ("born", born))}
    for made, by_hand in (("born-1", "first"), ("born", "second")):
        assert all(weights[made][k].equal(weights[by_hand][k]) for k in weights[by_hand] if k.startswith(("backbone.", "head.")))
    assert not weights["born"]["backbone.features.0.0.weight"].equal(weights["born-1"]["backbone.features.0.0.weight"])
    assert "pre-train generation 2 of 2" in capsys.readouterr().out
    last_json = lambda run_dir: json.loads((run_dir / "pretrain" / "last.json").read_text())  # noqa: E731
    # its config.yaml says only generations=2; the checkpoint names the last teacher
    assert last_json(born)["teacher_sha256"] == last_json(born / "generations" / "1")["sha256"]
    generation_files = _files(born / "generations" / "1")
    assert main(["pretrain", "--resume", str(born)]) == 0
    resumed = capsys.readouterr().out
    assert f"already complete in {born} " in resumed and "pre-train generation" not in resumed  # finished: its teachers are not even visited
    assert _files(born / "generations" / "1") == generation_files
    transfer = tmp_path / "transfer"  # `mtl meta-train --init-from`: the backbone as it is, 0 epochs, no teachers
    assert main(["meta-train", "--init-from", str(small_smoke_run), *_run_args(fc100_small, transfer, "pretrain.generations=2")]) == 0
    assert (transfer / "meta_train" / "best.json").is_file() and not (transfer / "generations").exists()


def test_a_resumed_generation_is_taught_by_the_teacher_it_started_with(fc100_small, tmp_path, monkeypatch, capsys):
    """config.yaml pins no checksum for the last generation's teacher (it records only `generations`), so
    the checkpoint's does: a teacher re-trained while the run was stopped is refused, the same one resumes."""
    born = tmp_path / "born"

    def stop_after_the_first_epoch(stem, tensors, meta):
        save_checkpoint(stem, tensors, meta)
        if stem == born / "pretrain" / "last" and meta["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "save_checkpoint", stop_after_the_first_epoch)
    assert main(["pretrain", *_run_args(fc100_small, born, "pretrain.generations=2", "pretrain.epochs=2")]) == 130  # interrupted
    monkeypatch.undo()
    teacher = born / "generations" / "1" / "pretrain"
    kept = tmp_path / "kept-teacher"
    shutil.copytree(teacher, kept)
    tensors, meta = load_checkpoint(teacher / "last")
    tensors["head.bias"] = tensors["head.bias"] + 1.0  # re-trained, as far as the checksum can tell
    save_checkpoint(teacher / "last", tensors, {k: v for k, v in meta.items() if k not in ("sha256", "format_version")})
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(born)]) == 2
    assert f"distill_from={born / 'generations' / '1'}: its pretrain/last changed since this run started" in capsys.readouterr().err
    shutil.rmtree(teacher)
    shutil.copytree(kept, teacher)
    assert main(["pretrain", "--resume", str(born)]) == 0
    assert json.loads((born / "pretrain" / "last.json").read_text())["complete"]


def test_a_resumed_run_keeps_the_teacher_it_started_with_or_none(small_smoke_run, fc100_small, tmp_path, monkeypatch, capsys):
    """A config.yaml edited between stop and resume must not add or drop the teacher mid-run: the
    checkpoint's pin says which loss the epochs so far were trained with, and the resume is refused."""

    def stop_after_the_first_epoch(stem, tensors, meta):
        save_checkpoint(stem, tensors, meta)
        if stem.name == "last" and meta["epoch"] == 1:
            raise KeyboardInterrupt

    edits = {"taught": (f"pretrain.distill_from={small_smoke_run}", ""), "plain": ("seed=0", str(small_smoke_run))}
    for name, (override, edited) in edits.items():
        run_dir = tmp_path / name
        monkeypatch.setattr(pretrain, "save_checkpoint", stop_after_the_first_epoch)
        assert main(["pretrain", *_run_args(fc100_small, run_dir, override, "pretrain.epochs=2")]) == 130  # interrupted
        monkeypatch.undo()
        written = (run_dir / "config.yaml").read_text()
        saved = yaml.safe_load(written)
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**saved, "pretrain": {**saved["pretrain"], "distill_from": edited}}))
        before = _files(run_dir)
        capsys.readouterr()
        assert main(["pretrain", "--resume", str(run_dir)]) == 2
        error = capsys.readouterr().err
        assert f"{run_dir / 'pretrain' / 'last'}.json was pre-trained" in error and "restore" in error
        assert ("with the teacher" if name == "taught" else "without a teacher") in error
        assert _files(run_dir) == before  # refused before anything is written
        (run_dir / "config.yaml").write_text(written)
        assert main(["pretrain", "--resume", str(run_dir)]) == 0
        assert json.loads((run_dir / "pretrain" / "last.json").read_text())["complete"]


def test_a_teacher_must_have_finished_pre_training_on_the_same_classes(small_smoke_run, fc100_small, tmp_path, capsys):
    other_classes = tmp_path / "held-out"
    assert main(["pretrain", *_run_args(fc100_small, other_classes, "pretrain.held_out_classes=12")]) == 0
    with_teacher = lambda teacher: load_config("smoke", [f"data.root={fc100_small[0]}", f"data.name={fc100_small[1]}",  # noqa: E731
                                                         f"pretrain.distill_from={teacher}"])
    with pytest.raises(ValueError, match="learned 48 classes.*same base classes"):
        pretrain.run(pretrain.resolve_teacher(with_teacher(other_classes)), tmp_path / "student", log=_quiet)
    pinned = pretrain.resolve_teacher(with_teacher(small_smoke_run))
    copied = tmp_path / "copied-teacher"
    shutil.copytree(small_smoke_run, copied)
    changed = replace(pinned, pretrain=replace(pinned.pretrain, distill_from=str(copied), distill_sha256="0" * 64))
    with pytest.raises(ValueError, match="changed since this run started"):
        pretrain.load_teacher(changed, 3, 60, torch.device("cpu"))
    for stem in ("last.json", "last.safetensors"):
        (other_classes / "pretrain" / stem).unlink()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        pretrain.resolve_teacher(with_teacher(other_classes))
    transferred = tmp_path / "transferred"  # pre-trained for 0 epochs: its classifier never learned
    assert main(["pretrain", *_run_args(fc100_small, transferred, "pretrain.epochs=0", f"transfer.source={small_smoke_run}")]) == 0
    with pytest.raises(ValueError, match="0 epochs"):
        pretrain.resolve_teacher(with_teacher(transferred))
    student = tmp_path / "never-written"
    assert main(["pretrain", *_run_args(fc100_small, student, f"pretrain.distill_from={tmp_path / 'nowhere'}")]) == 2
    assert "is not a run directory" in capsys.readouterr().err and not student.exists()  # refused before anything is written


def test_pre_training_with_rotation_self_supervision(small_smoke_run, fc100_small, tmp_path):
    """pretrain.rotation_weight: 0 is plain pre-training bit for bit (dropout on); above 0 the run trains
    and keeps a 4-way rotation head beside the class head, its backbone differs, and it learns the
    turns of its training images well above the 25% of chance."""
    student = ["seed=1", "model.drop_rate=0.1", "pretrain.epochs=6"]
    runs = {"plain": student, "0": [*student, "pretrain.rotation_weight=0"], "1": [*student, "pretrain.rotation_weight=1"]}
    for name, overrides in runs.items():
        assert main(["pretrain", *_run_args(fc100_small, tmp_path / name, *overrides)]) == 0
    last = {name: load_file(str(tmp_path / name / "pretrain" / "last.safetensors")) for name in runs}
    first_conv = {name: tensors["backbone.features.0.0.weight"] for name, tensors in last.items()}
    assert first_conv["0"].equal(first_conv["plain"]) and not first_conv["1"].equal(first_conv["plain"])
    assert "rotation_head.weight" not in last["plain"] and last["1"]["rotation_head.weight"].shape == (4, last["1"]["head.weight"].shape[1])
    assert all("rotation_accuracy" not in r for r in _records(tmp_path / "0"))
    assert _records(tmp_path / "1")[-1]["rotation_accuracy"] > 35  # chance: 25 +- 2 (448 images an epoch); 41.5 measured


def test_pre_training_with_drop_block(fc100_small, tmp_path):
    """model.drop_block_rate reaches the ResNet-12 that pre-training trains: with the same seed the
    weights differ from a run without it, and the checkpoint has the same tensors (DropBlock has none)."""
    common = ["model.backbone=resnet12", "model.width=0.125", "pretrain.epochs=1"]
    for name, rate in (("plain", 0.0), ("drop_block", 0.2)):
        assert main(["pretrain", *_run_args(fc100_small, tmp_path / name, *common, f"model.drop_block_rate={rate}")]) == 0
    plain, dropped = (load_file(str(tmp_path / name / "pretrain" / "last.safetensors")) for name in ("plain", "drop_block"))
    assert plain.keys() == dropped.keys()
    assert not plain["backbone.features.0.conv1.weight"].equal(dropped["backbone.features.0.conv1.weight"])


def test_rotate_batch_turns_each_image_by_its_label():
    x = torch.randn(16, 3, 8, 8)
    rotated, turns = pretrain.rotate_batch(x, torch.Generator().manual_seed(0))
    assert rotated.shape == x.shape and set(turns.tolist()) == {0, 1, 2, 3}  # 16 draws: all four turns occur with this seed
    for image, turned, k in zip(x, rotated, turns.tolist()):
        assert turned.equal(torch.rot90(image, k, dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        pretrain.rotate_batch(torch.randn(2, 3, 8, 6), torch.Generator())


def test_distillation_loss_is_the_tempered_kl_divergence():
    student, teacher = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    p_teacher = torch.softmax(teacher / 4, dim=1)
    expected = 16 * (p_teacher * (torch.log(p_teacher) - torch.log_softmax(student / 4, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(pretrain.distillation_loss(student, teacher, 4.0), expected)
    assert pretrain.distillation_loss(teacher, teacher, 4.0).abs() < 1e-6
