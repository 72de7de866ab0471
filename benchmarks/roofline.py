"""How close to the hardware each phase runs: achieved FLOP/s of its step against the matmul rate.

Why: `speed.py` and `precision.py` say how much faster ours is than the port's way, not how much
faster it could still get. A large dense matrix multiply is about the best rate this device's
BLAS/oneDNN (or cuBLAS) reaches at a given precision, so a phase's step that runs at, say, 30% of
it leaves room, while one at 80% is near what the hardware gives.

How: per backbone (resnet12, conv4) three steps, built as the phases build them, on random inputs
(what the pixels show does not change the cost; data loading and augmentation are left out):

pre-train   forward + cross-entropy + backward + SGD (momentum, nesterov, weight decay) on a batch
            of 128 images, training mode (BN batch statistics, dropout), channels_last, under
            `metatransfer.run.autocast` (`phases/pretrain.py`).
meta-train  scale-shift attached, conv weights frozen, BN at running statistics; T=2 tasks of
            5-way 1-shot 15-query through `meta_batch_loss` (one backbone forward, the base
            learner's second-order closed-form inner loop), backward into SS and theta, Adam
            (`phases/meta_train.py`).
features    `extract_features` of a batch of 256 images with SS and BN folded into the convs, as
            meta-test scores a split (`phases/meta_test.py`), no gradient.

Each step's FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` and the step is
then timed without the counter: warm-up calls, then `--repeats` timed calls (CUDA synchronised).

Reading the numbers:
- GFLOP/s = counted FLOPs / best time; the median is printed (and saved) beside it. The matmul
  rate is also the best of its repeats. On a shared machine compare percentages from one run.
- The counter counts convolutions and matrix products only (forward and both backward products),
  the FLOPs that could run at the matmul rate. BatchNorm, ReLU, pooling, softmax, the optimiser
  and Python/dispatch overhead count as zero: they are the time a step spends below the roofline.
- "% of matmul" divides by the rate of the precision the step ran in: bf16 when bf16 autocast ran
  (`--amp` on a device with native bf16), else fp32. Inside a bf16 step the small inner-loop
  products run in fp32, a negligible share of the FLOPs.
- 100% is not a hard ceiling (a conv kernel can beat a square GEMM's rate), but a step far below
  it is bound by memory traffic or overhead, not arithmetic.

    .venv/bin/python benchmarks/roofline.py --json /tmp/roofline.json

The last line of output is the headline: `resnet12 pre-train step: NN.N% of the fp32 matrix-multiply rate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from metatransfer.config import Config
from metatransfer.data.episodes import Episode
from metatransfer.models.backbones import create_backbone
from metatransfer.models.fuse import inference_copy
from metatransfer.model import Preprocessing
from metatransfer.models.head import BaseLearner, init_head_weight
from metatransfer.models.scale_shift import apply_scale_shift, scale_shift_parameters
from metatransfer.features import FeatureSettings, extract_features
from metatransfer.phases.meta_train import meta_batch_loss
from metatransfer.run import autocast, native_bf16, resolve_device

BACKBONES = ("resnet12", "conv4")
STEP_KINDS = ("pre-train", "meta-train", "features")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # any normalisation costs the same
PRETRAIN_CLASSES = 60  # FC100's base classes, the default dataset; the head is a negligible share

Step = Callable[[], torch.Tensor]


@dataclasses.dataclass
class Settings:
    """What is measured; `--quick` shrinks every size so the whole run takes seconds."""

    image_size: int = 32
    width: float = 1.0
    batch_size: int = 128  # pre-train batch (config default)
    feature_batch: int = 256  # extract_features' default batch
    n_tasks: int = 2
    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    inner_steps: int = 100  # base_learner.steps (config default)
    matmul_size: int = 2048
    warmup: int = 2
    repeats: int = 5


QUICK = dict(image_size=16, batch_size=16, feature_batch=32, n_query=2, inner_steps=2, matmul_size=512, warmup=1, repeats=2)


# --- timing and counting --------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Step, device: torch.device, warmup: int, repeats: int) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones, and the last call's result."""
    result = torch.zeros(())
    for _ in range(warmup):
        result = step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        result = step()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
    return seconds, result


def count_flops(step: Step) -> int:
    """FLOPs of one call (convolutions and matrix products, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def rate_record(flops: int, seconds: list[float]) -> dict[str, float]:
    best, median = min(seconds), statistics.median(seconds)
    return {"gflop": flops / 1e9, "best_ms": best * 1e3, "median_ms": median * 1e3,
            "gflops": flops / best / 1e9, "gflops_median": flops / median / 1e9}


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, settings: Settings) -> dict[str, float]:
    """Rate of a square `size` matrix multiply in `dtype`: 2 size^3 FLOPs per call."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    seconds, _ = time_step(lambda: a @ b, device, settings.warmup, settings.repeats)
    return {"size": size, **rate_record(2 * size**3, seconds)}


# --- the three steps, as the phases run them ------------------------------------------------------


def phase_config(settings: Settings, amp: bool) -> Config:
    """The config defaults, with the measured sizes and `amp` only where it really autocasts."""
    config = Config(amp=amp, channels_last=True)
    return dataclasses.replace(
        config,
        base_learner=dataclasses.replace(config.base_learner, steps=settings.inner_steps),
        meta_train=dataclasses.replace(config.meta_train, n_tasks=settings.n_tasks, n_way=settings.n_way,
                                       n_shot=settings.n_shot, n_query=settings.n_query, first_order=False),
    )


def new_backbone(name: str, config: Config, settings: Settings, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    backbone = create_backbone(name, in_chans=3, width=settings.width, drop_rate=config.model.drop_rate).to(device)
    return backbone.to(memory_format=torch.channels_last)


def pretrain_step(name: str, config: Config, settings: Settings, device: torch.device) -> Step:
    """One pre-train SGD step on a random batch (`phases/pretrain.py`, without data loading)."""
    pre = config.pretrain
    backbone = new_backbone(name, config, settings, device).train()
    head = nn.Linear(backbone.out_features, PRETRAIN_CLASSES).to(device)
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=pre.lr, momentum=pre.momentum,
                                nesterov=pre.nesterov, weight_decay=pre.weight_decay)
    size = settings.image_size
    x = torch.randn(settings.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(PRETRAIN_CLASSES, (settings.batch_size,), device=device)

    def step() -> torch.Tensor:
        with autocast(device, config.amp):
            logits = head(backbone(x)).float()
        loss = F.cross_entropy(logits, y, label_smoothing=pre.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def random_episode(settings: Settings) -> Episode:
    """T tasks of random uint8 images, labels class-major as `TaskIndices` lays them out."""
    generator = torch.Generator().manual_seed(0)
    t, n, size = settings.n_tasks, settings.n_way, settings.image_size

    def images(per_class: int) -> torch.Tensor:
        return torch.randint(0, 256, (t, n * per_class, size, size, 3), dtype=torch.uint8, generator=generator)

    def labels(per_class: int) -> torch.Tensor:
        return torch.arange(n).repeat_interleave(per_class).expand(t, -1).contiguous()

    return Episode(images(settings.n_shot), labels(settings.n_shot), images(settings.n_query), labels(settings.n_query),
                   torch.arange(n).expand(t, -1).contiguous())


def meta_train_step(name: str, config: Config, settings: Settings, device: torch.device) -> Step:
    """One meta-iteration: `meta_batch_loss` (second order), backward into SS and theta, Adam."""
    meta = config.meta_train
    backbone = new_backbone(name, config, settings, device)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    apply_scale_shift(backbone, mode=config.model.ss_mode)
    backbone.eval()
    trainable = scale_shift_parameters(backbone)
    learner = BaseLearner.from_config(config.base_learner).with_theta(
        init_head_weight(meta.n_way, backbone.out_features, config.base_learner.init), torch.zeros(meta.n_way)).trainable(device)
    optimizer = torch.optim.Adam([{"params": trainable, "lr": meta.lr_ss}, {"params": learner.head_parameters(), "lr": meta.lr_head}])
    preprocessing = Preprocessing(image_size=settings.image_size, channels=3, mean=MEAN, std=STD)
    episode = random_episode(settings)

    def step() -> torch.Tensor:
        loss, _, _ = meta_batch_loss(backbone, learner, episode, config, preprocessing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def features_step(name: str, config: Config, settings: Settings, device: torch.device) -> Step:
    """One batch of meta-test's feature extraction: SS and BN folded, no gradient."""
    backbone = new_backbone(name, config, settings, device)
    apply_scale_shift(backbone, mode=config.model.ss_mode)
    plain = inference_copy(backbone).to(memory_format=torch.channels_last)
    size = settings.image_size
    images = np.random.default_rng(0).integers(0, 256, (settings.feature_batch, size, size, 3), dtype=np.uint8)

    def step() -> torch.Tensor:
        features = extract_features(plain, images, FeatureSettings(mean=MEAN, std=STD, device=device, amp=config.amp,
                                                                    channels_last=config.channels_last), batch_size=settings.feature_batch)
        return features.sum()

    return step


STEP_BUILDERS: dict[str, Callable[[str, Config, Settings, torch.device], Step]] = {
    "pre-train": pretrain_step, "meta-train": meta_train_step, "features": features_step,
}


def measure_step(kind: str, name: str, config: Config, settings: Settings, device: torch.device) -> dict[str, float]:
    step = STEP_BUILDERS[kind](name, config, settings, device)
    flops = count_flops(step)  # also the first, untimed call
    seconds, last = time_step(step, device, settings.warmup, settings.repeats)
    if not torch.isfinite(last).all():
        print(f"  warning: {name} {kind} step gave a non-finite value; its timing may be off")
    return rate_record(flops, seconds)


# --- report ---------------------------------------------------------------------------------------


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def format_table(steps: dict[str, dict[str, dict[str, float]]], precision: str) -> list[str]:
    lines = [f"{'backbone':<9} {'step':<10} {'precision':<9} {'GFLOP/step':>10} {'ms best':>9} {'ms median':>9} "
             f"{'GFLOP/s':>8} {'% of matmul':>11}"]
    for name, kinds in steps.items():
        for kind, record in kinds.items():
            lines.append(f"{name:<9} {kind:<10} {precision:<9} {record['gflop']:>10.3f} {record['best_ms']:>9.1f} "
                         f"{record['median_ms']:>9.1f} {record['gflops']:>8.1f} {record['percent_of_matmul']:>10.1f}%")
    return lines


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=Config().amp,
                        help="bf16 autocast where the device has native bf16 (config default: on)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed calls before them (default 2)")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default 32)")
    parser.add_argument("--width", type=float, help="backbone channel multiplier (default 1.0)")
    parser.add_argument("--batch-size", type=int, help="pre-train batch (default 128)")
    parser.add_argument("--feature-batch", type=int, help="feature-extraction batch (default 256)")
    parser.add_argument("--inner-steps", type=int, help="meta-train inner-loop steps (default: base_learner.steps, 100)")
    parser.add_argument("--matmul-size", type=int, help="side of the square matmul (default 2048 on CPU, 8192 on CUDA)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a seconds-long smoke run")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return args, Settings(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args, settings = parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.matmul_size is None and not args.quick and device.type == "cuda":
        settings.matmul_size = 8192  # 2048 leaves a large GPU partly idle
    bf16_native = native_bf16(device.type)
    precision = "bf16" if args.amp and bf16_native else "fp32"
    config = phase_config(settings, amp=precision == "bf16")
    load_before = load_average()
    print(f"torch {torch.__version__}, {device.type} ({device_description(device)}), {torch.get_num_threads()} threads, "
          f"native bf16: {bf16_native}, amp: {args.amp} -> steps run in {precision}; load average {load_before}")

    matmul = {"fp32": matmul_rate(device, torch.float32, settings.matmul_size, settings)}
    if bf16_native:
        matmul["bf16"] = matmul_rate(device, torch.bfloat16, settings.matmul_size, settings)
    n = settings.matmul_size
    print(f"matrix multiply {n}x{n} @ {n}x{n}: " + ", ".join(
        f"{dtype} {record['gflops']:.1f} GFLOP/s (median {record['gflops_median']:.1f})" for dtype, record in matmul.items()))

    steps: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.backbones:
        steps[name] = {}
        for kind in STEP_KINDS:
            record = measure_step(kind, name, config, settings, device)
            record["percent_of_matmul"] = 100 * record["gflops"] / matmul[precision]["gflops"]
            steps[name][kind] = record
    print()
    print("\n".join(format_table(steps, precision)))

    result = {
        "device": device.type, "device_name": device_description(device), "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": bf16_native, "amp": args.amp, "precision": precision, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "quick": args.quick, "settings": dataclasses.asdict(settings), "matmul": matmul, "steps": steps,
        "load_average_before": load_before, "load_average_after": load_average(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{result['seconds']:.0f} s; load average {load_before} -> {result['load_average_after']}")
    headline = "resnet12" if "resnet12" in steps else args.backbones[0]
    print(f"{headline} pre-train step: {steps[headline]['pre-train']['percent_of_matmul']:.1f}% of the {precision} matrix-multiply rate")
    return result


if __name__ == "__main__":
    main()
