"""Exploration on VALIDATION episodes only (a fresh seed, 781, never used by any run or earlier choice):
does averaging each image's feature over more views than the flip pair (shifted copies, as the
pre-training crop makes them) help the run's base learner on its pre-trained start? And does feeding
the support views to the base learner as separate samples help 1-shot more than averaging them?
Paired per episode against the preset's flip average. Usage: python probe.py RUN EPISODES [small]
(small: the shifts by 2 only, for a second backbone)"""
import sys, time
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F, yaml
from metatransfer.config import config_from_dict
from metatransfer.phases.features import load_run_split, forward_images
from metatransfer.phases.meta_test import load_meta_model, evaluate_features, confidence_interval
from metatransfer.models.head import BaseLearner
from metatransfer.data.episodes import TaskSampler

torch.set_num_threads(2)
run = Path(sys.argv[1]); episodes = int(sys.argv[2]); small = sys.argv[3:] == ["small"]
cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
dev = torch.device("cpu")
val = load_run_split(cfg, "val")
backbone, w, b, temperature, source = load_meta_model(run, cfg, val.images.shape[-1], dev)
backbone.to(memory_format=torch.channels_last).eval()
print("model:", source, "temperature", float(temperature), flush=True)
pad = cfg.data.crop_padding


def shifted(dx: int, dy: int, flip: bool):
    def view(x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        out = F.pad(x, (pad, pad, pad, pad))[..., pad + dy : pad + dy + H, pad + dx : pad + dx + W]
        return out.flip(-1) if flip else out
    return view


@torch.no_grad()
def features(view) -> torch.Tensor:
    chunks = []
    for start in range(0, len(val.images), 500):
        batch = torch.from_numpy(np.array(val.images[start : start + 500]))
        chunks.append(forward_images(backbone, batch, mean=val.mean, std=val.std, device=dev, amp=cfg.amp,
                                     channels_last=cfg.channels_last, augment=view))
    return torch.cat(chunks)


t = time.time()
offsets = [(dx, dy) for dy in (-2, 0, 2) for dx in (-2, 0, 2)] + [(dx, dy) for dy in (-4, 0, 4) for dx in (-4, 0, 4) if (dx, dy) != (0, 0) and not small]
views = {(dx, dy, f): features(shifted(dx, dy, f)) for dx, dy in offsets for f in (False, True)}
print(f"features of {len(views)} views x {len(val.images)} images: {time.time() - t:.0f}s", flush=True)


def mean_of(keys):
    return torch.stack([views[k] for k in keys]).mean(0)


flip2 = [(0, 0, False), (0, 0, True)]
plus5 = [(dx, dy, f) for dx, dy in ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2)) for f in (False, True)]
grid9 = [(dx, dy, f) for dy in (-2, 0, 2) for dx in (-2, 0, 2) for f in (False, True)]
grid9_4 = [] if small else [(dx, dy, f) for dy in (-4, 0, 4) for dx in (-4, 0, 4) for f in (False, True)]
variants = {"flip2 (preset)": flip2, "plus5x2": plus5, "grid9x2 (+-2)": grid9, **({} if small else {"grid9x2 (+-4)": grid9_4})}
learner = BaseLearner.from_config(cfg.base_learner)
for shot in (1, 5):
    tasks = TaskSampler(val.labels, n_way=5, n_shot=shot, n_query=15, seed=[781, 5, shot]).sample(episodes)
    rows = {name: evaluate_features(mean_of(keys), tasks, w, b, learner=learner, temperature=temperature) for name, keys in variants.items()}
    # support views as separate samples, query averaged over the same views
    for name, keys in (("plus5x2 support as samples", plus5), ("grid9x2 (+-2) support as samples", grid9)):
        avg = mean_of(keys)
        support_idx = torch.from_numpy(tasks.support)
        stacked = torch.stack([views[k] for k in keys])  # (V, N, D)
        support = stacked[:, support_idx].permute(1, 0, 2, 3).flatten(1, 2)  # (T, V*M, D)
        labels = tasks.support_labels().repeat(1, len(keys))
        query = avg[torch.from_numpy(tasks.query)]
        acc = []
        for s in range(0, tasks.n_tasks, 250):
            wt, bt = learner.adapt(support[s : s + 250], labels[s : s + 250], w, b, tasks.n_way, temperature=temperature)
            pred = learner.logits_of(query[s : s + 250], wt, bt, temperature).argmax(-1)
            acc.append((pred == tasks.query_labels()[s : s + 250]).float().mean(1))
        rows[name] = torch.cat(acc).numpy()
    ref = rows["flip2 (preset)"]
    for k, v in rows.items():
        m, ci = confidence_interval(v); d, dci = confidence_interval(v - ref)
        print(f"{shot}-shot {k:34s} {m:.2f} +- {ci:.2f}  vs flip2: {d:+.2f} +- {dci:.2f}", flush=True)
print(f"total {time.time() - t:.0f}s")
