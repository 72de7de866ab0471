"""Phase 1, pre-train: a backbone learns all base classes with plain cross-entropy (optionally also
matching a finished run's softened predictions: RFS's self-distillation, `pretrain.distill_from`, or
`pretrain.generations` to pre-train the teachers within the run; and optionally predicting how far
each image was turned: rotation self-supervision, `pretrain.rotation_weight`).

The classifier head is dropped afterwards; the checkpoint kept (`pretrain/best`) is the epoch whose
features give the best few-shot accuracy on validation episodes (a fresh FC fine-tuned on frozen
features), as the PyTorch port selects it. Batches and augmentation draw from generators seeded
by (seed, epoch), and a mid-epoch checkpoint stores their state (and the epoch's running loss and
accuracy), so a resumed run replays exactly. Under torchrun every rank draws and augments the same
global batch, trains on its equal slice and averages gradients; BatchNorm statistics are per rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.config import Config
from metatransfer.data.augment import augment_batch, to_float
from metatransfer.distributed import all_reduce_gradients, all_reduce_sum, barrier, is_main, rank_slice
from metatransfer.evaluation import EpisodePlan, evaluate_split, validation_model
from metatransfer.loading import backbone_meta, build_backbone
from metatransfer.models.head import BaseLearner
from metatransfer.phases._start import start_phase
from metatransfer.progress import progress_bar
from metatransfer.run import (
    MetricsLog, autocast, checkpoint_exists, load_checkpoint, optimizer_from_tensors, optimizer_to_tensors,
    prepare_run_dir, read_run_config, restore_rng_state, rng_state_tensors, save_checkpoint, tensors_under, write_json,
)
from metatransfer.splits import class_subset, held_out_classes
from metatransfer.transfer import load_init_backbone

__all__ = ["learning_rate", "resolve_teacher", "load_teacher", "distillation_loss", "rotate_batch", "teach_generations", "run"]


def learning_rate(config: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Cosine over all steps, or a step decay every `lr_step` epochs."""
    pre = config.pretrain
    if pre.schedule == "step":
        return pre.lr * pre.lr_gamma ** (epoch // pre.lr_step)
    progress = (epoch * steps_per_epoch + step) / max(1, pre.epochs * steps_per_epoch)
    return 0.5 * pre.lr * (1 + math.cos(math.pi * progress))


def _last_meta(run_dir: Path) -> dict[str, Any]:
    """The plain values of a run's pretrain/last ({} before its first checkpoint); "complete" says it finished."""
    stem = run_dir / "pretrain" / "last"
    return json.loads(stem.with_suffix(".json").read_text()) if checkpoint_exists(stem) else {}


def _checked_teacher(config: Config, teacher_dir: Path) -> tuple[Config, dict[str, Any]]:
    """The teacher run's config and the checked plain values of its pretrain/last.

    Raises:
        FileNotFoundError: not a run directory, or its pre-training has not finished.
        ValueError: a teacher that never trained, saw other data or inputs, or changed since this run started.
    """
    teacher_config = read_run_config(teacher_dir)
    meta = _last_meta(teacher_dir)
    where = f"pretrain.distill_from={teacher_dir}"
    if not meta.get("complete"):
        raise FileNotFoundError(f"{where}: its pre-training has not finished (no complete pretrain/last); "
                                f"finish it with `mtl pretrain --resume {teacher_dir}`, or choose another teacher.")
    if not meta.get("epoch"):
        raise ValueError(f"{where} pre-trained for 0 epochs (a --init-from run): its classifier never learned; choose a run that pre-trained.")
    if meta.get("dataset") != config.data.name:
        raise ValueError(f"{where} pre-trained on {meta.get('dataset')!r}, this run on {config.data.name!r}; the teacher must know the same base classes.")
    if (teacher_config.data.mean, teacher_config.data.std) != (config.data.mean, config.data.std):
        raise ValueError(f"{where} normalised its inputs otherwise (data.mean/std {teacher_config.data.mean}/{teacher_config.data.std}); "
                         "give this run the same data.mean and data.std, or another teacher.")
    if config.pretrain.distill_sha256 and meta["sha256"] != config.pretrain.distill_sha256:
        raise ValueError(f"{where}: its pretrain/last changed since this run started (checksum {meta['sha256'][:12]}..., "
                         f"the run started with {config.pretrain.distill_sha256[:12]}...); restore it, or start a new run.")
    return teacher_config, meta


def resolve_teacher(config: Config) -> Config:
    """Check `pretrain.distill_from` before a run directory is written, and pin it: an absolute path and
    the checksum of its pretrain/last (checked again whenever the run loads the teacher)."""
    if not config.pretrain.distill_from:
        return config
    teacher_dir = Path(config.pretrain.distill_from).expanduser().resolve()
    _, meta = _checked_teacher(config, teacher_dir)
    return dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, distill_from=str(teacher_dir), distill_sha256=meta["sha256"]))


def load_teacher(config: Config, in_chans: int, num_classes: int, device: torch.device) -> nn.Module:
    """The network of `pretrain.distill_from` (its pretrain/last: backbone, then classifier), in eval mode,
    built without touching the global random stream (so dropout draws as without a teacher).

    Raises:
        ValueError: see `_checked_teacher`; or its classifier covers another number of classes than this run's.
    """
    teacher_dir = Path(config.pretrain.distill_from)
    teacher_config, meta = _checked_teacher(config, teacher_dir)
    if meta["num_classes"] != num_classes:
        raise ValueError(f"pretrain.distill_from={teacher_dir} learned {meta['num_classes']} classes, this run pre-trains on "
                         f"{num_classes} (pretrain.held_out_classes?); the teacher must know the same base classes.")
    tensors, _ = load_checkpoint(teacher_dir / "pretrain" / "last")
    with torch.random.fork_rng(devices=[]):
        backbone = build_backbone(teacher_config, in_chans)
        head = nn.Linear(backbone.out_features, num_classes)
    backbone.load_state_dict(tensors_under(tensors, "backbone"))
    head.load_state_dict(tensors_under(tensors, "head"))
    teacher = nn.Sequential(backbone, head).to(device).eval()
    if config.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher.requires_grad_(False)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student), both softened at temperature T (Hinton et al. 2015), per image."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2


def rotate_batch(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of a (B, C, H, W) batch turned by a random multiple of 90 degrees, and the multiples
    (0-3), the labels of the rotation task: Gidaris et al. (2019) found that predicting them while
    pre-training raises few-shot accuracy on the features, as a regulariser that needs no labels.

    Raises:
        ValueError: images that are not square (a turn by 90 degrees would change their shape).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"pretrain.rotation_weight needs square images; these are {x.shape[-2]}x{x.shape[-1]}. "
                         "Prepare the data with a square image_size, or set pretrain.rotation_weight=0.")
    turns = torch.randint(0, 4, (len(x),), generator=generator)  # on the CPU: masking with it needs no device sync
    rotated = x.clone()
    for k in range(1, 4):
        rotated[turns == k] = torch.rot90(x[turns == k], k, dims=(2, 3))
    return rotated, turns.to(x.device)


def teach_generations(config: Config, run_dir: Path, log=print) -> Config:
    """Pre-train generations 1 .. G-1 of `pretrain.generations=G`, each in `RUN/generations/g` and taught
    by the one before, exactly as `mtl pretrain --out GEN_g pretrain.distill_from=GEN_(g-1)` would (same
    seed, so same draws); returns the config of this run's own pre-training, the last generation:
    one generation, taught by generation G-1. A finished generation is kept, so a resumed run goes on
    where it stopped. The teachers live inside the run directory; each generation's config.yaml pins
    its own teacher's checksum, and the run's pretrain checkpoints record the last teacher's
    (`teacher_sha256`), since its config.yaml records only `generations`: a resumed run pins it again."""
    teacher = ""
    for generation in range(1, config.pretrain.generations):
        generation_dir = run_dir / "generations" / str(generation)
        generation_config = resolve_teacher(dataclasses.replace(
            config, pretrain=dataclasses.replace(config.pretrain, generations=1, distill_from=teacher, distill_sha256="")))
        if is_main():
            prepare_run_dir(generation_dir, generation_config)
        barrier()
        log(f"pre-train generation {generation} of {config.pretrain.generations}, in {generation_dir}")
        run(generation_config, generation_dir, log=log)
        teacher = str(generation_dir)
    return resolve_teacher(dataclasses.replace(config, pretrain=dataclasses.replace(config.pretrain, generations=1, distill_from=teacher)))


def run(config: Config, run_dir: Path, *, log=print) -> dict[str, Any]:
    """Pre-train on the train split; writes `pretrain/best` (by validation) and `pretrain/last`."""
    log = log if is_main() else (lambda message: None)
    if (generations := config.pretrain.generations) > 1 and not _last_meta(run_dir).get("complete"):  # finished: no teachers needed
        config = teach_generations(config, run_dir, log)
        log(f"pre-train generation {generations} of {generations}, in {run_dir}")
    pre = config.pretrain
    device, train, val = start_phase(config)
    if pre.held_out_classes:  # keep some base classes for meta-training only
        held_out = held_out_classes(config, train.num_classes)
        log(f"pre-train holds out {len(held_out)} base classes for meta-training: {', '.join(train.class_names[c] for c in held_out)}")
        train = class_subset(train, np.setdiff1d(np.arange(train.num_classes), held_out))
    in_chans = train.images.shape[-1]
    backbone = build_backbone(config, in_chans).to(device)
    head = nn.Linear(backbone.out_features, train.num_classes).to(device)
    if config.channels_last:
        backbone.to(memory_format=torch.channels_last)
    rotation_head = nn.Linear(backbone.out_features, 4).to(device) if pre.rotation_weight > 0 else None
    parameters = list(backbone.parameters()) + list(head.parameters()) + (list(rotation_head.parameters()) if rotation_head else [])
    optimizer = torch.optim.SGD(parameters, lr=pre.lr, momentum=pre.momentum, nesterov=pre.nesterov, weight_decay=pre.weight_decay)
    steps_per_epoch = len(train.labels) // pre.batch_size  # drop the ragged last batch: BN dislikes tiny ones
    if steps_per_epoch == 0 and pre.epochs > 0:
        raise ValueError(f"The train split has {len(train.labels)} images, fewer than one batch of {pre.batch_size}; lower pretrain.batch_size.")
    shard = rank_slice(pre.batch_size, "pretrain.batch_size")  # this rank's part of each global batch
    model_meta = {**backbone_meta(config, backbone, in_chans), "num_classes": train.num_classes, "dataset": config.data.name}
    # init_*: recorded, not checked (runs from before --init-from have no such keys and must still resume);
    # teacher_sha256: pinned again when a run resumes, and checked where the teacher loads
    saved_meta = {**model_meta, "init_from": config.transfer.source, "init_sha256": config.transfer.sha256, "teacher_sha256": pre.distill_sha256}
    metrics = MetricsLog(run_dir, enabled=is_main(), name="pretrain")
    last_stem, best_stem = run_dir / "pretrain" / "last", run_dir / "pretrain" / "best"
    start_epoch, start_step, best_accuracy = 0, 0, -1.0
    generator_state = None
    running = [0.0, 0, 0, 0]  # the epoch so far: summed loss, correct classes, images, correct turns (all ranks)

    def save_last(epoch: int, step: int, generator: torch.Generator) -> None:
        if not is_main():
            return
        optim_tensors, optim_meta = optimizer_to_tensors(optimizer, "optimizer")
        tensors = {
            **{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            **{f"head.{k}": v for k, v in head.state_dict().items()},
            **({f"rotation_head.{k}": v for k, v in rotation_head.state_dict().items()} if rotation_head else {}),
            **optim_tensors, **rng_state_tensors(device), "rng.augment": generator.get_state(),
        }
        save_checkpoint(last_stem, tensors, {**saved_meta, "epoch": epoch, "step": step, "best_accuracy": best_accuracy,
                                             "optimizer": optim_meta, "running": running if step else [0.0, 0, 0, 0],
                                             "complete": epoch >= pre.epochs})

    if checkpoint_exists(last_stem):  # resume where the last checkpoint left off
        tensors, saved = load_checkpoint(last_stem, expect=model_meta)
        backbone.load_state_dict(tensors_under(tensors, "backbone"))
        head.load_state_dict(tensors_under(tensors, "head"))
        if rotation_head is not None:
            rotation_head.load_state_dict(tensors_under(tensors, "rotation_head"))
        optimizer_from_tensors(optimizer, tensors, saved["optimizer"], "optimizer")
        restore_rng_state(tensors, device)
        generator_state = tensors["rng.augment"]
        start_epoch, start_step, best_accuracy = saved["epoch"], saved["step"], saved["best_accuracy"]
        running = [*saved.get("running", running), 0, 0, 0, 0][:4]  # checkpoints before rotation_weight kept three
        if start_epoch >= pre.epochs or saved.get("complete"):  # complete: also a 0-epoch start made by `mtl meta-train --init-from`
            log(f"pre-train already complete in {run_dir} (best val {best_accuracy:.2f}%).")
            barrier()
            return {"best_val_accuracy": best_accuracy}
        pinned = saved.get("teacher_sha256", "")  # the teacher the epochs so far were taught by ("" = none)
        if bool(pinned) != bool(pre.distill_from):  # a hand-edited config.yaml would switch the loss mid-run
            taught = "with the teacher its config named" if pinned else "without a teacher"
            raise ValueError(f"{last_stem}.json was pre-trained {taught}, but the config now names "
                             f"pretrain.distill_from={pre.distill_from!r}; restore {run_dir / 'config.yaml'} as the run wrote it, "
                             "or start a new run with --out.")
        if pinned:  # taught by the teacher it started with: load_teacher checks this pin (finished runs, above, need none)
            config = dataclasses.replace(config, pretrain=dataclasses.replace(pre, distill_sha256=pinned))
            pre = config.pretrain
        log(f"resuming pre-train at epoch {start_epoch}, step {start_step}")
    elif config.transfer.source:  # transfer: start from another run's or bundle's backbone
        provenance = load_init_backbone(config, backbone, in_chans, train.std)
        if is_main():
            write_json(run_dir / "init_from.json", provenance)
        log(f"pre-train starts from {provenance['path']} ({provenance['kind']}, trained on {provenance['dataset']}); "
            f"channels: {provenance['channel_conversion']}" + (f"; note: {provenance['unfinished']}" if "unfinished" in provenance else ""))
    metrics.rewind(["pretrain"], start_epoch if checkpoint_exists(last_stem) else -1)

    def validate(epoch: int) -> dict[str, float]:
        """Few-shot accuracy of the current features; a new best is saved as `pretrain/best`."""
        nonlocal best_accuracy
        # the base-learner as meta-test runs it from its untrained init
        learner = BaseLearner.untrained(config.base_learner, backbone.out_features, n_way=5, seed=config.seed).to(device)
        plan = EpisodePlan(ways=[5], shots=[1], episodes=pre.val_episodes, n_query=config.meta_test.n_query, seed=config.meta_test.seed)
        result = evaluate_split(validation_model(config, backbone, learner, val, device), val, plan)[0]
        if result["accuracy"] > best_accuracy:
            best_accuracy = result["accuracy"]
            if is_main():
                save_checkpoint(best_stem, {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                                {**saved_meta, "epoch": epoch, "val_accuracy": best_accuracy, "val_ci95": result["ci95"]})
        return {"val_accuracy": result["accuracy"], "val_ci95": result["ci95"]}

    if pre.epochs == 0:  # transfer as it is (check_config: only with --init-from): the given backbone, scored once, is pretrain/best
        record = validate(0)
        metrics.log("pretrain", 0, **record)
        save_last(0, 0, torch.Generator().manual_seed(config.seed))
        log(f"pre-train: 0 epochs, the --init-from backbone kept as pretrain/best (val {record['val_accuracy']:.2f} +- {record['val_ci95']:.2f}%)")
        metrics.close()
        barrier()
        return {"best_val_accuracy": best_accuracy, "seconds": 0.0}

    teacher = load_teacher(config, in_chans, train.num_classes, device) if pre.distill_from else None
    if teacher is not None:
        log(f"pre-train distils {pre.distill_from} (weight {pre.distill_weight}, temperature {pre.distill_temperature})")
    started = time.time()
    for epoch in range(start_epoch, pre.epochs):
        backbone.train()
        head.train()
        if rotation_head is not None:
            rotation_head.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(len(train.labels))
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        first_step = start_step if epoch == start_epoch else 0
        if first_step and generator_state is not None:
            generator.set_state(generator_state)
        if not first_step:
            running = [0.0, 0, 0, 0]
        progress = progress_bar(range(first_step, steps_per_epoch), desc=f"pre-train {epoch + 1}/{pre.epochs}", initial=first_step,
                        total=steps_per_epoch, leave=False, dynamic_ncols=True, disable=not is_main())
        for step in progress:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch, step, steps_per_epoch)
            index = np.sort(order[step * pre.batch_size : (step + 1) * pre.batch_size])  # sorted: fast memmap reads
            x = to_float(torch.from_numpy(train.images[index]), train.mean, train.std, device=device, channels_last=config.channels_last)
            x = augment_batch(x, kind=config.data.augment, padding=config.data.crop_padding, flip=config.data.hflip,
                              jitter=config.data.color_jitter, generator=generator)
            y = torch.from_numpy(train.labels[index]).to(device)
            if rotation_head is not None:
                rotated, turns = rotate_batch(x, generator)
                rotated, turns = rotated[shard], turns[shard]
            x, y = x[shard], y[shard]  # every rank augmented the whole batch: the same draws as one process
            inputs = x if rotation_head is None else torch.cat([x, rotated])  # one forward: BatchNorm normalises both together
            with autocast(device, config.amp):
                features = backbone(inputs)
                logits = head(features[: len(y)]).float()
                if rotation_head is not None:
                    rotation_logits = rotation_head(features[len(y) :]).float()
            loss = F.cross_entropy(logits, y, label_smoothing=pre.label_smoothing)
            if teacher is not None:
                with torch.no_grad(), autocast(device, config.amp):
                    teacher_logits = teacher(x).float()
                loss = (1 - pre.distill_weight) * loss + pre.distill_weight * distillation_loss(logits, teacher_logits, pre.distill_temperature)
            turns_correct = torch.zeros((), device=device)
            if rotation_head is not None:  # added after distillation's mix: its weight is rotation_weight whatever distill_weight is
                loss = loss + pre.rotation_weight * F.cross_entropy(rotation_logits, turns)
                turns_correct = (rotation_logits.argmax(1) == turns).sum().float()
            batch_loss, batch_correct, batch_seen, batch_turns_correct = all_reduce_sum(torch.stack([
                loss.detach() * len(y), (logits.argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=device), turns_correct,
            ])).tolist()
            if not math.isfinite(batch_loss):  # the summed loss: every rank stops together
                raise FloatingPointError(
                    f"pre-train loss became {batch_loss / batch_seen} at epoch {epoch}, step {step}; {last_stem} holds the last good state. "
                    "Lower pretrain.lr or turn off amp."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(parameters)
            optimizer.step()
            running = [running[0] + batch_loss, running[1] + int(batch_correct), running[2] + int(batch_seen), running[3] + int(batch_turns_correct)]
            progress.set_postfix(loss=f"{running[0] / running[2]:.3f}", acc=f"{100 * running[1] / running[2]:.1f}")
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save_last(epoch, step + 1, generator)
        record: dict[str, Any] = {"loss": running[0] / max(running[2], 1), "train_accuracy": 100 * running[1] / max(running[2], 1),
                                  "lr": optimizer.param_groups[0]["lr"], "epoch": epoch + 1}
        if rotation_head is not None:  # the loss above includes rotation_weight * the rotation task's
            record["rotation_accuracy"] = 100 * running[3] / max(running[2], 1)
        if (epoch + 1) % pre.val_every == 0 or epoch + 1 == pre.epochs:
            record.update(validate(epoch + 1))
        if epoch + 1 in pre.save_epochs and is_main():  # for meta_train.init_checkpoint=epoch-N
            save_checkpoint(run_dir / "pretrain" / f"epoch-{epoch + 1}", {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                            {**saved_meta, "epoch": epoch + 1})
        metrics.log("pretrain", epoch + 1, **record)
        val_text = f", val {record['val_accuracy']:.2f} +- {record['val_ci95']:.2f}%" if "val_accuracy" in record else ""
        turns_text = f", rotation acc {record['rotation_accuracy']:.1f}%" if "rotation_accuracy" in record else ""
        log(f"pre-train epoch {epoch + 1}/{pre.epochs}: loss {record['loss']:.3f}, train acc {record['train_accuracy']:.1f}%{turns_text}{val_text}")
        save_last(epoch + 1, 0, generator)
    metrics.close()
    barrier()  # the other ranks wait until rank 0 has written pretrain/best
    summary = {"best_val_accuracy": best_accuracy, "seconds": round(time.time() - started, 1)}
    log(f"pre-train done: best val {best_accuracy:.2f}% (5-way 1-shot), {summary['seconds']:.0f} s")
    return summary
