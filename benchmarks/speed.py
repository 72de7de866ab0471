"""Speed of our meta-test and meta-train against the reference PyTorch port's way, in one run.

Both sides use the same backbone weights, the same episodes, the same head initialisation theta
and the same inner-loop maths (100 SGD steps, lr 0.01, mean cross-entropy), so only the way of
computing differs:

meta-test
    baseline  as the port: per episode, forward its support and query images (fp32, contiguous),
              fine-tune a fresh nn.Linear (initialised to theta) with 100 autograd SGD steps,
              predict the queries. Timed on a few episodes and extrapolated linearly.
    ours      `extract_features` of the whole split once (channels_last, bf16 autocast where the
              CPU has native bf16), then `FewShotModel.score` over all episodes batched; the
              extraction is counted in ours' total, amortised over the episodes.
meta-train
    baseline  as the port, first order: one task per update; forward support (no graph: it gets
              no gradient) and query (fp32), 100 autograd steps on fast weights started from
              theta, query loss backward to the scale-shift parameters and theta, Adam step.
    ours      `meta_batch_loss` on a meta-batch of T tasks (bf16 + channels_last, closed-form
              batched inner loop), backward, Adam step; first order (fair) and second order
              (ours' default).

BatchNorm uses its running statistics on both sides (our default `bn_mode=frozen`; the port trains
with batch statistics). Weights are random unless --run-dir holds pretrain/best.

    .venv/bin/python benchmarks/speed.py --root /tmp/data --json /tmp/speed.json

`--image-size 84` upsamples the images (bilinear) to the paper's miniImageNet resolution, whose
images are not available here: speed depends on the image size, not on what the pixels show.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.config import Config
from metatransfer.data.augment import to_float
from metatransfer.data.cache import load_split
from metatransfer.data.episodes import TaskIndices, TaskSampler, gather_episode
from metatransfer.models.backbones import create_backbone
from metatransfer.models.head import BaseLearner, adapt_head, expand_head, head_logits, init_head_weight
from metatransfer.models.scale_shift import apply_scale_shift, scale_shift_parameters
from metatransfer.models.fuse import inference_copy
from metatransfer.features import FeatureSettings, extract_features
from metatransfer.evaluation import confidence_interval
from metatransfer.model import FewShotModel, Preprocessing
from metatransfer.phases.meta_train import meta_batch_loss, prepare_meta_model
from metatransfer.run import checkpoint_exists, load_checkpoint, native_bf16

CPU = torch.device("cpu")


def slice_tasks(tasks: TaskIndices, start: int, stop: int) -> TaskIndices:
    return TaskIndices(tasks.support[start:stop], tasks.query[start:stop], tasks.class_ids[start:stop], tasks.n_way, tasks.n_shot, tasks.n_query)


def one_task(tasks: TaskIndices, t: int) -> TaskIndices:
    return slice_tasks(tasks, t, t + 1)


def load_pretrained(backbone: nn.Module, run_dir: Path | None) -> str:
    """Load pretrain/best into `backbone` if the run dir has one; returns where the weights came from."""
    if run_dir is None:
        return "random (seeded)"
    stem = run_dir / "pretrain" / "best"
    if not checkpoint_exists(stem):
        raise FileNotFoundError(f"{stem}.json is missing; run `mtl pretrain --out {run_dir}` or drop --run-dir")
    tensors, _ = load_checkpoint(stem)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")})
    return str(stem)


def resized(split, size: int):
    """The split with its images upsampled to size x size (bilinear), held in memory."""
    chunks = []
    for start in range(0, len(split.images), 1000):
        batch = torch.from_numpy(np.array(split.images[start : start + 1000])).permute(0, 3, 1, 2).float()
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        chunks.append(batch.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return replace(split, images=np.concatenate(chunks))


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


# --- meta-test ------------------------------------------------------------------------------------


def baseline_meta_test(backbone, split, tasks: TaskIndices, theta_w, theta_b, *, steps: int, lr: float):
    """The port's way, episode by episode. Returns accuracies, predictions, fp32 features and times."""
    accuracies, predictions, kept = [], [], []
    forward_s = adapt_s = 0.0
    support_labels, query_labels = tasks.support_labels()[0], tasks.query_labels()[0]
    start = time.perf_counter()
    for t in range(tasks.n_tasks):
        tick = time.perf_counter()
        episode = gather_episode(split.images, one_task(tasks, t))
        with torch.no_grad():
            support = backbone(to_float(episode.support_images, split.mean, split.std))
            query = backbone(to_float(episode.query_images, split.mean, split.std))
        tock = time.perf_counter()
        head = nn.Linear(support.shape[1], tasks.n_way)
        with torch.no_grad():
            head.weight.copy_(theta_w)
            head.bias.copy_(theta_b)
        optimizer = torch.optim.SGD(head.parameters(), lr=lr)
        for _ in range(steps):
            loss = F.cross_entropy(head(support), support_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = head(query).argmax(dim=-1)
        forward_s += tock - tick
        adapt_s += time.perf_counter() - tock
        predictions.append(predicted)
        accuracies.append((predicted == query_labels).float().mean().item())
        kept.append((support, query))
    total = time.perf_counter() - start
    return np.asarray(accuracies), torch.stack(predictions), kept, {"total_s": total, "forward_s": forward_s, "adapt_s": adapt_s}


def closed_form_predictions(support, query, tasks: TaskIndices, theta_w, theta_b, *, steps: int, lr: float) -> torch.Tensor:
    """Our inner loop (adapt_head) on given (T, M, D) features -> (T, N * Q) predicted labels."""
    weight, bias = expand_head(theta_w, theta_b, tasks.n_way, tasks.n_tasks)
    weight, bias = adapt_head(support, tasks.support_labels(), weight, bias, steps=steps, lr=lr)
    return head_logits(query, weight, bias).argmax(dim=-1)


def bench_meta_test(args, backbone: nn.Module, split, theta_w, theta_b) -> dict:
    n_way, n_shot, n_query, steps, lr = args.n_way, args.n_shot, args.n_query, args.steps, args.lr
    fp32 = copy.deepcopy(backbone).eval()
    ours_model = copy.deepcopy(backbone).eval().to(memory_format=torch.channels_last)
    sampler = TaskSampler(split.labels, n_way=n_way, n_shot=n_shot, n_query=n_query, seed=args.seed)
    baseline_tasks = sampler.sample(args.baseline_episodes)

    # Timed A-B-A: half the baseline episodes before ours' feature extraction and half after, so
    # a change of machine load during the run weighs on both sides alike.
    half = args.baseline_episodes // 2
    first, second = slice_tasks(baseline_tasks, 0, half), slice_tasks(baseline_tasks, half, args.baseline_episodes)
    baseline_meta_test(fp32, split, sampler.sample(1), theta_w, theta_b, steps=steps, lr=lr)  # warm-up
    load_before = load_average()
    base_a = baseline_meta_test(fp32, split, first, theta_w, theta_b, steps=steps, lr=lr)

    # Ours: features of the whole split once, then all episodes batched.
    settings = FeatureSettings(mean=split.mean, std=split.std, device=CPU, amp=True, channels_last=True)
    extract_features(inference_copy(ours_model), split.images[:256], settings)  # warm-up
    tick = time.perf_counter()
    features = extract_features(inference_copy(ours_model), split.images, settings)  # as meta-test: SS and BN folded
    scorer = FewShotModel(ours_model, BaseLearner(steps=steps, lr=lr).with_theta(theta_w, theta_b),
                          Preprocessing.from_split(split.images, split.mean, split.std))  # scores the features above
    extract_s = time.perf_counter() - tick
    base_b = baseline_meta_test(fp32, split, second, theta_w, theta_b, steps=steps, lr=lr)
    base_acc = np.concatenate([base_a[0], base_b[0]])
    base_pred = torch.cat([base_a[1], base_b[1]])
    base_features = base_a[2] + base_b[2]
    base_time = {key: base_a[3][key] + base_b[3][key] for key in base_a[3]}
    halves = [base_a[3]["total_s"] / max(1, first.n_tasks), base_b[3]["total_s"] / max(1, second.n_tasks)]
    base_per_episode = base_time["total_s"] / args.baseline_episodes
    rows = []
    for episodes in args.episodes:
        tasks_sampler = TaskSampler(split.labels, n_way=n_way, n_shot=n_shot, n_query=n_query, seed=args.seed + 1)
        tick = time.perf_counter()
        tasks = tasks_sampler.sample(episodes)
        sample_s = time.perf_counter() - tick
        tick = time.perf_counter()
        accuracies = scorer.score(features, tasks)
        evaluate_s = time.perf_counter() - tick
        ours_total = extract_s + sample_s + evaluate_s
        base_total = base_per_episode * episodes
        mean, ci = confidence_interval(accuracies)
        rows.append({
            "episodes": episodes,
            "baseline_s": round(base_total, 2), "baseline_episodes_per_s": round(episodes / base_total, 3), "baseline_extrapolated": True,
            "ours_s": round(ours_total, 2), "ours_extract_s": round(extract_s, 2), "ours_sample_s": round(sample_s, 3), "ours_evaluate_s": round(evaluate_s, 3),
            "ours_episodes_per_s": round(episodes / ours_total, 2), "speedup": round(base_total / ours_total, 1),
            "ours_accuracy": round(mean, 2), "ours_ci95": round(ci, 2),
        })
    load_after = load_average()

    # Accuracy on the baseline's own episodes: same backbone, same theta, same maths.
    index = lambda idx: features[torch.from_numpy(idx)]  # noqa: E731
    ours_acc = scorer.score(features, baseline_tasks)
    ours_pred = closed_form_predictions(index(baseline_tasks.support), index(baseline_tasks.query), baseline_tasks, theta_w, theta_b, steps=steps, lr=lr)
    # Control: our closed-form loop on the baseline's own fp32 features isolates maths from bf16.
    support32 = torch.stack([s for s, _ in base_features])
    query32 = torch.stack([q for _, q in base_features])
    maths_pred = closed_form_predictions(support32, query32, baseline_tasks, theta_w, theta_b, steps=steps, lr=lr)
    feature_error = (features[torch.from_numpy(baseline_tasks.support)] - support32).norm() / support32.norm()
    base_mean, base_ci = confidence_interval(base_acc)
    ours_mean, ours_ci = confidence_interval(ours_acc)
    return {
        "baseline_episodes_timed": args.baseline_episodes,
        "baseline_s_per_episode": round(base_per_episode, 4),
        "baseline_s_per_episode_before_after": [round(x, 4) for x in halves],
        "baseline_forward_s_per_episode": round(base_time["forward_s"] / args.baseline_episodes, 4),
        "baseline_adapt_s_per_episode": round(base_time["adapt_s"] / args.baseline_episodes, 4),
        "ours_extract_s": round(extract_s, 2), "split_images": len(split.labels),
        "ours_extract_images_per_s": round(len(split.labels) / extract_s, 1),
        "rows": rows,
        "accuracy_same_episodes": {
            "episodes": args.baseline_episodes,
            "baseline": round(base_mean, 2), "baseline_ci95": round(base_ci, 2),
            "ours": round(ours_mean, 2), "ours_ci95": round(ours_ci, 2),
            "episodes_with_equal_accuracy": int((np.abs(base_acc - ours_acc) < 1e-6).sum()),
            "max_episode_difference": round(float(np.abs(base_acc - ours_acc).max()) * 100, 2),
            "query_predictions_agreeing": round(float((ours_pred == base_pred).float().mean()) * 100, 2),
            "control_closed_form_on_fp32_features_agreeing": round(float((maths_pred == base_pred).float().mean()) * 100, 2),
            "bf16_feature_relative_error": round(float(feature_error), 4),
        },
        "load_average": [load_before, load_after],
    }


# --- meta-train -----------------------------------------------------------------------------------


class PortMetaLearner:
    """The port's meta-train step, first order, one task per update (fp32, contiguous)."""

    def __init__(self, backbone: nn.Module, theta_w, theta_b, args) -> None:
        self.backbone = backbone.eval()
        self.weight = nn.Parameter(theta_w.clone())
        self.bias = nn.Parameter(theta_b.clone())
        self.steps, self.lr = args.steps, args.lr
        self.optimizer = torch.optim.Adam([
            {"params": scale_shift_parameters(backbone), "lr": args.lr_ss},
            {"params": [self.weight, self.bias], "lr": args.lr_head},
        ])

    def loss(self, split, tasks: TaskIndices) -> torch.Tensor:
        episode = gather_episode(split.images, tasks)
        with torch.no_grad():  # first order: the support features get no gradient
            support = self.backbone(to_float(episode.support_images, split.mean, split.std))
        query = self.backbone(to_float(episode.query_images, split.mean, split.std))
        weight, bias = self.weight, self.bias
        for _ in range(self.steps):
            inner = F.cross_entropy(F.linear(support, weight, bias), episode.support_labels[0])
            grad_w, grad_b = torch.autograd.grad(inner, [weight, bias])
            weight, bias = weight - self.lr * grad_w, bias - self.lr * grad_b
        return F.cross_entropy(F.linear(query, weight, bias), episode.query_labels[0])

    def step(self, split, tasks: TaskIndices) -> float:
        loss = self.loss(split, tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class OursMetaLearner:
    """`meta_batch_loss` on T tasks at once, bf16 autocast + channels_last, then one Adam step."""

    def __init__(self, backbone: nn.Module, theta_w, theta_b, args, *, first_order: bool) -> None:
        self.backbone = backbone.eval().to(memory_format=torch.channels_last)
        self.weight = nn.Parameter(theta_w.clone())
        self.bias = nn.Parameter(theta_b.clone())
        self.config = Config()
        self.config.amp, self.config.channels_last, self.config.model.bn_mode = True, True, "frozen"
        self.config.base_learner.steps, self.config.base_learner.lr = args.steps, args.lr
        self.config.meta_train.first_order = first_order
        self.optimizer = torch.optim.Adam([
            {"params": scale_shift_parameters(backbone), "lr": args.lr_ss},
            {"params": [self.weight, self.bias], "lr": args.lr_head},
        ])

    def loss(self, split, tasks: TaskIndices) -> torch.Tensor:
        episode = gather_episode(split.images, tasks)
        learner = BaseLearner.from_config(self.config.base_learner).with_theta(self.weight, self.bias)
        return meta_batch_loss(self.backbone, learner, episode, self.config, Preprocessing.from_split(split.images, split.mean, split.std))[0]

    def step(self, split, tasks: TaskIndices) -> float:
        loss = self.loss(split, tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def _gradients(learner) -> tuple[torch.Tensor, torch.Tensor]:
    ss = torch.cat([p.grad.flatten() for p in scale_shift_parameters(learner.backbone)])
    head = torch.cat([learner.weight.grad.flatten(), learner.bias.grad.flatten()])
    return ss, head


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(F.cosine_similarity(a, b, dim=0)), 4)


def bench_meta_train(args, ss_model: nn.Module, split, theta_w, theta_b) -> dict:
    sampler = TaskSampler(split.labels, n_way=args.n_way, n_shot=args.n_shot, n_query=args.n_query, seed=args.seed + 2)
    make = lambda cls, **kw: cls(copy.deepcopy(ss_model), theta_w, theta_b, args, **kw)  # noqa: E731

    # Same maths: loss and gradients of both, first order, on one task from the same state.
    check = sampler.sample(1)
    port, ours = make(PortMetaLearner), make(OursMetaLearner, first_order=True)
    port_loss, ours_loss = port.loss(split, check), ours.loss(split, check)
    port_loss.backward()
    ours_loss.backward()
    (port_ss, port_head), (ours_ss, ours_head) = _gradients(port), _gradients(ours)
    parity = {
        "port_query_loss": round(port_loss.item(), 4), "ours_query_loss": round(ours_loss.item(), 4),
        "ss_gradient_cosine": _cosine(port_ss, ours_ss), "head_gradient_cosine": _cosine(port_head, ours_head),
        "ss_gradient_norm_ratio": round(float(ours_ss.norm() / port_ss.norm()), 4),
    }

    load_before = load_average()
    port = make(PortMetaLearner)
    port.step(split, sampler.sample(1))  # warm-up
    tasks = [sampler.sample(1) for _ in range(args.train_baseline_tasks)]
    half = len(tasks) // 2

    def time_port(chunk: list[TaskIndices]) -> float:
        tick = time.perf_counter()
        for task in chunk:
            port.step(split, task)
        return time.perf_counter() - tick

    port_before = time_port(tasks[:half])  # A-B-A, as in meta-test
    rows = []
    for n_tasks in args.meta_tasks:
        # First and second order alternate update by update, so they see the same machine load.
        learners = {order: make(OursMetaLearner, first_order=order == "first") for order in ("first", "second")}
        seconds = dict.fromkeys(learners, 0.0)
        for learner in learners.values():
            learner.step(split, sampler.sample(n_tasks))  # warm-up
        for _ in range(args.train_iterations):
            batch = sampler.sample(n_tasks)
            for order, learner in learners.items():
                tick = time.perf_counter()
                learner.step(split, batch)
                seconds[order] += time.perf_counter() - tick
        for order, total in seconds.items():
            per_task = total / (args.train_iterations * n_tasks)
            rows.append({"method": f"ours ({order} order)", "tasks_per_update": n_tasks, "updates": args.train_iterations,
                         "s_per_task": round(per_task, 3), "tasks_per_s": round(1 / per_task, 3)})
    port_after = time_port(tasks[half:])
    port_s = (port_before + port_after) / len(tasks)
    rows.insert(0, {"method": "baseline (port, first order)", "tasks_per_update": 1, "updates": len(tasks),
                    "s_per_task": round(port_s, 3), "tasks_per_s": round(1 / port_s, 3),
                    "s_per_task_before_after": [round(port_before / max(1, half), 3), round(port_after / max(1, len(tasks) - half), 3)]})
    for row in rows:
        row["speedup"] = round(port_s / row["s_per_task"], 1)
    return {"parity_one_task": parity, "rows": rows, "load_average": [load_before, load_average()]}


# --- report ---------------------------------------------------------------------------------------


def print_report(result: dict) -> None:
    test, train = result["meta_test"], result["meta_train"]
    print(f"\nmeta-test  ({result['setting']}; baseline timed on {test['baseline_episodes_timed']} episodes, "
          f"extrapolated linearly: {test['baseline_s_per_episode']:.3f} s/episode = "
          f"{test['baseline_forward_s_per_episode']:.3f} forward + {test['baseline_adapt_s_per_episode']:.3f} 100 autograd steps; "
          f"{test['baseline_s_per_episode_before_after'][0]:.3f} / {test['baseline_s_per_episode_before_after'][1]:.3f} s before / after ours)")
    print(f"ours: features of {test['split_images']} images in {test['ours_extract_s']:.1f} s "
          f"({test['ours_extract_images_per_s']:.0f} images/s), counted in ours' total below")
    print(f"{'episodes':>9} {'baseline s':>11} {'ours s':>8} {'(extract+sample+heads)':>26} {'base ep/s':>10} {'ours ep/s':>10} {'speedup':>8} {'ours acc':>14}")
    for r in test["rows"]:
        parts = f"{r['ours_extract_s']:.1f}+{r['ours_sample_s']:.2f}+{r['ours_evaluate_s']:.2f}"
        print(f"{r['episodes']:>9} {r['baseline_s']:>11.1f} {r['ours_s']:>8.1f} {parts:>26} {r['baseline_episodes_per_s']:>10.2f} "
              f"{r['ours_episodes_per_s']:>10.1f} {r['speedup']:>7.1f}x {r['ours_accuracy']:>7.2f}+-{r['ours_ci95']:.2f}")
    a = test["accuracy_same_episodes"]
    print(f"same {a['episodes']} episodes: baseline {a['baseline']:.2f}+-{a['baseline_ci95']:.2f}, ours {a['ours']:.2f}+-{a['ours_ci95']:.2f}; "
          f"{a['episodes_with_equal_accuracy']}/{a['episodes']} episodes equal (max diff {a['max_episode_difference']:.2f} pts), "
          f"{a['query_predictions_agreeing']:.2f}% query predictions agree; ours' closed form on the baseline's fp32 features: "
          f"{a['control_closed_form_on_fp32_features_agreeing']:.2f}% agree; bf16 feature rel. error {a['bf16_feature_relative_error']:.4f}")
    print(f"load average {test['load_average'][0]} -> {test['load_average'][1]}")

    print(f"\nmeta-train ({result['setting']})")
    print(f"{'method':<30} {'T':>3} {'updates':>8} {'s/task':>8} {'tasks/s':>8} {'speedup':>8}")
    for r in train["rows"]:
        print(f"{r['method']:<30} {r['tasks_per_update']:>3} {r['updates']:>8} {r['s_per_task']:>8.3f} {r['tasks_per_s']:>8.3f} {r['speedup']:>7.1f}x")
    before, after = train["rows"][0]["s_per_task_before_after"]
    print(f"baseline s/task before / after ours: {before:.3f} / {after:.3f}")
    p = train["parity_one_task"]
    print(f"same task, same state, first order: query loss port {p['port_query_loss']:.4f} vs ours {p['ours_query_loss']:.4f}; "
          f"gradient cosine SS {p['ss_gradient_cosine']:.4f}, head {p['head_gradient_cosine']:.4f}; SS grad norm ratio {p['ss_gradient_norm_ratio']:.3f}")
    print(f"load average {train['load_average'][0]} -> {train['load_average'][1]}")
    print(f"\ntargets: meta-test >= 20x at {test['rows'][0]['episodes']} episodes: {test['rows'][0]['speedup']:.1f}x; "
          f"meta-train >= 3x: best {max(r['speedup'] for r in train['rows'][1:]):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/data", help="cache root written by `mtl data prepare`")
    parser.add_argument("--name", default="fc100", help="prepared dataset name")
    parser.add_argument("--backbone", default="resnet12")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--run-dir", type=Path, help="use this run's pretrain/best weights instead of random ones")
    parser.add_argument("--image-size", type=int, help="upsample the images to this size (e.g. 84, the paper's)")
    parser.add_argument("--n-way", type=int, default=5)
    parser.add_argument("--n-shot", type=int, default=5)
    parser.add_argument("--n-query", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100, help="inner-loop SGD steps")
    parser.add_argument("--lr", type=float, default=0.01, help="inner-loop step size")
    parser.add_argument("--lr-ss", type=float, default=1e-4)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--baseline-episodes", type=int, default=10, help="meta-test episodes the baseline is timed on")
    parser.add_argument("--episodes", type=int, nargs="+", default=[600, 10000], help="meta-test episode counts to report")
    parser.add_argument("--train-baseline-tasks", type=int, default=4, help="meta-train tasks the baseline is timed on")
    parser.add_argument("--train-iterations", type=int, default=2, help="ours' timed meta-batches per setting")
    parser.add_argument("--meta-tasks", type=int, nargs="+", default=[2, 8], help="ours' tasks per meta-batch (T)")
    parser.add_argument("--skip", choices=["meta-test", "meta-train"], help="run only the other half")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only memory map
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    test = load_split(args.root, args.name, "test")
    train = load_split(args.root, args.name, "train")
    in_chans = test.images.shape[-1]
    np.asarray(test.images).sum(), np.asarray(train.images).sum()  # warm the page cache
    if args.image_size:
        test, train = resized(test, args.image_size), resized(train, args.image_size)
    backbone = create_backbone(args.backbone, in_chans=in_chans, width=args.width).eval()
    source = load_pretrained(backbone, args.run_dir)
    theta_w = init_head_weight(args.n_way, backbone.out_features, "kaiming", generator=torch.Generator().manual_seed(args.seed))
    theta_b = torch.zeros(args.n_way)
    if args.run_dir is not None:
        config = Config()
        config.model.backbone, config.model.width = args.backbone, args.width
        ss_model, _ = prepare_meta_model(config, args.run_dir, in_chans)
    else:
        ss_model = copy.deepcopy(backbone)
        for parameter in ss_model.parameters():
            parameter.requires_grad_(False)
        apply_scale_shift(ss_model, mode="kernel", include_shortcuts=False)
    setting = (f"{args.backbone} x{args.width} on {args.name} {test.images.shape[1]}px, {args.n_way}-way {args.n_shot}-shot "
               f"{args.n_query}-query, {args.steps} steps lr {args.lr}, weights {source}")
    machine = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "ours_precision": "bf16" if native_bf16("cpu") else "fp32"}
    print(f"{setting}; torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {machine['cpu_capability']}, "
          f"ours in {machine['ours_precision']}, load average {os.getloadavg()}")
    result = {"setting": setting, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), **machine, "load_average_start": os.getloadavg()}
    started = time.perf_counter()
    if args.skip != "meta-test":
        result["meta_test"] = bench_meta_test(args, backbone, test, theta_w, theta_b)
    if args.skip != "meta-train":
        result["meta_train"] = bench_meta_train(args, ss_model, train, theta_w, theta_b)
    result["load_average_end"] = os.getloadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.skip is None:
        print_report(result)
    else:
        print(json.dumps(result, indent=1))
    print(f"wall {result['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
