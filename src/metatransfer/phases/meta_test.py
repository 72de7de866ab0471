"""Phase 3, meta-test: fine-tune the base-learner on each unseen task's support set, score its queries.

The features of the images the episodes use are computed once (BN frozen, SS folded into the
convs) and the fine-tuning of all episodes runs as one batched inner loop, so thousands of episodes
cost at most one pass over the split, and a few hundred episodes of a large split (tieredImageNet's
206k test images) only the images they draw. With `model.bn_mode=batch` every episode is forwarded
on its own instead.
Episodes depend only on `meta_test.seed`, way and shot: every model is scored on the same tasks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from metatransfer.config import Config
from metatransfer.data.cache import ImageSplit
from metatransfer.data.episodes import TaskIndices, TaskSampler, gather_episode
from metatransfer.models.fuse import inference_copy
from metatransfer.models.head import BaseLearner
from metatransfer.models.scale_shift import apply_scale_shift, fold_scale_shift
from metatransfer.phases.cross_domain import load_foreign_split
from metatransfer.phases.features import (
    batch_statistics, build_backbone, extract_features, forward_images, load_pretrained_backbone, load_run_split, pretrained_stem, shot_best_stem,
    untrained_learner, untrained_theta,
)
from metatransfer.progress import progress_bar
from metatransfer.run import checkpoint_exists, load_checkpoint, resolve_device, tensors_under, write_json

__all__ = [
    "confidence_interval", "evaluate_features", "load_meta_model", "load_start_model", "evaluate_split", "add_paired_gain",
    "format_table", "score_run", "write_results", "run",
]


def confidence_interval(accuracies: np.ndarray) -> tuple[float, float]:
    """Mean and 95% half-width (1.96 * std / sqrt(n)) of per-episode accuracies, in percent."""
    accuracies = np.asarray(accuracies, dtype=np.float64) * 100
    half = 1.96 * accuracies.std() / math.sqrt(len(accuracies)) if len(accuracies) > 1 else float("nan")
    return float(accuracies.mean()), float(half)


def _support_query(features: torch.Tensor, tasks: TaskIndices, flipped: torch.Tensor | None):
    support = features[torch.from_numpy(tasks.support).to(features.device)]
    labels = tasks.support_labels().to(features.device)
    if flipped is not None:  # the paper's protocol: every support image also enters flipped
        support = torch.cat([support, flipped[torch.from_numpy(tasks.support).to(features.device)]], dim=1)
        labels = torch.cat([labels, labels], dim=1)
    query = features[torch.from_numpy(tasks.query).to(features.device)]
    return support, labels, query, tasks.query_labels().to(features.device)


@torch.no_grad()
def evaluate_features(
    features: torch.Tensor,
    tasks: TaskIndices,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    *,
    learner: BaseLearner,
    temperature: torch.Tensor | float = 1.0,
    flipped: torch.Tensor | None = None,
    chunk: int = 500,
) -> np.ndarray:
    """Per-episode query accuracy for tasks indexing a precomputed (num_images, D) feature matrix."""
    accuracies = []
    for start in range(0, tasks.n_tasks, chunk):
        part = TaskIndices(
            tasks.support[start : start + chunk], tasks.query[start : start + chunk], tasks.class_ids[start : start + chunk],
            tasks.n_way, tasks.n_shot, tasks.n_query,
        )
        support, support_labels, query, query_labels = _support_query(features, part, flipped)
        weight, bias = learner.adapt(support, support_labels, head_weight.to(features.device), head_bias.to(features.device), tasks.n_way,
                                     temperature=temperature)
        predictions = learner.logits_of(query, weight, bias, temperature).argmax(dim=-1)
        accuracies.append((predictions == query_labels).float().mean(dim=1).cpu())
    return torch.cat(accuracies).numpy()


def _on_used_images(all_tasks: Sequence[TaskIndices]) -> tuple[np.ndarray, list[TaskIndices]]:
    """The sorted split indices the tasks draw, and the tasks re-indexed into that list."""
    used = np.unique(np.concatenate([np.concatenate([t.support, t.query], axis=1).ravel() for t in all_tasks]))
    return used, [TaskIndices(np.searchsorted(used, t.support), np.searchsorted(used, t.query), t.class_ids, t.n_way, t.n_shot, t.n_query)
                  for t in all_tasks]


def _evaluate_per_episode(backbone, split: ImageSplit, tasks: TaskIndices, head_weight, head_bias, config: Config, device, paper: bool,
                          temperature, shift_views: int, learner: BaseLearner) -> np.ndarray:
    """Transductive BN: each episode's support and query sets are normalised by their own statistics."""
    accuracies = []
    options = dict(mean=split.mean, std=split.std, device=device, amp=config.amp, channels_last=config.channels_last,
                   flip_average=config.model.flip_average, shift_views=shift_views)
    was_training = backbone.training
    backbone.eval()  # no dropout; batch_statistics puts only BN on batch statistics
    with torch.no_grad(), batch_statistics(backbone):
        for t in progress_bar(range(tasks.n_tasks), desc="meta-test episodes", leave=False):
            one = TaskIndices(tasks.support[t : t + 1], tasks.query[t : t + 1], tasks.class_ids[t : t + 1], tasks.n_way, tasks.n_shot, tasks.n_query)
            episode = gather_episode(split.images, one)
            support_images = episode.support_images
            support_labels = episode.support_labels.to(device)
            if paper:
                support_images = torch.cat([support_images, support_images.flip(-2)], dim=1)
                support_labels = torch.cat([support_labels, support_labels], dim=1)
            support = forward_images(backbone, support_images, **options).unsqueeze(0)
            query = forward_images(backbone, episode.query_images, **options).unsqueeze(0)
            weight, bias = learner.adapt(support, support_labels, head_weight.to(device), head_bias.to(device), tasks.n_way, temperature=temperature)
            predictions = learner.logits_of(query, weight, bias, temperature).argmax(-1)
            accuracies.append((predictions == episode.query_labels.to(device)).float().mean().item())
    backbone.train(was_training)
    return np.asarray(accuracies)


def _start_model(run_dir: Path, config: Config, in_chans: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """What meta-training starts from: the pre-trained backbone (identity SS) and theta at its
    untrained init, drawn as meta-train draws it."""
    backbone = load_pretrained_backbone(config, run_dir, in_chans)
    return backbone, *untrained_theta(config, backbone.out_features)


def load_start_model(run_dir: Path, config: Config, in_chans: int, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The run's pre-trained start, ready to score on the same episodes as its meta-trained model."""
    backbone, weight, bias = _start_model(run_dir, config, in_chans)
    return _for_inference(backbone, config, device), weight, bias


def _for_inference(backbone: nn.Module, config: Config, device: torch.device) -> nn.Module:
    backbone.to(device)
    if config.channels_last:
        backbone.to(memory_format=torch.channels_last)
    return backbone.eval()


def load_meta_model(run_dir: Path, config: Config, in_chans: int, device: torch.device,
                    checkpoint: str | None = None) -> tuple[nn.Module, torch.Tensor, torch.Tensor, float, str, BaseLearner]:
    """The meta-trained backbone (SS folded), theta and the cosine temperature from meta_train/`checkpoint`
    (default `meta_test.checkpoint`); without meta-training, the pre-trained backbone with theta at its
    untrained init (the paper's 'no meta-training' row). Returns a source label too, and last the
    base-learner with what it meta-learned itself (E3BM's hyperprior learners)."""
    checkpoint = checkpoint or config.meta_test.checkpoint
    meta_stem, pre_stem = run_dir / "meta_train" / checkpoint, pretrained_stem(config, run_dir)
    if checkpoint_exists(meta_stem):
        backbone = build_backbone(config, in_chans)
        expect = {"backbone": config.model.backbone, "width": config.model.width, "in_chans": in_chans, "adapt": config.model.adapt}
        tensors, meta = load_checkpoint(meta_stem, expect=expect)
        if meta["adapt"] == "ss":
            apply_scale_shift(backbone, mode=meta["ss_mode"], include_shortcuts=meta["ss_shortcuts"])
        backbone.load_state_dict(tensors_under(tensors, "backbone"))
        fold_scale_shift(backbone)
        weight, bias = tensors["head.weight"], tensors["head.bias"]
        temperature = float(tensors["head.temperature"]) if "head.temperature" in tensors else config.base_learner.temperature
        learner = BaseLearner.from_config(config.base_learner, tensors)
        source = f"meta_train/{checkpoint}"
    elif checkpoint_exists(pre_stem):
        backbone, weight, bias = _start_model(run_dir, config, in_chans)
        temperature = config.base_learner.temperature
        learner = untrained_learner(config, backbone.out_features)
        source = f"pretrain/{pre_stem.name} (no meta-training)"
    else:
        raise FileNotFoundError(f"{run_dir} has no meta_train/{checkpoint} nor pretrain/{pre_stem.name} checkpoint; "
                                "run `mtl pretrain` (and `mtl meta-train`) first.")
    return _for_inference(backbone, config, device), weight.float(), bias.float(), temperature, source, learner


def evaluate_split(
    backbone: nn.Module,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    split: ImageSplit,
    config: Config,
    device: torch.device,
    *,
    ways: Sequence[int],
    shots: Sequence[int],
    episodes: int,
    n_query: int,
    protocol: str,
    seed: int,
    temperature: torch.Tensor | float | None = None,
    with_shifts: bool = True,
    learner: BaseLearner | None = None,
) -> list[dict[str, Any]]:
    """Score a backbone + theta on seeded episodes of one split, for every (way, shot); the base
    learner is `learner` (default: `config.base_learner`'s as meta-training starts it), with
    `temperature` (default: its configured value). `with_shifts=False` leaves out
    `model.shift_views` (validation during training, to keep each check cheap; the test-time flip stays)."""
    temperature = config.base_learner.temperature if temperature is None else temperature
    learner = learner if learner is not None else untrained_learner(config, backbone.out_features)
    paper = protocol == "paper"
    shift_views = config.model.shift_views if with_shifts else 0
    options = dict(mean=split.mean, std=split.std, device=device, amp=config.amp, channels_last=config.channels_last,
                   flip_average=config.model.flip_average, shift_views=shift_views)
    frozen = config.model.bn_mode == "frozen"
    settings = []
    for n_way in ways:
        for n_shot in shots:
            query = n_shot if paper else n_query
            sampler = TaskSampler(split.labels, n_way=n_way, n_shot=n_shot, n_query=query, seed=[seed, n_way, n_shot], class_names=split.class_names)
            settings.append((n_way, n_shot, query, sampler.sample(episodes)))
    if frozen:  # one pass over the images the episodes use, with SS and BN folded into the convs
        used, reindexed = _on_used_images([tasks for *_, tasks in settings])
        settings = [(*setting[:3], tasks) for setting, tasks in zip(settings, reindexed)]
        plain = inference_copy(backbone)
        features = extract_features(plain, split.images, indices=used, **options)
        flipped = None
        if paper:  # flip-averaged features are their mirror's already
            flipped = features if config.model.flip_average else extract_features(plain, split.images, indices=used, flip=True, **options)
    results = []
    for n_way, n_shot, query, tasks in settings:
        if frozen:
            accuracies = evaluate_features(features, tasks, head_weight, head_bias, learner=learner, temperature=temperature, flipped=flipped)
        else:
            accuracies = _evaluate_per_episode(backbone, split, tasks, head_weight, head_bias, config, device, paper, temperature, shift_views,
                                               learner)
        accuracy, ci95 = confidence_interval(accuracies)
        results.append({
            "dataset": split.dataset, "split": split.split, "way": n_way, "shot": n_shot, "query": query,
            "episodes": episodes, "accuracy": round(accuracy, 3), "ci95": round(ci95, 3), "protocol": protocol,
            "bn_mode": config.model.bn_mode, "flip_average": config.model.flip_average, "shift_views": shift_views, "seed": seed,
            "per_episode": accuracies.round(4).tolist(),
        })
    return results


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


def score_run(run_dir: Path, config: Config, split: ImageSplit, device: torch.device) -> tuple[list[dict[str, Any]], str]:
    """The run's model on `split`'s seeded test episodes; a meta-trained model also gets its
    pre-trained start scored on the very same episodes, and the paired gain over it. Shots validated
    on their own are scored with their own checkpoint (episodes depend on way and shot only)."""
    in_chans = split.images.shape[-1]
    test = config.meta_test
    options = dict(ways=test.n_way, episodes=test.episodes, n_query=test.n_query, protocol=test.protocol, seed=test.seed)
    per_shot = _checkpoint_per_shot(run_dir, config)
    results, sources = [], []
    for checkpoint in dict.fromkeys(per_shot.values()):
        backbone, weight, bias, temperature, source, learner = load_meta_model(run_dir, config, in_chans, device, checkpoint)
        shots = [shot for shot, name in per_shot.items() if name == checkpoint]
        scored = evaluate_split(backbone, weight, bias, split, config, device, temperature=temperature, shots=shots, learner=learner, **options)
        if source.startswith("meta_train"):
            start_backbone, start_weight, start_bias = load_start_model(run_dir, config, in_chans, device)
            for result, start in zip(scored, evaluate_split(start_backbone, start_weight, start_bias, split, config, device, shots=shots, **options)):
                add_paired_gain(result, {**start, "checkpoint": config.meta_train.init_checkpoint})
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
