import json

from metatransfer.ablate import collect_records, summarise, write_table


def _result(shot: int, accuracy: float) -> dict:
    return {"dataset": "d", "split": "test", "way": 5, "shot": shot, "query": 15, "episodes": 600,
            "accuracy": accuracy, "ci95": 0.5, "protocol": "standard"}


def test_an_unfinished_ablation_is_summarised_from_the_runs_that_reached_meta_test(tmp_path):
    runs = {"ss--ht-1shot-seed0": 60.0, "ss--ht-1shot-seed1": 62.0, "ss-no-ht-1shot-seed0": 58.0,
            "pre-trained-fc-at-test-only-1shot-seed0": 55.0}
    for name, accuracy in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps([_result(1, accuracy), {**_result(1, 1.0), "way": 20}]))
    (tmp_path / "ft-no-ht-5shot-seed0").mkdir()  # started, never reached meta-test
    records = collect_records(tmp_path)
    assert len(records) == 4 and all(r["way"] == 5 for r in records)
    table = summarise(records)
    assert table[("SS + HT", 1)]["accuracy"] == 61.0 and table[("SS + HT", 1)]["seeds"] == 2
    assert table[("SS, no HT", 1)]["accuracy"] == 58.0
    text = write_table(records, tmp_path / "ablation.md", title="t")
    assert "| SS + HT | 61.00 +- 0.50 [1.41, 2 seeds] |" in text and "FT, no HT" not in text
