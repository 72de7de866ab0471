"""Phase 3, meta-test: the run's model fine-tuned on each unseen task's support set, scored on its queries.

The run's model (`loading.load_run_model`) is scored by `evaluation.evaluate_split` on seeded test
episodes, which depend only on `meta_test.seed`, way and shot: every model is scored on the same
tasks. A meta-trained model's pre-trained start is scored on the very same episodes, for the paired
gain over it. With `--dataset`, another prepared dataset is scored, fitted to the run's input
(cross-domain, `phases.cross_domain`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from metatransfer.config import Config
from metatransfer.data.cache import ImageSplit
from metatransfer.evaluation import EpisodePlan, confidence_interval, evaluate_split
from metatransfer.loading import load_run_model, load_start_model, shot_best_stem
from metatransfer.model import FewShotModel
from metatransfer.phases.cross_domain import load_foreign_split
from metatransfer.run import checkpoint_exists, resolve_device, write_json
from metatransfer.splits import load_run_split

__all__ = ["add_paired_gain", "format_table", "score_run", "episodes_file_name", "write_results", "run"]


def add_paired_gain(result: dict[str, Any], start: dict[str, Any]) -> None:
    """Put the start's score on the same episodes into `result`, with the paired gain: the mean of
    the per-episode differences and its 95% CI, far tighter than two separate intervals."""
    gain, gain_ci95 = confidence_interval(np.asarray(result["per_episode"]) - np.asarray(start["per_episode"]))
    result.update(start_model=f"pretrain/{start.get('checkpoint', 'best')}, untrained base-learner", start_accuracy=start["accuracy"], start_ci95=start["ci95"],
                  gain=round(gain, 3), gain_ci95=round(gain_ci95, 3), start_per_episode=start["per_episode"])


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The printed results; with a pre-trained start, its accuracy and the paired gain over it."""
    paired = any("gain" in r for r in results)
    header = f"{'dataset':<14} {'split':<5} {'way':>3} {'shot':>4} {'query':>5} {'episodes':>8}  accuracy (95% CI)"
    lines = [header + ("   pre-trained start   paired gain" if paired else "")]
    for r in results:
        line = f"{r['dataset']:<14} {r['split']:<5} {r['way']:>3} {r['shot']:>4} {r['query']:>5} {r['episodes']:>8}  {r['accuracy']:6.2f} +- {r['ci95']:.2f}"
        if "gain" in r:
            line += f"     {r['start_accuracy']:6.2f} +- {r['start_ci95']:.2f}    {r['gain']:+6.2f} +- {r['gain_ci95']:.2f}"
        lines.append(line)
    return "\n".join(lines)


def _checkpoint_per_shot(run_dir: Path, config: Config) -> dict[int, str]:
    """meta_test.checkpoint for every test shot, except that `best` means, for a shot validated on its
    own (in meta_train.val_shots, other than n_shot), the checkpoint that validation picked: best-<K>shot."""
    chosen, meta = config.meta_test.checkpoint, config.meta_train
    own = {shot for shot in meta.val_shots if shot != meta.n_shot and checkpoint_exists(shot_best_stem(run_dir, shot))}
    return {shot: shot_best_stem(run_dir, shot).name if chosen == "best" and shot in own else chosen for shot in config.meta_test.n_shot}


def _for_scoring(model: FewShotModel, config: Config, device: torch.device) -> FewShotModel:
    """A loaded model as meta-test runs it: the run's `amp` and `channels_last`, on `device`."""
    return dataclasses.replace(model, amp=config.amp, channels_last=config.channels_last).to(device)


def score_run(run_dir: Path, config: Config, split: ImageSplit, device: torch.device) -> tuple[list[dict[str, Any]], str]:
    """The run's model on `split`'s seeded test episodes; a meta-trained model also gets its
    pre-trained start scored on the very same episodes, and the paired gain over it. Shots validated
    on their own are scored with their own checkpoint (episodes depend on way and shot only)."""
    test = config.meta_test
    per_shot = _checkpoint_per_shot(run_dir, config)
    results, sources = [], []
    for checkpoint in dict.fromkeys(per_shot.values()):
        # named by the config rather than by `checkpoint=`, so that a run without meta-training is scored from its pre-trained start
        named = dataclasses.replace(config, meta_test=dataclasses.replace(test, checkpoint=checkpoint))
        model = _for_scoring(load_run_model(run_dir, named), config, device)
        source = model.info["checkpoint"]
        plan = dataclasses.replace(EpisodePlan.from_config(test), shots=[shot for shot, name in per_shot.items() if name == checkpoint])
        scored = evaluate_split(model, split, plan)
        if source.startswith("meta_train"):
            start = _for_scoring(load_start_model(run_dir, config), config, device)
            for result, start_result in zip(scored, evaluate_split(start, split, plan)):
                add_paired_gain(result, {**start_result, "checkpoint": config.meta_train.init_checkpoint})
        for result in scored:
            result["model"], result["checkpoint"] = source, test.checkpoint
        results += scored
        sources.append(source)
    order = {(way, shot): i for i, (way, shot) in enumerate((w, k) for w in test.n_way for k in test.n_shot)}
    results.sort(key=lambda r: order[(r["way"], r["shot"])])
    return results, " and ".join(sources)


def episodes_file_name(result: dict[str, Any]) -> str:
    """The file, under a run's meta_test/ folder, of one results.json row's per-episode accuracies
    (one file per row: split, setting, checkpoint, flip and shifts each name it)."""
    return (f"episodes-{result['way']}way-{result['shot']}shot-{result['protocol']}"
            + (f"-{result['split']}" if result.get("split", "test") != "test" else "")
            + ("-last" if result.get("checkpoint", "best") == "last" else "")
            + ("-flip" if result.get("flip_average") else "")
            + (f"-shift{result['shift_views']}" if result.get("shift_views") else "") + ".json")


def write_results(results: list[dict[str, Any]], results_path: Path, episodes_dir: Path) -> None:
    """Per-episode accuracies to `episodes_dir`; the summaries into `results_path`, where a new
    result replaces the old one of the same setting and the others are kept."""
    for result in results:
        episodes = {"per_episode_accuracy": result.pop("per_episode")}
        if "start_per_episode" in result:
            episodes["start_per_episode_accuracy"] = result.pop("start_per_episode")
        write_json(episodes_dir / episodes_file_name(result), episodes)

    def key(result: dict[str, Any]) -> tuple:
        return (result["split"], result["way"], result["shot"], result["protocol"], result.get("checkpoint", "best"),
                result.get("flip_average", False), result.get("shift_views", 0))

    previous = []
    if results_path.is_file():
        keys = {key(r) for r in results}
        previous = [r for r in json.loads(results_path.read_text()) if key(r) not in keys]
    write_json(results_path, previous + results)


def run(config: Config, run_dir: Path, *, dataset: str | None = None, data_root: str | Path | None = None, log=print) -> list[dict[str, Any]]:
    """Score the run's model on its configured test episodes; write results.json and per-episode files.

    Args:
        dataset: another prepared dataset to score the run on (cross-domain): its `meta_test.split`
            is fitted to the run's input (size, channels, normalisation) and the results go to
            `results-<dataset>.json` and `meta_test/<dataset>/`, never over the run's own.
        data_root: where `dataset` is prepared (default: the run's `data.root`).
    """
    device = resolve_device(config.device)
    if dataset is None:
        split = load_run_split(config, config.meta_test.split)
        results_path, episodes_dir = run_dir / "results.json", run_dir / "meta_test"
    else:
        split = load_foreign_split(config, data_root or config.data.root, dataset, config.meta_test.split)
        results_path, episodes_dir = run_dir / f"results-{dataset}.json", run_dir / "meta_test" / dataset
    results, source = score_run(run_dir, config, split, device)
    write_results(results, results_path, episodes_dir)
    log(f"meta-test of {source} on {split.dataset}/{split.split}:")
    log(format_table(results))
    return results
