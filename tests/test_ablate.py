import json

import pytest

from metatransfer.ablate import ROWS, checkpoints_of, collect_records, convergence_curves, summarise, write_table


def _result(shot: int, accuracy: float) -> dict:
    return {"dataset": "d", "split": "test", "way": 5, "shot": shot, "query": 15, "episodes": 600,
            "accuracy": accuracy, "ci95": 0.5, "protocol": "standard", "seed": 1}


def test_an_unfinished_ablation_is_summarised_from_the_runs_that_reached_meta_test(tmp_path):
    runs = {"ss--ht-1shot-seed0": 60.0, "ss--ht-1shot-seed1": 62.0, "ss-no-ht-1shot-seed0": 58.0,
            "pre-trained-fc-at-test-only-1shot-seed0": 55.0}
    for name, accuracy in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("model: {flip_average: true}\n")
        rescored = [{**_result(1, 1.0), "flip_average": True, "shift_views": 2}, {**_result(1, 1.0), "flip_average": False}]  # later rescorings
        (tmp_path / name / "results.json").write_text(json.dumps([{**_result(1, accuracy), "flip_average": True}, {**_result(1, 1.0), "way": 20},
                                                                  *rescored]))
    (tmp_path / "ft-no-ht-5shot-seed0").mkdir()  # started, never reached meta-test
    records = collect_records(tmp_path)
    assert len(records) == 4 and all(r["way"] == 5 and r["accuracy"] > 1.0 for r in records)  # each run's own scoring only
    assert sorted(r["seed"] for r in records if r["row"] == "SS + HT") == [0, 1]
    table = summarise(records)
    assert table[("SS + HT", 1)]["accuracy"] == 61.0 and table[("SS + HT", 1)]["seeds"] == 2
    assert table[("SS, no HT", 1)]["accuracy"] == 58.0
    text = write_table(records, tmp_path / "ablation.md", title="t")
    assert "| SS + HT | 61.00 +- 0.50 [1.41, 2 seeds] |" in text and "FT, no HT" not in text


def test_rows_are_tabled_with_the_best_and_the_last_checkpoint(tmp_path):
    records = [
        {"row": "pre-trained, FC at test only", "shot": 1, "seed": 0, "checkpoint": "best", **_result(1, 50.0)},
        {"row": "SS + HT", "shot": 1, "seed": 0, "checkpoint": "best", **_result(1, 50.0)},
        {"row": "SS + HT", "shot": 1, "seed": 0, "checkpoint": "last", **_result(1, 47.0)},
        {"row": "FT + HT", "shot": 1, "seed": 0, "checkpoint": "best", **_result(1, 50.0)},
        {"row": "FT + HT", "shot": 1, "seed": 0, "checkpoint": "last", **_result(1, 30.0)},
    ]
    assert checkpoints_of(records) == ["best", "last"] and checkpoints_of(records[:2]) == ["best"]
    last = summarise(records, "last")
    assert last[("SS + HT", 1)]["accuracy"] == 47.0 and last[("FT + HT", 1)]["accuracy"] == 30.0
    assert last[("pre-trained, FC at test only", 1)]["accuracy"] == 50.0  # one model, counted under both
    text = write_table(records, tmp_path / "ablation.md", title="t")
    assert "| row | 1-shot, best val | 1-shot, last |" in text
    assert "| FT + HT | 50.00 +- 0.50 | 30.00 +- 0.50 |" in text


def test_a_run_scored_with_best_and_last_gives_one_convergence_curve(tmp_path):
    for seed, accuracies in enumerate([(50.0, 52.0), (50.0, 48.0)]):
        run_dir = tmp_path / f"ss--ht-1shot-seed{seed}"
        run_dir.mkdir()
        lines = [{"phase": "meta_train_val", "step": step, "accuracy": a} for step, a in zip((0, 100), accuracies)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = [{"row": "SS + HT", "shot": 1, "seed": seed, "checkpoint": checkpoint, "run_dir": str(tmp_path / f"ss--ht-1shot-seed{seed}")}
               for seed in (0, 1) for checkpoint in ("best", "last")]
    steps, accuracy = convergence_curves(records, 1)["SS + HT"]
    assert steps.tolist() == [0, 100]
    assert accuracy.tolist() == [[50.0, 52.0], [50.0, 48.0]]  # two seeds, not four


def test_ablation_plot_draws_both_checkpoints(tmp_path):
    pytest.importorskip("matplotlib")
    from metatransfer.plots import plot_ablation

    tables = {"best": {("SS + HT", 1): {"accuracy": 50.0, "ci95": 0.5}, ("SS + HT", 5): {"accuracy": 60.0, "ci95": 0.5}},
              "last": {("SS + HT", 1): {"accuracy": 47.0, "ci95": 0.5}}}
    plot_ablation(tables, ["SS + HT", "FT + HT"], tmp_path / "ablation.png", title="t")
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mtl_ablate_end_to_end_writes_the_table_and_the_plots(fc100_small, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from metatransfer.cli import main

    root, name = fc100_small
    out = tmp_path / "ablation"
    args = ["ablate", "--preset", "smoke", "--data-root", str(root), "--out", str(out), "--seeds", "0", "--shots", "1",
            f"data.name={name}"]
    assert main(args) == 0
    table = (out / "ablation.md").read_text()
    assert "| row | 1-shot, best val | 1-shot, last |" in table
    for row in ("pre-trained, FC at test only", "FT, no HT", "FT + HT", "SS, no HT", "SS + HT"):
        assert f"| {row} | " in table
    for plot in ("ablation.png", "convergence-1shot.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    records = json.loads((out / "ablation.json").read_text())["records"]
    assert sorted({(r["row"], r["checkpoint"]) for r in records if r["row"] == "SS + HT"}) == [("SS + HT", "best"), ("SS + HT", "last")]
    assert {r["seed"] for r in records} == {0} and {r["test_seed"] for r in records} == {1}  # training vs episode seed
    assert main(["ablate", "--out", str(out), "--report-only", "--preset", "smoke", f"data.name={name}"]) == 0
    assert (out / "ablation.md").read_text() == table  # the report alone rebuilds the same table


def test_rows_are_chosen_and_ordered_by_short_name():
    from metatransfer.ablate import parse_rows

    assert parse_rows("ss+ht, ss,ss") == ["SS + HT", "SS, no HT"]
    assert parse_rows("pretrained,ft,ft+ht,ss,ss+ht") == list(ROWS)
    with pytest.raises(ValueError, match="choose from pretrained, ft, ft\\+ht, ss, ss\\+ht"):
        parse_rows("ss,hard")


def test_meta_trained_rows_show_their_paired_gain_over_the_pre_trained_start(tmp_path):
    records = [
        {"row": "pre-trained, FC at test only", "shot": 1, "seed": 0, "checkpoint": "best", **_result(1, 50.0)},
        {"row": "SS + HT", "shot": 1, "seed": 0, "checkpoint": "best", **_result(1, 51.0), "gain": 1.0, "gain_ci95": 0.25},
        {"row": "SS + HT", "shot": 1, "seed": 1, "checkpoint": "best", **_result(1, 52.0), "gain": 2.0, "gain_ci95": 0.35},
    ]
    assert summarise(records)[("SS + HT", 1)]["gain"] == 1.5
    text = write_table(records, tmp_path / "ablation.md", title="t")
    assert "| SS + HT | 51.50 +- 0.50 [0.71, 2 seeds]; gain +1.50 +- 0.30 |" in text and "paired gain over the pre-trained start" in text
    assert "| pre-trained, FC at test only | 50.00 +- 0.50 |" in text


def test_ft_rows_drop_the_settings_that_only_act_on_scaling_shifting():
    from metatransfer.ablate import _row_config
    from metatransfer.config import check_config, load_config

    base = load_config("smoke", ["model.ss_bn_affine=true"])
    ft, ss = _row_config(base, "ft", True, 1, 0), _row_config(base, "ss", True, 1, 0)
    assert (ft.model.ss_bn_affine, ft.meta_train.first_order) == (False, True)
    assert ss.model.ss_bn_affine
    assert _row_config(load_config("smoke", ["meta_train.val_shots=1,5"]), "ss", True, 5, 0).meta_train.val_shots == []
    check_config(ft)
    check_config(ss)


def _fake_phases(monkeypatch) -> list[tuple[str, int]]:
    """Replace meta-training and meta-testing by stubs that record which run and seed they were given."""
    from metatransfer import ablate

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(ablate.meta_train, "run", lambda config, run_dir, log: calls.append(("train", config.seed)))

    def fake_test(config, run_dir, log):
        calls.append(("test", config.seed))
        return [_result(config.meta_test.n_shot[0], 50.0)]

    monkeypatch.setattr(ablate.meta_test, "run", fake_test)
    return calls


def _pretrained_dir(tmp_path, *stems: str):
    run = tmp_path / "pretrained"
    (run / "pretrain").mkdir(parents=True)
    for stem in stems:
        for suffix in (".json", ".safetensors"):
            (run / "pretrain" / f"{stem}{suffix}").write_text(stem)
    return run


def test_ablation_starts_every_row_from_the_chosen_pretraining_checkpoint(tmp_path, monkeypatch):
    from metatransfer.ablate import run_ablation
    from metatransfer.config import load_config

    _fake_phases(monkeypatch)
    pretrained = _pretrained_dir(tmp_path, "epoch-4", "best")
    base = load_config("smoke", ["pretrain.save_epochs=4", "meta_train.init_checkpoint=epoch-4"])
    run_ablation(base, tmp_path / "out", shots=[1], seeds=[0], pretrained=pretrained, rows=["SS + HT"], log=lambda _: None)
    row = tmp_path / "out" / "ss--ht-1shot-seed0" / "pretrain"
    assert (row / "epoch-4.safetensors").read_text() == "epoch-4" and (row / "best.json").read_text() == "best"
    for stem in ("best.json", "best.safetensors"):
        (pretrained / "pretrain" / stem).unlink()
    with pytest.raises(FileNotFoundError, match="no pretrain/best checkpoint"):
        run_ablation(load_config("smoke"), tmp_path / "out2", shots=[1], seeds=[0], pretrained=pretrained, log=lambda _: None)


@pytest.mark.parametrize("init, seeds_scored", [("zeros", [0]), ("kaiming", [0, 1])])
def test_the_untrained_row_is_scored_per_seed_only_where_theta_starts_random(tmp_path, monkeypatch, init, seeds_scored):
    from metatransfer.ablate import run_ablation
    from metatransfer.config import load_config

    calls = _fake_phases(monkeypatch)
    base = load_config("smoke", [f"base_learner.init={init}"])
    records = run_ablation(base, tmp_path / "out", shots=[1], seeds=[0, 1], pretrained=_pretrained_dir(tmp_path, "best"),
                           rows=["pre-trained, FC at test only"], log=lambda _: None)
    assert calls == [("test", seed) for seed in seeds_scored]
    assert [r["seed"] for r in records] == seeds_scored
