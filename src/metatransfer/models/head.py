"""The base-learner of MTL and its inner loop, vectorised over tasks: the one module that
meta-train, validation, meta-test, the Python API and export all call.

The base-learner is one FC layer on frozen features; only it is fine-tuned on a task's support set
(Sun et al. 2019, section 4.2). Because the features are fixed inside the inner loop, the gradient
of the mean cross-entropy has a closed form, (softmax - onehot) / M times the features, so each
step is two batched matrix products for all T tasks at once: no autograd graph per step, no Python
loop per task. The closed form is itself made of differentiable ops, so keeping it in the graph
gives exact second-order meta-gradients for free, and detaching it gives the first-order ones.

`BaseLearner` holds the options on top (all off by default, MTL as published): the task's FC may
start at its support prototypes (class means, optionally centred, normalised and scaled: E3BM's
"feature" init) with theta as a learned offset, and the logits may be cosine similarities times a
temperature (Meta-Baseline, Chen et al. ICCV 2021; E3BM). Cosine logits have no closed-form step;
their inner loop uses autograd, with the same first/second-order semantics.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BaseLearner", "head_logits", "adapt_head", "init_head_weight", "expand_head", "per_class_accuracy"]


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(T, M, D) features, (T, N, D) weight, (T, N) bias -> (T, M, N) logits."""
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


def adapt_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    steps: int,
    lr: float,
    second_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tune T linear heads on their support sets with `steps` steps of gradient descent.

    Args:
        features: (T, M, D) support features.
        labels: (T, M) labels in 0..N-1.
        weight: (T, N, D) initial weights (the meta-learned theta, expanded over tasks).
        bias: (T, N) initial biases.
        steps: number of gradient steps on the mean cross-entropy.
        lr: step size.
        second_order: keep the steps in the autograd graph, so the query loss reaches the support
            features and theta through the whole inner loop (the paper's TF code). Otherwise the
            step directions are constants (first order): theta still gets the query gradient
            through the identity part of each step, the support features get none.

    Returns:
        The adapted (weight, bias), differentiable w.r.t. the inputs as described above.
    """
    n_way = weight.shape[1]
    targets = F.one_hot(labels, n_way).to(features.dtype)
    scale = 1.0 / labels.shape[1]
    for _ in range(steps):
        if second_order:
            residual = (torch.softmax(head_logits(features, weight, bias), dim=-1) - targets) * scale
            weight = weight - lr * torch.bmm(residual.transpose(1, 2), features)
            bias = bias - lr * residual.sum(dim=1)
        else:
            with torch.no_grad():
                residual = (torch.softmax(head_logits(features, weight, bias), dim=-1) - targets) * scale
                grad_weight = torch.bmm(residual.transpose(1, 2), features)
            weight = weight - lr * grad_weight
            bias = bias - lr * residual.sum(dim=1)
    return weight, bias


def init_head_weight(n_way: int, dim: int, kind: str, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Starting value of the meta-learned initialisation theta, (N, D)."""
    weight = torch.empty(n_way, dim)
    if kind == "kaiming":
        torch.nn.init.kaiming_normal_(weight, generator=generator)
    elif kind == "xavier":
        torch.nn.init.xavier_uniform_(weight, generator=generator)
    elif kind == "zeros":
        weight.zero_()
    else:
        raise ValueError(f"Unknown head init {kind!r}; use kaiming, xavier or zeros.")
    return weight


def expand_head(weight: torch.Tensor, bias: torch.Tensor, n_way: int, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (N0, D), (N0,) -> per-task copies (T, n_way, D), (T, n_way).

    Task labels are a random order of classes, so theta's rows are exchangeable; for another
    number of ways than theta was meta-trained with, every row starts at theta's mean row.
    """
    if weight.shape[0] != n_way:
        weight = weight.mean(dim=0, keepdim=True).expand(n_way, -1)
        bias = bias.mean(dim=0, keepdim=True).expand(n_way)
    return weight.unsqueeze(0).expand(n_tasks, -1, -1), bias.unsqueeze(0).expand(n_tasks, -1)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """(T, M, N) logits, (T, M) labels -> (T, N) accuracy of each class on the task's queries."""
    correct = (logits.argmax(dim=-1) == labels).float()
    hits = torch.zeros(labels.shape[0], n_way, device=labels.device).scatter_add_(1, labels, correct)
    counts = torch.zeros_like(hits).scatter_add_(1, labels, torch.ones_like(correct))
    return hits / counts.clamp(min=1)



def class_means(features: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """(T, M, D) support features, (T, M) labels -> (T, n_way, D) per-class mean features."""
    onehot = F.one_hot(labels, n_way).to(features.dtype)  # (T, M, N)
    return torch.bmm(onehot.transpose(1, 2), features) / onehot.sum(dim=1).clamp(min=1).unsqueeze(-1)


def _adapt_by_autograd(loss_fn, weight: torch.Tensor, bias: torch.Tensor, *, steps: int, lr: float,
                       second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent on `loss_fn(weight, bias)`; second order keeps each step in the graph, first
    order treats the step directions as constants (theta keeps its identity path)."""
    with torch.enable_grad():
        for _ in range(steps):
            if second_order:
                w = weight if weight.requires_grad else weight.detach().requires_grad_()
                b = bias if bias.requires_grad else bias.detach().requires_grad_()
            else:
                w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            grad_w, grad_b = torch.autograd.grad(loss_fn(w, b), (w, b), create_graph=second_order)
            weight, bias = (w if second_order else weight) - lr * grad_w, (b if second_order else bias) - lr * grad_b
    return weight, bias


@dataclass(frozen=True)
class BaseLearner:
    """How each task's FC is started, fine-tuned on the support set and read out (config `base_learner`).

    Meta-train, validation, meta-test, `FewShotClassifier` and export bundles build it from the same
    settings, so a model is scored exactly as it was meta-trained.

    Args:
        steps, lr: gradient steps on the support set's mean cross-entropy, and their size.
        fc_init: "theta" (the FC starts at theta) or "prototypes" (at the support class means, plus theta).
        prototype_centre, prototype_normalise, prototype_scale: how prototypes are shaped.
        logits: "linear" or "cosine" (temperature * cosine similarity + bias).
    """

    steps: int
    lr: float
    fc_init: str = "theta"
    prototype_centre: bool = False
    prototype_normalise: bool = False
    prototype_scale: float = 1.0
    logits: str = "linear"

    @classmethod
    def from_config(cls, config: Any) -> "BaseLearner":
        """From a `BaseLearnerConfig` (or a bundle's `base_learner` dict; missing keys take their defaults)."""
        values = config if isinstance(config, dict) else asdict(config)
        names = cls.__dataclass_fields__
        return cls(**{key: value for key, value in values.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def initial_head(self, support: torch.Tensor, labels: torch.Tensor, theta_weight: torch.Tensor, theta_bias: torch.Tensor,
                     n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's FC before fine-tuning: (T, n_way, D) weight and (T, n_way) bias."""
        weight, bias = expand_head(theta_weight, theta_bias, n_way, support.shape[0])
        if self.fc_init == "prototypes":
            prototypes = class_means(support, labels, n_way)
            if self.prototype_centre:
                prototypes = prototypes - prototypes.mean(dim=1, keepdim=True)
            if self.prototype_normalise:
                prototypes = F.normalize(prototypes, dim=-1)
            weight = weight + self.prototype_scale * prototypes
        return weight, bias

    def logits_of(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  temperature: torch.Tensor | float = 1.0) -> torch.Tensor:
        """(T, M, D) features -> (T, M, N) logits of the task heads."""
        if self.logits == "cosine":
            return temperature * torch.bmm(F.normalize(features, dim=-1), F.normalize(weight, dim=-1).transpose(1, 2)) + bias.unsqueeze(1)
        return head_logits(features, weight, bias)

    def adapt(self, support: torch.Tensor, labels: torch.Tensor, theta_weight: torch.Tensor, theta_bias: torch.Tensor, n_way: int, *,
              temperature: torch.Tensor | float = 1.0, second_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Start each task's FC and fine-tune it on the (T, M, D) support features with (T, M) labels."""
        weight, bias = self.initial_head(support, labels, theta_weight, theta_bias, n_way)
        if self.logits == "linear":  # the closed-form step
            return adapt_head(support, labels, weight, bias, steps=self.steps, lr=self.lr, second_order=second_order)
        if not second_order:
            support = support.detach()

        def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.logits_of(support, w, b, temperature).flatten(0, 1), labels.flatten()) * support.shape[0]

        return _adapt_by_autograd(loss, weight, bias, steps=self.steps, lr=self.lr, second_order=second_order)
