"""Config: shipped presets load, overrides are type-checked, unknown keys and bad choices fail."""

from __future__ import annotations

import pytest
import yaml

from metatransfer.config import (
    Config,
    config_from_dict,
    check_config,
    config_to_dict,
    list_presets,
    load_config,
)


def test_list_presets_names_the_shipped_files():
    presets = list_presets()
    for name in ("smoke", "fc100", "fc100-cpu", "cifar-fs", "cifar-fs-cpu", "miniimagenet", "tieredimagenet", "omniglot-cpu"):
        assert name in presets


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_loads_and_differs_from_defaults(preset):
    config = load_config(preset)
    # No shipped preset combines settings that do not work together (transfer-cpu is used with --init-from).
    check_config(load_config(preset, ["transfer.source=RUN"] if config.pretrain.epochs == 0 else []))
    assert isinstance(config, Config)
    assert config_to_dict(config) != config_to_dict(Config())


def test_preset_values_are_applied():
    config = load_config("smoke")
    assert config.model.backbone == "conv4"
    assert config.model.width == 0.25
    assert config.meta_train.iterations == 6
    assert config.meta_train.hard_tasks.normal_iterations == 2
    assert config.meta_test.n_shot == [1]


def test_overrides_come_after_the_preset():
    config = load_config("smoke", ["meta_train.iterations=3", "model.backbone=resnet12"])
    assert config.meta_train.iterations == 3
    assert config.model.backbone == "resnet12"
    assert config.model.width == 0.25  # the preset's value survives


def test_no_preset_gives_defaults():
    assert config_to_dict(load_config(None)) == config_to_dict(Config())


def test_int_key_rejects_text():
    with pytest.raises(ValueError, match="meta_train.iterations"):
        load_config("smoke", ["meta_train.iterations=abc"])


def test_int_key_rejects_float_and_bool():
    with pytest.raises(ValueError, match="expects int"):
        load_config(None, ["meta_train.iterations=2.5"])
    with pytest.raises(ValueError, match="expects int"):
        load_config(None, ["meta_train.iterations=true"])


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("0.001", 1e-3), ("2", 2.0), ("5.0e-4", 5e-4)])
def test_float_key_accepts_numbers_in_any_notation(text, value):
    config = load_config(None, [f"meta_train.lr_ss={text}"])
    assert isinstance(config.meta_train.lr_ss, float)
    assert config.meta_train.lr_ss == pytest.approx(value)


def test_float_key_rejects_text():
    with pytest.raises(ValueError, match="meta_train.lr_ss expects float"):
        load_config(None, ["meta_train.lr_ss=fast"])


def test_bool_key():
    assert load_config(None, ["amp=false"]).amp is False
    assert load_config(None, ["amp=true"]).amp is True
    with pytest.raises(ValueError, match="amp expects bool"):
        load_config(None, ["amp=3"])


def test_list_key_from_comma_separated_values():
    config = load_config(None, ["meta_test.n_shot=1,5"])
    assert config.meta_test.n_shot == [1, 5]


def test_list_key_from_one_value_and_yaml_list():
    assert load_config(None, ["meta_test.n_shot=5"]).meta_test.n_shot == [5]
    assert load_config(None, ["meta_test.n_way=[5, 20]"]).meta_test.n_way == [5, 20]


def test_list_key_checks_item_type():
    with pytest.raises(ValueError, match="meta_test.n_shot"):
        load_config(None, ["meta_test.n_shot=1,x"])


def test_unknown_key_fails_naming_it():
    with pytest.raises(ValueError, match="meta_train.iteration"):
        load_config(None, ["meta_train.iteration=3"])
    with pytest.raises(ValueError, match="'nosuchsection'"):
        load_config(None, ["nosuchsection.key=1"])


def test_unknown_key_in_preset_file_fails(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {backbone: conv4, depth: 3}\n")
    with pytest.raises(ValueError, match="model.depth"):
        load_config(str(path))


def test_preset_file_path_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {backbone: conv4}\nmeta_train: {n_shot: 5, hard_tasks: {enabled: false}}\n")
    config = load_config(str(path))
    assert config.model.backbone == "conv4"
    assert config.meta_train.n_shot == 5
    assert config.meta_train.hard_tasks.enabled is False


def test_missing_preset_file_and_unknown_preset_name():
    with pytest.raises(FileNotFoundError):
        load_config("/no/such/preset.yaml")
    with pytest.raises(ValueError, match="Unknown preset 'nosuch'.*smoke"):
        load_config("nosuch")


@pytest.mark.parametrize(
    "override", ["model.bn_mode=xyz", "model.adapt=maml", "data.augment=mixup", "meta_test.protocol=other", "base_learner.ensemble=maml"]
)
def test_choices_are_enforced(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=f"{key} must be one of"):
        load_config(None, [override])


def test_choice_accepts_a_listed_value():
    assert load_config(None, ["model.bn_mode=batch"]).model.bn_mode == "batch"


def test_nested_section_override():
    config = load_config("smoke", ["meta_train.hard_tasks.enabled=false", "meta_train.hard_tasks.hard_iterations=7"])
    assert config.meta_train.hard_tasks.enabled is False
    assert config.meta_train.hard_tasks.hard_iterations == 7
    assert config.meta_train.hard_tasks.normal_iterations == 2  # from the preset


def test_a_section_cannot_be_set_to_a_value():
    with pytest.raises(ValueError, match="is a section"):
        load_config(None, ["meta_train=3"])


def test_override_without_equals_sign_fails():
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["meta_train.iterations"])


def test_dict_round_trip():
    config = load_config("omniglot-cpu", ["meta_train.lr_ss=1e-3"])
    assert config_from_dict(config_to_dict(config)) == config


def test_text_overrides_keep_their_raw_text():
    config = load_config(None, ["data.root=/data/a,b", "data.name=on"])
    assert config.data.root == "/data/a,b"
    assert config.data.name == "on"


@pytest.mark.parametrize("override", ["meta_train.lr_head=1e38", "pretrain.lr=0", "base_learner.lr=-0.1", "meta_train.lr_hyperprior=0"])
def test_absurd_learning_rates_are_refused(override):
    with pytest.raises(ValueError, match="learning rate"):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["base_learner.logits=cosine"], "needs a non-zero start"),
    (["meta_train.val_seed=1"], "equals meta_test.seed"),
    (["meta_train.classes=held_out"], "needs pretrain.held_out_classes"),
    (["pretrain.epochs=0"], "only makes sense with --init-from"),
    (["meta_train.init_checkpoint=epoch-3"], "epoch-N with N in pretrain.save_epochs"),
    (["model.adapt=ft", "model.ss_bn_affine=true"], "with model.adapt=ft there is none"),
    (["base_learner.learn_temperature=true"], "scales cosine logits only"),
    (["pretrain.distill_weight=1.5"], r"distill_weight=1.5 must lie in \[0, 1\]"),
    (["pretrain.distill_temperature=0"], "distill_temperature=0.0 .*be positive"),
    (["pretrain.rotation_weight=-1"], "rotation_weight=-1.0 must be 0"),
    (["views.shift_pixels=-2"], "views.shift_pixels=-2 is a number of pixels"),
    (["model.drop_block_rate=0.1"], "drop_block_rate=0.1 is a ResNet-12 option; model.backbone='conv4'"),
    (["model.backbone=resnet12", "model.drop_block_rate=1.0"], r"drop_block_rate=1.0 must lie in \[0, 1\)"),
    (["model.backbone=resnet12", "model.drop_block_size=0"], "drop_block_size=0 be at least 1"),
    (["pretrain.generations=0"], "generations=0 must be at least 1"),
    (["pretrain.generations=2", "pretrain.distill_from=/some/run"], "only without pretrain.distill_from"),
    (["pretrain.generations=2", "pretrain.epochs=0", "transfer.source=/some/run"], "with pretrain.epochs > 0"),
    (["base_learner.ensemble=e3bm", "base_learner.steps=0"], "with base_learner.steps=0 there are none"),
    (["base_learner.ensemble_init=equal"], "needs base_learner.ensemble=e3bm"),
])
def test_settings_that_do_not_work_together_are_refused_before_a_run(overrides, message):
    from metatransfer.config import check_config

    with pytest.raises(ValueError, match=message):
        check_config(load_config("smoke", overrides))
    check_config(load_config("smoke", ["base_learner.logits=cosine", "base_learner.fc_init=prototypes",
                                       "pretrain.save_epochs=3", "meta_train.init_checkpoint=epoch-3"]))
    check_config(load_config("smoke", ["model.backbone=resnet12_wide", "model.drop_block_rate=0.1", "model.drop_block_size=5"]))
    check_config(load_config("smoke", ["base_learner.ensemble=e3bm", "base_learner.ensemble_init=equal"]))


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_takes_e3bm_with_either_start(preset):
    from metatransfer.config import check_config

    source = ["transfer.source=/some/run"] if load_config(preset).pretrain.epochs == 0 else []  # transfer-cpu: run with --init-from
    for start in ("last", "equal"):
        config = load_config(preset, [*source, "base_learner.ensemble=e3bm", f"base_learner.ensemble_init={start}"])
        check_config(config)
        assert config.base_learner.ensemble == "e3bm" and config.base_learner.steps > 0


def test_the_cli_checks_combinations_before_writing_the_run_dir(tmp_path, capsys):
    from metatransfer.cli import main

    assert main(["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "base_learner.logits=cosine"]) == 2
    assert "needs a non-zero start" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", [
    "meta_train.val_every=0", "meta_train.lr_decay_every=0", "pretrain.val_every=0", "checkpoint_every=0",
    "meta_train.iterations=0", "pretrain.epochs=-1", "pretrain.batch_size=0", "pretrain.lr_step=0",
    "meta_train.n_way=1", "meta_train.n_shot=0", "meta_train.n_query=0", "meta_train.n_tasks=0",
    "meta_train.val_episodes=0", "pretrain.val_episodes=0", "pretrain.save_epochs=4,0",
    "base_learner.steps=-1", "meta_train.hard_tasks.hard_iterations=-1", "meta_test.episodes=0",
    "meta_test.n_way=5,1", "meta_test.n_shot=0", "meta_test.n_query=0", "model.width=0", "model.drop_rate=1",
    "meta_train.lr_gamma=0", "base_learner.temperature=0", "data.crop_padding=-1", "pretrain.weight_decay=-1e-4",
])
def test_sizes_and_intervals_out_of_range_are_refused_as_the_config_loads_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"^Config key {key} must "):
        load_config("smoke", [override])


@pytest.mark.parametrize("override", ["meta_train.val_every=0", "meta_train.lr_decay_every=0", "pretrain.val_every=0"])
def test_the_cli_refuses_an_interval_of_0_naming_the_key_before_writing_anything(override, tmp_path, capsys):
    from metatransfer.cli import main

    assert main(["run", "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), override]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"mtl: error: Config key {override.split('=')[0]} must be at least 1; got 0.")
    assert list(tmp_path.iterdir()) == []


def test_the_smallest_valid_sizes_load():
    load_config("smoke", ["pretrain.epochs=0", "base_learner.steps=0", "meta_train.iterations=1", "meta_train.n_way=2",
                          "meta_train.hard_tasks.hard_iterations=0", "data.crop_padding=0", "model.drop_rate=0"])


# renamed and removed settings ---------------------------------------------------------------------

def _old_run_config(tmp_path, **changes):
    """A run directory whose config.yaml was written before the test-time views and the transfer
    source had sections of their own, with the removed settings at their old defaults."""
    from metatransfer.config import REMOVED, config_to_dict

    values = config_to_dict(load_config("fc100-cpu"))
    views, transfer = values.pop("views"), values.pop("transfer")
    values["model"].update(flip_average=views["flip"], shift_views=views["shift_pixels"], init_from=transfer["source"],
                           init_sha256=transfer["sha256"], init_normalisation=transfer["normalisation"])
    for dotted, default in {**REMOVED, **changes}.items():
        *sections, key = dotted.split(".")
        node = values
        for section in sections:
            node = node[section]
        node[key] = default
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return run


def test_an_old_run_config_loads_with_renamed_keys_under_their_new_names(tmp_path):
    from metatransfer.experiment import experiment_config
    from metatransfer.run import read_run_config

    config = read_run_config(_old_run_config(tmp_path))
    assert (config.views.flip, config.views.shift_pixels, config.transfer.normalisation) == (True, 2, "dataset")
    assert config == load_config("fc100-cpu")
    # as `mtl run --resume` and `mtl meta-test --resume RUN views.shift_pixels=0` read it
    assert experiment_config(None, [], resume=tmp_path / "old-run") == config
    rescored = experiment_config(None, ["views.shift_pixels=0"], resume=tmp_path / "old-run", phases=("meta-test",))
    assert rescored.views.shift_pixels == 0


def test_every_renamed_key_has_a_new_home_and_every_removed_key_is_gone():
    from metatransfer.config import REMOVED, RENAMED, _field_type

    assert all(_field_type(new) is not None and _field_type(old) is None for old, new in RENAMED.items())
    assert all(_field_type(old) is None for old in REMOVED)


@pytest.mark.parametrize("key, value", [("meta_train.ss_l2", 0.1), ("model.ss_shortcuts", True),
                                        ("meta_train.hard_tasks.fresh_images", False), ("base_learner.prototype_scale", 3.0)])
def test_an_old_run_that_used_a_removed_option_is_refused_naming_it(tmp_path, key, value):
    from metatransfer.run import read_run_config

    with pytest.raises(ValueError, match=rf"sets {key}={value!r}, an option that has been removed.*that run used a removed option"):
        read_run_config(_old_run_config(tmp_path, **{key: value}))


def test_a_preset_file_with_old_names_loads_and_one_with_both_names_is_refused(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model: {backbone: conv4, flip_average: true, shift_views: 1}\nmeta_train: {ss_l2: 0.0}\n")
    assert load_config(str(old)).views == load_config(None, ["views.flip=true", "views.shift_pixels=1"]).views
    both = tmp_path / "both.yaml"
    both.write_text("model: {flip_average: true}\nviews: {flip: false}\n")
    with pytest.raises(ValueError, match="sets both model.flip_average and views.flip"):
        load_config(str(both))


@pytest.mark.parametrize("override, message", [
    ("model.flip_average=true", "Config key model.flip_average is now views.flip"),
    ("model.shift_views=2", "Config key model.shift_views is now views.shift_pixels"),
    ("model.init_from=runs/x", "Config key model.init_from is now transfer.source"),
    ("meta_train.ss_l2=0", "Config key meta_train.ss_l2 has been removed"),
])
def test_an_override_with_an_old_name_is_refused_naming_the_new_key(override, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        load_config("smoke", [override])


@pytest.mark.parametrize("override, message", [
    ("meta_train.hard_tasks.min_classes=8", "Config key meta_train.hard_tasks.min_classes has been removed"),
    ("model.shift_views=2", "Config key model.shift_views is now views.shift_pixels"),
])
def test_the_cli_refuses_a_renamed_or_removed_key_with_exit_2_before_writing_anything(override, message, tmp_path, capsys):
    from metatransfer.cli import main

    assert main(["run", "--preset", "smoke", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "run"), override]) == 2
    assert capsys.readouterr().err.startswith(f"mtl: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_every_run_config_kept_in_docs_still_loads():
    """The run files that back docs/results.md were written by older versions: renamed keys and
    removed ones at their defaults must not stop them loading."""
    from pathlib import Path

    from metatransfer.run import read_run_config

    paths = sorted((Path(__file__).resolve().parents[1] / "docs").rglob("config.yaml"))
    assert paths
    for path in paths:
        read_run_config(path.parent)
