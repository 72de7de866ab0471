"""The base-learner of MTL and its inner loop, vectorised over tasks: the one module that
meta-train, validation, meta-test, the Python API and export all call.

The base-learner is one FC layer on frozen features; only it is fine-tuned on a task's support set
(Sun et al. 2019, section 4.2). Because the features are fixed inside the inner loop, the gradient
of the mean cross-entropy has a closed form, (softmax - onehot) / M times the features, so each
step is two batched matrix products for all T tasks at once: no autograd graph per step, no Python
loop per task. The closed form is itself made of differentiable ops, so keeping it in the graph
gives exact second-order meta-gradients for free, and detaching it gives the first-order ones.

`BaseLearner` owns all of config `base_learner`: the meta-learned initialisation theta (weight and
bias), the cosine logits' temperature, E3BM's hyperprior learners, and the options on top (all off
by default, MTL as published): the task's FC may start at its support prototypes (class means,
optionally centred, normalised and scaled: E3BM's "feature" init) with theta as a learned offset,
and the logits may be cosine similarities times a temperature (Meta-Baseline, Chen et al. ICCV
2021; E3BM). Cosine logits have no closed-form step;
their inner loop uses autograd, with the same first/second-order semantics. With `ensemble="e3bm"`
the task's classifier is E3BM's ensemble over the inner steps (Liu, Schiele, Sun, ECCV 2020): two
hyperprior learners (`Hyperprior`) give each task its step sizes and combination weights, and the
adapted head is the weighted sum of the heads after each step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.config import REMOVED, BaseLearnerConfig
from metatransfer.models.hyperprior import Hyperprior

__all__ = ["BaseLearner", "Hyperprior", "head_logits", "adapt_head", "init_head_weight", "expand_head", "per_class_accuracy"]


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
    targets = F.one_hot(labels, weight.shape[1]).to(features.dtype)
    for _ in range(steps):
        grad_weight, grad_bias = _linear_gradient(features, targets, weight, bias, second_order=second_order)
        weight = weight - lr * grad_weight
        bias = bias - lr * grad_bias
    return weight, bias


def _linear_gradient(features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                     second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form gradient of the mean cross-entropy of (T, N, D) linear heads on (T, M, D) features with
    (T, M, N) one-hot targets: (softmax - onehot) / M times the features. First order: a constant."""
    with torch.set_grad_enabled(second_order and torch.is_grad_enabled()):
        residual = (torch.softmax(head_logits(features, weight, bias), dim=-1) - targets) * (1.0 / targets.shape[1])
        return torch.bmm(residual.transpose(1, 2), features), residual.sum(dim=1)


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


LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _autograd_gradient(loss_fn: LossFunction, weight: torch.Tensor, bias: torch.Tensor, *,
                       second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of `loss_fn(weight, bias)`: in the graph (second order) or a constant (first order)."""
    with torch.enable_grad():
        if second_order:
            w = weight if weight.requires_grad else weight.detach().requires_grad_()
            b = bias if bias.requires_grad else bias.detach().requires_grad_()
        else:
            w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
        grad_w, grad_b = torch.autograd.grad(loss_fn(w, b), (w, b), create_graph=second_order)
    return grad_w, grad_b


def _adapt_by_autograd(loss_fn: LossFunction, weight: torch.Tensor, bias: torch.Tensor, *, steps: int, lr: float,
                       second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent on `loss_fn(weight, bias)`; second order keeps each step in the graph, first
    order treats the step directions as constants (theta keeps its identity path)."""
    for _ in range(steps):
        grad_w, grad_b = _autograd_gradient(loss_fn, weight, bias, second_order=second_order)
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight, bias


_DEFAULTS = BaseLearnerConfig()  # config.py is the one home of the settings' defaults
# Removed settings an older bundle's `base_learner` may hold, with the value that left them off.
_REMOVED = {key.removeprefix("base_learner."): value for key, value in REMOVED.items() if key.startswith("base_learner.")}
# Settings that shape training only (theta's start, what is meta-learned): not needed to score, so
# left out of a bundle's `base_learner` and of comparisons.
_TRAINING_ONLY = ("init", "learn_theta", "learn_temperature")
# What a base-learner learns rather than is set to: left out of `to_dict` and of comparisons.
_LEARNED = ("theta_weight", "theta_bias", "temperature", "hyperprior")


@dataclass(frozen=True)
class BaseLearner:
    """The base-learner: one FC layer started from theta, fine-tuned on each task's support set and
    read out (config `base_learner`, all of it).

    Meta-train, validation, meta-test, `FewShotModel` and export bundles build it from the same
    settings and tensors, so a model is scored exactly as it was meta-trained.

    Args:
        steps, lr: gradient steps on the support set's mean cross-entropy, and their size.
        fc_init: "theta" (the FC starts at theta) or "prototypes" (at the support class means, plus theta).
        prototype_normalise: prototypes scaled to unit length.
        logits: "linear" or "cosine" (temperature * cosine similarity + bias).
        feature_centre: subtract from every feature (support and query) its mean over its dimensions (E3BM's code).
        ensemble: "none", or "e3bm": the head is E3BM's task-weighted sum of the heads after each step,
            stepped with task-conditioned step sizes, both from `hyperprior`.
        ensemble_init: "last" or "equal": the combination weights a fresh `Hyperprior` starts at.
        init: theta's start ("zeros", "kaiming", "xavier"), used by `untrained`.
        learn_theta, learn_temperature: what meta-training learns besides the backbone (`trainable`).
        theta_weight, theta_bias: the meta-learned initialisation theta, (N0, D) and (N0,); None for
            settings only.
        temperature: the cosine logits' scale (a tensor while meta-training learns it).
        hyperprior: E3BM's hyperprior learners (the meta-learned ones, or fresh ones from
            `with_untrained_hyperprior`).
    """

    steps: int
    lr: float
    fc_init: str = _DEFAULTS.fc_init
    prototype_normalise: bool = _DEFAULTS.prototype_normalise
    logits: str = _DEFAULTS.logits
    feature_centre: bool = _DEFAULTS.feature_centre
    ensemble: str = _DEFAULTS.ensemble
    ensemble_init: str = _DEFAULTS.ensemble_init
    init: str = field(default=_DEFAULTS.init, compare=False)
    learn_theta: bool = field(default=_DEFAULTS.learn_theta, compare=False)
    learn_temperature: bool = field(default=_DEFAULTS.learn_temperature, compare=False)
    theta_weight: torch.Tensor | None = field(default=None, compare=False, repr=False)
    theta_bias: torch.Tensor | None = field(default=None, compare=False, repr=False)
    temperature: torch.Tensor | float = field(default=_DEFAULTS.temperature, compare=False)
    hyperprior: Hyperprior | None = field(default=None, compare=False, repr=False)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, tensors: Mapping[str, torch.Tensor] | None = None, *,
                    source: str | None = None) -> "BaseLearner":
        """From a `BaseLearnerConfig` (or a bundle's `base_learner` dict; missing keys take their defaults).

        Args:
            config: the settings.
            tensors: a checkpoint's or bundle's tensors: theta (`head.weight`, `head.bias`), the
                temperature (`head.temperature`; runs from before cosine logits have none: the
                configured one) and, with `ensemble="e3bm"`, the hyperprior learners (`hyperprior.*`).
                None: settings only.
            source: where `tensors` were read (a checkpoint, a bundle's head file), named in errors
                so that the file to look at is known.

        Raises:
            ValueError: `ensemble="e3bm"` and `tensors` hold no hyperprior learners, or not all of them.
        """
        values = config if isinstance(config, dict) else {f.name: getattr(config, f.name) for f in fields(config)}
        for key, default in _REMOVED.items():  # a bundle exported before these settings were removed
            if values.get(key, default) != default:
                raise ValueError(f"This model was made with base_learner.{key}={values[key]!r}, an option that has been "
                                 "removed: this version cannot score it as it was trained.")
        settings = {f.name for f in fields(cls) if f.name not in _LEARNED or f.name == "temperature"}
        learner = cls(**{key: value for key, value in values.items() if key in settings})
        if tensors is None:
            return learner
        if "head.weight" in tensors:
            temperature = float(tensors["head.temperature"]) if "head.temperature" in tensors else float(learner.temperature)
            learner = replace(learner, theta_weight=tensors["head.weight"].float(), theta_bias=tensors["head.bias"].float(),
                              temperature=temperature)
        if learner.ensemble == "none":
            return learner
        state = {key[len("hyperprior."):]: value for key, value in tensors.items() if key.startswith("hyperprior.")}
        where = source if source is not None else "the checkpoint"
        if not state:
            raise ValueError(f"base_learner.ensemble=e3bm, but {where} holds no hyperprior learners (hyperprior.* "
                             "tensors): it was meta-trained without E3BM. Score it with base_learner.ensemble=none.")
        return replace(learner, hyperprior=Hyperprior.from_tensors(state, source=where))

    @classmethod
    def untrained(cls, config: Any, dim: int, *, n_way: int, seed: int) -> "BaseLearner":
        """The base-learner as meta-training starts it, for D = `dim` features: theta at `config.init`
        for `n_way` classes and, with E3BM, fresh hyperprior learners, drawn in that order from one
        generator seeded by `seed` (the run's): theta first, so it is the same with or without E3BM,
        and the hyperprior's layers from the draws after it, not a copy of theta's. What pre-training
        validates with, what meta-training learns from, and the start that the paired gain is measured against."""
        learner = cls.from_config(config)
        generator = torch.Generator().manual_seed(seed)
        weight = init_head_weight(n_way, dim, learner.init, generator=generator)
        learner = replace(learner, theta_weight=weight, theta_bias=torch.zeros(n_way))
        return learner.with_untrained_hyperprior(dim, generator)

    def with_untrained_hyperprior(self, dim: int, generator: torch.Generator | None = None) -> "BaseLearner":
        """With `ensemble="e3bm"`, a copy holding fresh hyperprior learners for D = `dim` features, as
        meta-training starts them; otherwise itself."""
        if self.ensemble == "none":
            return self
        return replace(self, hyperprior=Hyperprior(self.steps, dim, self.lr, self.ensemble_init, generator=generator))

    def with_theta(self, weight: torch.Tensor, bias: torch.Tensor, temperature: torch.Tensor | float | None = None) -> "BaseLearner":
        """A copy started from theta = (`weight` (N0, D), `bias` (N0,)), and `temperature` if given."""
        return replace(self, theta_weight=weight, theta_bias=bias, temperature=self.temperature if temperature is None else temperature)

    # --- its tensors ----------------------------------------------------------------------------

    def _hyperprior_on(self, device: torch.device | str | torch.dtype) -> Hyperprior | None:
        """A copy of the hyperprior learners on `device`: `nn.Module.to` moves in place, and the
        learner being copied (a loaded model, the untrained start) must keep its own."""
        return None if self.hyperprior is None else copy.deepcopy(self.hyperprior).to(device)

    def to(self, device: torch.device | str) -> "BaseLearner":
        """A copy with theta, the temperature (if a tensor) and the hyperprior learners on `device`; this one is unchanged."""
        temperature = self.temperature.to(device) if isinstance(self.temperature, torch.Tensor) else self.temperature
        hyperprior = self._hyperprior_on(device)
        if self.theta_weight is None:
            return replace(self, temperature=temperature, hyperprior=hyperprior)
        return replace(self, theta_weight=self.theta_weight.to(device), theta_bias=self.theta_bias.to(device), temperature=temperature,
                       hyperprior=hyperprior)

    def trainable(self, device: torch.device) -> "BaseLearner":
        """A copy for meta-training on `device`: theta and the temperature as `nn.Parameter`s, each
        requiring a gradient where `learn_theta` / `learn_temperature` says it is learned, and its
        own copy of the hyperprior learners (what the optimizer then updates)."""
        weight, bias = nn.Parameter(self.theta_weight.to(device)), nn.Parameter(self.theta_bias.to(device))
        temperature = nn.Parameter(torch.tensor(float(self.temperature), device=device))
        for parameter in (weight, bias):
            parameter.requires_grad_(self.learn_theta)
        temperature.requires_grad_(self.learn_temperature)
        return replace(self, theta_weight=weight, theta_bias=bias, temperature=temperature, hyperprior=self._hyperprior_on(device))

    def head_parameters(self) -> list[torch.Tensor]:
        """What meta-training learns of theta and the temperature (`learn_theta`, `learn_temperature`), in that order."""
        return ([self.theta_weight, self.theta_bias] if self.learn_theta else []) + ([self.temperature] if self.learn_temperature else [])

    def hyperprior_parameters(self) -> list[nn.Parameter]:
        """E3BM's hyperprior learners' parameters (none without E3BM)."""
        return list(self.hyperprior.parameters()) if self.hyperprior is not None else []

    def detached(self) -> "BaseLearner":
        """A copy whose theta and temperature carry no gradient (to score while meta-training)."""
        temperature = self.temperature.detach() if isinstance(self.temperature, torch.Tensor) else self.temperature
        return replace(self, theta_weight=self.theta_weight.detach(), theta_bias=self.theta_bias.detach(), temperature=temperature)

    @torch.no_grad()
    def load_tensors_(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """In place: theta, the temperature (if saved: runs from before the base-learner options have
        none) and the hyperprior learners from a checkpoint's tensors (a resumed meta-training)."""
        self.theta_weight.copy_(tensors["head.weight"])
        self.theta_bias.copy_(tensors["head.bias"])
        if "head.temperature" in tensors and isinstance(self.temperature, torch.Tensor):
            self.temperature.copy_(tensors["head.temperature"])
        if self.hyperprior is not None:
            state = {key[len("hyperprior."):]: value for key, value in tensors.items() if key.startswith("hyperprior.")}
            self.hyperprior.check_keys(state, source="the checkpoint")
            self.hyperprior.load_state_dict(state)

    def to_dict(self) -> dict[str, Any]:
        """The settings that scoring needs, plain values only (a bundle's `base_learner`)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _LEARNED + _TRAINING_ONLY}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the base-learner has learned, named as checkpoints and bundles store it: theta and the
        temperature (`head.*`, when it holds theta), E3BM's hyperprior learners (`hyperprior.*`)."""
        tensors = {}
        if self.theta_weight is not None:
            temperature = self.temperature if isinstance(self.temperature, torch.Tensor) else torch.tensor(float(self.temperature))
            tensors.update({"head.weight": self.theta_weight.detach().contiguous(), "head.bias": self.theta_bias.detach().contiguous(),
                            "head.temperature": temperature.detach().float()})
        if self.hyperprior is not None:
            tensors.update({f"hyperprior.{name}": tensor.detach().contiguous() for name, tensor in self.hyperprior.state_dict().items()})
        return tensors

    # --- the inner loop -------------------------------------------------------------------------

    def initial_head(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each task's FC before fine-tuning: (T, n_way, D) weight and (T, n_way) bias."""
        if self.theta_weight is None:
            raise ValueError("This base-learner holds no theta: build it with from_config(config, tensors), untrained() or with_theta().")
        weight, bias = expand_head(self.theta_weight, self.theta_bias, n_way, support.shape[0])
        if self.fc_init == "prototypes":
            prototypes = class_means(support, labels, n_way)
            if self.prototype_normalise:
                prototypes = F.normalize(prototypes, dim=-1)
            weight = weight + prototypes
        return weight, bias

    def _centred(self, features: torch.Tensor) -> torch.Tensor:
        return features - features.mean(dim=-1, keepdim=True) if self.feature_centre else features

    def _step_logits(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     temperature: torch.Tensor | float) -> torch.Tensor:
        """(T, M, D) features -> (T, M, N) logits of (T, N, D) heads during the inner loop."""
        if self.logits == "cosine":
            return temperature * torch.bmm(F.normalize(features, dim=-1), F.normalize(weight, dim=-1).transpose(1, 2)) + bias.unsqueeze(1)
        return head_logits(features, weight, bias)

    def logits_of(self, features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(T, M, D) features -> (T, M, N) logits of the task heads `adapt` returned (without an
        ensemble, of any heads). An E3BM head of cosine logits holds the weighted sum of the steps'
        unit-length weights, which is read as it is: normalising it again would change the sum."""
        features = self._centred(features)
        if self.logits == "cosine" and self.ensemble == "e3bm":
            return self.temperature * torch.bmm(F.normalize(features, dim=-1), weight.transpose(1, 2)) + bias.unsqueeze(1)
        return self._step_logits(features, weight, bias, self.temperature)

    def adapt(self, support: torch.Tensor, labels: torch.Tensor, n_way: int, *,
              second_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Start each task's FC and fine-tune it on the (T, M, D) support features with (T, M) labels;
        returns the (T, N, D) weights and (T, N) biases `logits_of` reads."""
        support = self._centred(support)
        if self.ensemble == "e3bm":
            return self._adapt_ensemble(support, labels, n_way, second_order)
        weight, bias = self.initial_head(support, labels, n_way)
        if self.logits == "linear":  # the closed-form step
            return adapt_head(support, labels, weight, bias, steps=self.steps, lr=self.lr, second_order=second_order)
        if not second_order:
            support = support.detach()
        return _adapt_by_autograd(self._support_loss(support, labels), weight, bias, steps=self.steps, lr=self.lr,
                                  second_order=second_order)

    def _support_loss(self, support: torch.Tensor, labels: torch.Tensor) -> LossFunction:
        """The support sets' summed per-task mean cross-entropy of heads (w, b): its gradient is each task's own."""
        def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._step_logits(support, w, b, self.temperature).flatten(0, 1), labels.flatten()) * support.shape[0]

        return loss

    def _adapt_ensemble(self, support: torch.Tensor, labels: torch.Tensor, n_way: int,
                        second_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """E3BM: step k moves each task's head by its own a_k times the gradient, and the task's head is
        sum_k v_k * head_k. Logits are linear in the head (cosine ones in its unit-length rows), so this
        one head scores queries exactly as the code's sum of the steps' query logits, with no query in the loop."""
        if self.hyperprior is None:
            raise ValueError("base_learner.ensemble=e3bm needs its hyperprior learners: a meta-trained checkpoint's "
                             "(BaseLearner.from_config(config, tensors)) or fresh ones (with_untrained_hyperprior).")
        if self.hyperprior.steps != self.steps:
            raise ValueError(f"The hyperprior learners were meta-trained for {self.hyperprior.steps} inner steps; "
                             f"base_learner.steps={self.steps} must match.")
        if not second_order:  # first order: the support features get no gradient, here as in the linear loop's caller
            support = support.detach()
        weight, bias = self.initial_head(support, labels, n_way)
        targets = F.one_hot(labels, n_way).to(support.dtype)
        loss = self._support_loss(support, labels)
        support_mean = support.mean(dim=1)  # (T, D)
        combined_weight, combined_bias = torch.zeros_like(weight), torch.zeros_like(bias)
        for step in range(self.steps):
            if self.logits == "linear":
                grad_weight, grad_bias = _linear_gradient(support, targets, weight, bias, second_order=second_order)
            else:
                grad_weight, grad_bias = _autograd_gradient(loss, weight, bias, second_order=second_order)
            context = torch.cat([support_mean, grad_weight.mean(dim=1)], dim=-1)  # (T, 2D)
            step_size, combination = self.hyperprior(step, context)  # (T,) each
            weight = weight - step_size.view(-1, 1, 1) * grad_weight
            bias = bias - step_size.view(-1, 1) * grad_bias
            readout = F.normalize(weight, dim=-1) if self.logits == "cosine" else weight
            combined_weight = combined_weight + combination.view(-1, 1, 1) * readout
            combined_bias = combined_bias + combination.view(-1, 1) * bias
        return combined_weight, combined_bias
