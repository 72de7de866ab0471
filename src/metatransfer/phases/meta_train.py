"""Phase 2, meta-transfer: learn scaling-shifting of the frozen backbone and the base-learner's init.

Each meta-iteration draws T tasks (normal, or hard ones from the HT scheduler), forwards all their
support and query images through the backbone at once, fine-tunes T copies of the linear
base-learner from theta on the support features (batched closed-form inner loop), and updates SS
and theta with the query loss of the adapted learners (Sun et al. 2019, Algorithm 1 and 2).
`model.adapt=ft` meta-trains all conv weights instead of SS, the paper's FT ablation. With
`base_learner.ensemble=e3bm` the base-learner's own hyperprior learners (E3BM) are meta-learned with
SS, at `meta_train.lr_hyperprior`.
Under torchrun every rank draws the same meta-batch, computes the loss of its equal share of the T
tasks, and the gradients are averaged; the HT scheduler sees all tasks' accuracies on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.config import Config
from metatransfer.data.augment import augment_batch
from metatransfer.data.episodes import Episode, TaskSampler, gather_episode
from metatransfer.distributed import all_gather, all_reduce_gradients, all_reduce_sum, barrier, is_main, rank, rank_slice, world_size
from metatransfer.evaluation import EpisodePlan, evaluate_split, validation_model
from metatransfer.features import FeatureSettings, batch_statistics, forward_images
from metatransfer.loading import backbone_meta, load_pretrained_backbone, pretrained_stem, shot_best_stem
from metatransfer.model import Preprocessing
from metatransfer.models.fuse import folded_view
from metatransfer.models.head import BaseLearner, per_class_accuracy
from metatransfer.models.scale_shift import apply_scale_shift, scale_shift_parameters
from metatransfer.phases import pretrain
from metatransfer.phases._start import start_phase
from metatransfer.phases.hard_tasks import HardTaskScheduler
from metatransfer.progress import progress_bar
from metatransfer.run import (
    MetricsLog, checkpoint_exists, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
    restore_rng_state, rng_state_tensors, save_checkpoint, tensors_under, write_json,
)
from metatransfer.splits import class_subset, held_out_classes

__all__ = ["prepare_meta_model", "meta_batch_loss", "run"]


def prepare_meta_model(config: Config, run_dir: Path, in_chans: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """The pre-trained backbone with its convs frozen and SS attached (or, for FT, convs trainable);
    with `model.ss_bn_affine`, BatchNorm's weight and bias are meta-learned with SS."""
    stem = pretrained_stem(config, run_dir)
    if not checkpoint_exists(stem):
        raise FileNotFoundError(f"{stem}.json is missing: meta-transfer starts from a pre-trained backbone; run `mtl pretrain --out {run_dir}` first"
                                + (" (with this epoch in pretrain.save_epochs)." if stem.name.startswith("epoch-") else "."))
    backbone = load_pretrained_backbone(config, run_dir, in_chans)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    if config.model.adapt == "ss":
        apply_scale_shift(backbone, mode=config.model.ss_mode)
        trainable = scale_shift_parameters(backbone)
        if config.model.ss_bn_affine:
            norms = [p for m in backbone.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
            trainable += [p.requires_grad_(True) for p in norms]
    else:
        trainable = [p for m in backbone.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
        for parameter in trainable:
            parameter.requires_grad_(True)
    return backbone, trainable


def _task_features(backbone: nn.Module, episode: Episode, config: Config, device: torch.device, preprocessing: Preprocessing,
                   augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N*K, D) support and (T, N*Q, D) query features of a meta-batch."""
    settings = FeatureSettings(mean=preprocessing.mean, std=preprocessing.std, device=device, amp=config.amp,
                               channels_last=config.channels_last)  # training steps see single images: no test-time views
    T, n_support = episode.support_labels.shape
    if config.model.bn_mode == "frozen":  # BN at running statistics: folded into its conv at each call, the same function
        backbone = folded_view(backbone)
    if config.model.bn_mode == "frozen" and config.meta_train.first_order:
        # First order gives the support features no gradient: forwarding them without a graph means
        # the backward (2x a forward) runs over the N*Q query images only, not all N*(K+Q).
        with torch.no_grad():
            support = forward_images(backbone, episode.support_images.flatten(0, 1), settings, augment)
        query = forward_images(backbone, episode.query_images.flatten(0, 1), settings, augment)
        return support.view(T, n_support, -1), query.view(T, -1, query.shape[-1])
    if config.model.bn_mode == "frozen":  # one forward for the whole meta-batch
        images = torch.cat([episode.support_images.flatten(0, 1), episode.query_images.flatten(0, 1)])
        features = forward_images(backbone, images, settings, augment)
        return features[: T * n_support].view(T, n_support, -1), features[T * n_support :].view(T, -1, features.shape[-1])
    with batch_statistics(backbone):  # transductive: each set of each task normalised on its own
        support = torch.stack([forward_images(backbone, episode.support_images[t], settings, augment) for t in range(T)])
        query = torch.stack([forward_images(backbone, episode.query_images[t], settings, augment) for t in range(T)])
    return support, query


def meta_batch_loss(
    backbone: nn.Module,
    learner: BaseLearner,
    episode: Episode,
    config: Config,
    preprocessing: Preprocessing,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query loss of the adapted base-learners, plus (T, N) per-class query accuracy and loss.

    Args:
        backbone: the backbone being meta-trained, on the device of `learner`'s theta.
        learner: the base-learner with theta, temperature and (E3BM) hyperprior learners, as meta-trained.
        episode: the meta-batch's T tasks (images).
        config: the run's settings (BN mode, first order, amp, channels_last).
        preprocessing: the mean/std that normalise the images.
        augment: maps each normalised image batch before the backbone (meta_train.augment).
    """
    n_way, device = learner.theta_weight.shape[0], learner.theta_weight.device
    support, query = _task_features(backbone, episode, config, device, preprocessing, augment)
    if config.meta_train.first_order:
        support = support.detach()
    weight, bias = learner.adapt(support, episode.support_labels.to(device), n_way, second_order=not config.meta_train.first_order)
    logits = learner.logits_of(query, weight, bias)
    labels = episode.query_labels.to(device)
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    with torch.no_grad():
        accuracy = per_class_accuracy(logits, labels, n_way)
        class_loss = torch.zeros_like(accuracy).scatter_add_(1, labels, losses.detach()) / episode.query_labels.shape[1] * n_way
    return losses.mean(), accuracy, class_loss


def _augmentation(config: Config, iteration: int, device: torch.device):
    """The pre-training augmentation for this meta-iteration's images (None when off), seeded by
    (seed, iteration) so a resumed run draws the same crops and flips."""
    if not config.meta_train.augment:
        return None
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + iteration * 1_009 + rank())  # ranks augment their own tasks
    data = config.data
    return lambda x: augment_batch(x, kind=data.augment, padding=data.crop_padding, flip=data.hflip, jitter=data.color_jitter, generator=generator)


def _learning_rates(config: Config, iteration: int) -> dict[str, float]:
    """Each optimizer group's rate at `iteration` (meta_train.lr_ss, lr_head, lr_hyperprior), all
    decayed by lr_gamma every lr_decay_every iterations."""
    meta = config.meta_train
    decay = meta.lr_gamma ** (iteration // meta.lr_decay_every)
    return {"adapt": meta.lr_ss * decay, "head": meta.lr_head * decay, "hyperprior": meta.lr_hyperprior * decay}


def run(config: Config, run_dir: Path, *, log=print) -> dict[str, Any]:
    """Meta-train from `pretrain/best`; writes `meta_train/best` (by validation), `meta_train/last`,
    and with `meta_train.val_shots` a `meta_train/best-<K>shot` per further shot."""
    meta = config.meta_train
    log = log if is_main() else (lambda message: None)
    if config.transfer.source and not checkpoint_exists(run_dir / "pretrain" / "best"):
        if checkpoint_exists(run_dir / "pretrain" / "last"):
            raise ValueError(f"{run_dir} holds an unfinished pre-training (pretrain/last, no pretrain/best): finish it with "
                             f"`mtl pretrain --resume {run_dir}` before meta-training.")
        log(f"no pretrain/best in {run_dir}: meta-train starts from the --init-from backbone as it is (0 pre-training epochs)")
        pretrain.run(dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, epochs=0, generations=1)), run_dir, log=log)
    device, train, val = start_phase(config)
    if meta.classes == "held_out":  # the base classes pre-training never saw
        train = class_subset(train, held_out_classes(config, train.num_classes))
    in_chans = train.images.shape[-1]
    backbone, trainable = prepare_meta_model(config, run_dir, in_chans)
    backbone.to(device).eval()  # eval: BN at running statistics and no dropout, whatever bn_mode
    if config.channels_last:
        backbone.to(memory_format=torch.channels_last)
    # theta, the temperature and (E3BM) the hyperprior learners, at their init; what of them is learned: base_learner.learn_*
    learner = BaseLearner.untrained(config.base_learner, backbone.out_features, n_way=meta.n_way, seed=config.seed).trainable(device)
    learned_head, hyperprior = learner.head_parameters(), learner.hyperprior_parameters()
    preprocessing = Preprocessing.from_split(train.images, train.mean, train.std)
    groups = [{"params": trainable, "lr": meta.lr_ss, "name": "adapt"}]
    groups += [{"params": learned_head, "lr": meta.lr_head, "name": "head"}] if learned_head else []
    groups += [{"params": hyperprior, "lr": meta.lr_hyperprior, "name": "hyperprior"}] if hyperprior else []
    optimizer = torch.optim.Adam(groups)
    sampler = TaskSampler(train.labels, n_way=meta.n_way, n_shot=meta.n_shot, n_query=meta.n_query, seed=config.seed, class_names=train.class_names)
    hard = HardTaskScheduler(meta.hard_tasks, meta.n_way)
    model_meta = {**backbone_meta(config, backbone, in_chans), "adapt": config.model.adapt, "ss_mode": config.model.ss_mode,
                  "n_way": meta.n_way, "dataset": config.data.name}
    shard = rank_slice(meta.n_tasks, "meta_train.n_tasks")  # this rank's tasks of each meta-batch
    metrics = MetricsLog(run_dir, enabled=is_main(), name="meta_train")
    start, best_accuracy = 0, -1.0
    extra_shots = [shot for shot in dict.fromkeys(meta.val_shots) if shot != meta.n_shot]
    best_by_shot = {shot: -1.0 for shot in extra_shots}  # meta_train.val_shots: best-<K>shot's validation accuracy
    window: dict[str, list[float]] = {"normal": [], "hard": []}  # task accuracies since the last metrics line
    losses: list[float] = []
    last_stem, best_stem = run_dir / "meta_train" / "last", run_dir / "meta_train" / "best"

    def model_tensors() -> dict[str, torch.Tensor]:
        tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        return {**tensors, **learner.tensors()}

    def save_last(iteration: int) -> None:
        if not is_main():
            return
        optim_tensors, optim_meta = optimizer_to_tensors(optimizer, "optimizer")
        save_checkpoint(last_stem, {**model_tensors(), **optim_tensors, **rng_state_tensors(device)}, {
            **model_meta, "iteration": iteration, "best_accuracy": best_accuracy, "best_by_shot": {str(k): v for k, v in best_by_shot.items()},
            "optimizer": optim_meta,
            "sampler": sampler.state_dict(), "hard_tasks": hard.state_dict(), "window": window, "losses": losses,
            "complete": iteration >= meta.iterations,
        })

    def write_hard_classes() -> None:
        if is_main():
            names = train.class_names
            write_json(run_dir / "meta_train" / "hard_classes.json", {names[c]: n for c, n in hard.failure_counts.most_common()})

    if checkpoint_exists(last_stem):  # resume
        tensors, saved = load_checkpoint(last_stem, expect=model_meta)
        backbone.load_state_dict(tensors_under(tensors, "backbone"))
        learner.load_tensors_(tensors)
        optimizer_from_tensors(optimizer, tensors, saved["optimizer"], "optimizer")
        restore_rng_state(tensors, device)
        sampler.load_state_dict(saved["sampler"])
        hard.load_state_dict(saved["hard_tasks"])
        start, best_accuracy = saved["iteration"], saved["best_accuracy"]
        best_by_shot.update({int(k): v for k, v in saved.get("best_by_shot", {}).items() if int(k) in best_by_shot})
        if checkpoint_exists(best_stem):  # a kill between a new best and the next save of last leaves best ahead of it
            best_accuracy = max(best_accuracy, json.loads(best_stem.with_suffix(".json").read_text())["val_accuracy"])
        for shot in best_by_shot:
            if checkpoint_exists(stem := shot_best_stem(run_dir, shot)):
                best_by_shot[shot] = max(best_by_shot[shot], json.loads(stem.with_suffix(".json").read_text())["val_accuracy"])
        window, losses = saved.get("window", window), saved.get("losses", losses)
        if start >= meta.iterations:
            if not (run_dir / "meta_train" / "hard_classes.json").is_file():  # killed just after the last save
                write_hard_classes()
            log(f"meta-train already complete in {run_dir} (best val {best_accuracy:.2f}%).")
            barrier()
            return {"best_val_accuracy": best_accuracy}
        log(f"resuming meta-train at iteration {start}")
    metrics.rewind(["meta_train", "meta_train_val"], start if checkpoint_exists(last_stem) else -1)

    trend: dict[str, float] = {}  # the last metrics line's loss and task accuracy, for the validation lines

    def keep_if_best(stem: Path, result: dict[str, Any], best: float, iteration: int) -> float:
        if result["accuracy"] <= best:
            return best
        if is_main():
            save_checkpoint(stem, model_tensors(), {**model_meta, "iteration": iteration, "val_shot": result["shot"],
                                                    "val_accuracy": result["accuracy"], "val_ci95": result["ci95"]})
        return result["accuracy"]

    def validate(iteration: int) -> float:
        nonlocal best_accuracy
        plan = EpisodePlan(ways=[meta.n_way], shots=[meta.n_shot, *extra_shots], episodes=meta.val_episodes,
                           n_query=config.meta_test.n_query, seed=meta.val_seed)
        result, *others = evaluate_split(validation_model(config, backbone, learner.detached(), val, device), val, plan)
        extra = {f"{key}_{other['shot']}shot": other[key] for other in others for key in ("accuracy", "ci95")}
        metrics.log("meta_train_val", iteration, accuracy=result["accuracy"], ci95=result["ci95"], **extra)
        best_accuracy = keep_if_best(best_stem, result, best_accuracy, iteration)
        for other in others:
            best_by_shot[other["shot"]] = keep_if_best(shot_best_stem(run_dir, other["shot"]), other, best_by_shot[other["shot"]], iteration)
        trained = f"loss {trend['loss']:.3f}, task acc {trend['accuracy']:.1f}%, " if trend else ""
        also = "".join(f"; {o['shot']}-shot {o['accuracy']:.2f} (best {best_by_shot[o['shot']]:.2f}%)" for o in others)
        log(f"meta-train {iteration}/{meta.iterations}: {trained}val {result['accuracy']:.2f} +- {result['ci95']:.2f}% (best {best_accuracy:.2f}%){also}")
        return result["accuracy"]

    if start == 0:
        validate(0)
    started = time.time()
    progress = progress_bar(range(start, meta.iterations), desc="meta-train", initial=start, total=meta.iterations, dynamic_ncols=True, disable=not is_main())
    for iteration in progress:
        rates = _learning_rates(config, iteration)
        lr_ss, lr_head = rates["adapt"], rates["head"]
        for group in optimizer.param_groups:  # SS (or FT); if learned, theta / temperature; with E3BM, the hyperprior learners
            group["lr"] = rates[group["name"]]
        kind = hard.next_kind(iteration)
        tasks = hard.sample(kind, sampler, meta.n_tasks)
        episode = gather_episode(train.images, tasks.sliced(shard))
        loss, accuracy, class_loss = meta_batch_loss(backbone, learner, episode, config, preprocessing, _augmentation(config, iteration, device))
        loss_value = all_reduce_sum(loss.detach()).item() / world_size()  # every rank checks the same value
        if not np.isfinite(loss_value):
            raise FloatingPointError(
                f"meta-train loss became {loss_value} at iteration {iteration}; {last_stem} holds the last good state. "
                "Lower meta_train.lr_ss / lr_head or base_learner.lr."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients([*trainable, *learned_head, *hyperprior])
        optimizer.step()
        accuracy, class_loss = all_gather(accuracy), all_gather(class_loss)  # (T, N): every task, in order
        hard.observe(kind, tasks, accuracy, class_loss)
        window[kind].append(accuracy.mean().item())
        losses.append(loss_value)
        done = iteration + 1
        if done % 50 == 0 or done == meta.iterations:
            record = {"loss": float(np.mean(losses)), "lr_ss": lr_ss, "lr_head": lr_head}
            for name, values in window.items():
                if values:
                    record[f"{name}_task_accuracy"] = 100 * float(np.mean(values))
                    record[f"{name}_tasks"] = len(values) * meta.n_tasks
            metrics.log("meta_train", done, **record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record.get('normal_task_accuracy', 0):.1f}")
            trend.update(loss=record["loss"], accuracy=record.get("normal_task_accuracy", 0.0))
            window, losses = {"normal": [], "hard": []}, []
        if done % meta.val_every == 0 or done == meta.iterations:
            validate(done)
        if done % config.checkpoint_every == 0 or done == meta.iterations:
            save_last(done)
    write_hard_classes()
    summary = {"best_val_accuracy": best_accuracy, "seconds": round(time.time() - started, 1), "iterations": meta.iterations}
    also = "".join(f", {shot}-shot {value:.2f}%" for shot, value in best_by_shot.items())
    log(f"meta-train done: best val {best_accuracy:.2f}% ({meta.n_way}-way {meta.n_shot}-shot{also}), {summary['seconds']:.0f} s")
    metrics.close()
    barrier()  # the other ranks wait until rank 0 has written meta_train/best
    return summary

