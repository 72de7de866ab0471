"""`run_experiment` / `experiment_config`: the Python API does what `mtl run` does (checks, --init-from, lock).

The README's own Python section is run as written in tests/test_docs.py; here, the API's refusals and
its agreement with the CLI on a smoke run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import metatransfer
from metatransfer.cli import main
from metatransfer.config import config_to_dict, load_config
from metatransfer.experiment import experiment_config, run_experiment
from metatransfer.run import lock_run_dir


def _smoke(data: tuple[Path, str]) -> dict:
    root, name = data
    return {"data_root": str(root), "overrides": [f"data.name={name}", "device=cpu"]}


def test_the_package_exports_run_experiment():
    assert metatransfer.run_experiment is run_experiment
    assert "run_experiment" in metatransfer.__all__


@pytest.mark.parametrize("override, message", [
    ("meta_train.val_every=0", "meta_train.val_every must be at least 1"),
    ("base_learner.logits=cosine", "needs a non-zero start"),  # check_config, as the CLI runs it
    ("pretrain.epochs=0", "only makes sense with --init-from"),
])
def test_bad_settings_are_refused_before_anything_is_written(override, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_experiment("smoke", tmp_path / "run", data_root=tmp_path / "data", overrides=[override])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key, value, message", [
    ("val_every", 0, "meta_train.val_every must be at least 1"),
    ("lr_hyperprior", 0.0, "meta_train.lr_hyperprior is a learning rate"),
    ("classes", "some", "meta_train.classes must be one of"),
])
def test_a_config_object_is_range_checked_as_yaml_and_overrides_are(key, value, message, tmp_path):
    """A `Config` built or changed in Python never went through the reading that checks each value:
    `run_experiment` checks every key of it, before writing anything."""
    config = load_config("smoke")
    setattr(config.meta_train, key, value)
    with pytest.raises(ValueError, match=message):
        experiment_config(config)
    with pytest.raises(ValueError, match=message):
        run_experiment(config, tmp_path / "run", data_root=tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_init_from_source_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match="--init-from"):
        run_experiment("smoke", tmp_path / "run", init_from=tmp_path / "nothing")
    assert not (tmp_path / "run").exists()


def test_a_run_directory_in_use_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    with lock_run_dir(out):
        with pytest.raises(ValueError, match="in use by another process"):
            run_experiment("smoke", out, data_root=tmp_path / "data")
        assert not (out / "config.yaml").exists()


def test_resume_takes_no_preset_and_only_rescoring_overrides(tmp_path):
    with pytest.raises(ValueError, match="--resume continues a run as it was configured"):
        run_experiment("smoke", tmp_path, resume=True)
    with pytest.raises(ValueError, match="--resume continues a run as it was configured"):
        run_experiment(out=tmp_path, resume=True, overrides=["meta_train.iterations=3"])
    with pytest.raises(FileNotFoundError, match="not a run directory"):  # a rescoring override passes, the run is missing
        run_experiment(out=tmp_path, resume=True, phases=["meta-test"], overrides=["meta_test.episodes=5"])
    with pytest.raises(ValueError, match="phases"):
        run_experiment("smoke", tmp_path / "run", phases=["fine-tune"])


def test_the_config_is_the_one_mtl_config_prints(tmp_path, capsys):
    argv = ["config", "--preset", "smoke", "--data-root", str(tmp_path), "meta_train.iterations=3"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert config_to_dict(experiment_config("smoke", ["meta_train.iterations=3"], data_root=tmp_path)) == printed
    # a Config in place of a preset name: the overrides and data root apply to it as to a preset
    config = experiment_config(load_config("smoke"), ["meta_train.iterations=3"], data_root=tmp_path)
    assert config_to_dict(config) == printed


def test_a_run_made_by_the_api_is_a_run_the_cli_and_the_classifier_read(fc100_small, tmp_path):
    out = run_experiment("smoke", tmp_path / "run", **_smoke(fc100_small))
    assert out == tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert [row["shot"] for row in results] == [1] and not (out / ".lock").exists()
    assert main(["meta-test", "--resume", str(out)]) == 0  # the CLI rescoring reads it, and scores it the same
    assert json.loads((out / "results.json").read_text()) == results
    assert metatransfer.FewShotClassifier.load(out).info  # the model loads
    with pytest.raises(ValueError, match="holds another configuration"):  # as `mtl run` on it with other settings
        run_experiment("smoke", out, data_root=fc100_small[0], overrides=[*_smoke(fc100_small)["overrides"], "seed=5"])
    # --init-from takes it: experiment_config reads the source and records its checksum
    config = experiment_config("smoke", ["pretrain.epochs=0"], init_from=out)
    assert config.transfer.source == str(out.resolve()) and len(config.transfer.sha256) == 64
