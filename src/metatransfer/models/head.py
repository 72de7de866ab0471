"""The linear base-learner of MTL and its inner loop, vectorised over tasks.

The base-learner is one FC layer on frozen features; only it is fine-tuned on a task's support set
(Sun et al. 2019, section 4.2). Because the features are fixed inside the inner loop, the gradient
of the mean cross-entropy has a closed form, (softmax - onehot) / M times the features, so each
step is two batched matrix products for all T tasks at once: no autograd graph per step, no Python
loop per task. The closed form is itself made of differentiable ops, so keeping it in the graph
gives exact second-order meta-gradients for free, and detaching it gives the first-order ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["head_logits", "adapt_head", "init_head_weight", "expand_head", "per_class_accuracy"]


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

