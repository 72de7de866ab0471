"""E3BM's hyperprior learners: each task's inner-loop step sizes and combination weights.

Liu, Schiele, Sun, "An Ensemble of Epoch-wise Empirical Bayes for Few-shot Learning", ECCV 2020.
`models.head.BaseLearner` holds one (`base_learner.ensemble=e3bm`) and meta-training learns it.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HYPERPRIOR_SCALE", "Hyperprior"]

# E3BM's code: each hyperprior output is its initial value plus 1e-4 times the mapping's output.
HYPERPRIOR_SCALE = 1e-4
# The tensors `state_dict()` holds, as checkpoints and bundles store them under `hyperprior.`.
_TENSORS = ("step_size_init", "step_size_weight", "step_size_bias", "combination_init", "combination_weight", "combination_bias")


def _kaiming(rows: int, columns: int, generator: torch.Generator | None) -> torch.Tensor:
    weight = torch.empty(rows, columns)
    torch.nn.init.kaiming_normal_(weight, generator=generator)
    return weight


class Hyperprior(nn.Module):
    """E3BM's two hyperprior learners (Liu, Schiele, Sun, "An Ensemble of Epoch-wise Empirical Bayes
    for Few-shot Learning", ECCV 2020): for inner step k, each task's step size a_k and combination
    weight v_k, conditioned on the task.

    Each is a learned initial value plus `HYPERPRIOR_SCALE` times the k-th output of a linear layer
    on the task's context, [mean support feature, mean over classes of the step's gradient], as the
    official code computes them. a starts at the base learning rate; v at 1 for the last step and 0
    elsewhere ("last", the code's LAS: the ensemble starts as the plain base learner) or at 1/steps
    for every step ("equal", EQU). The layers start as the code's (kaiming weights, zero biases).

    Args:
        steps: the number of inner steps (k = 0 .. steps - 1).
        dim: D, the feature dimension (the context has 2D entries).
        lr: the base learning rate, a's initial value.
        init: "last" or "equal", v's initial value.
        generator: draws the layers' kaiming weights (None: the global generator).
    """

    def __init__(self, steps: int, dim: int, lr: float = 0.01, init: str = "last", *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if init not in ("last", "equal"):
            raise ValueError(f"Unknown ensemble init {init!r}; use last or equal.")
        combination = torch.full((steps,), 1.0 / steps) if init == "equal" else F.one_hot(torch.tensor(steps - 1), steps).float()
        self.step_size_init = nn.Parameter(torch.full((steps,), float(lr)))
        self.step_size_weight = nn.Parameter(_kaiming(steps, 2 * dim, generator))
        self.step_size_bias = nn.Parameter(torch.zeros(steps))
        self.combination_init = nn.Parameter(combination)
        self.combination_weight = nn.Parameter(_kaiming(steps, 2 * dim, generator))
        self.combination_bias = nn.Parameter(torch.zeros(steps))

    @classmethod
    def from_tensors(cls, state: Mapping[str, torch.Tensor], *, source: str = "the checkpoint") -> "Hyperprior":
        """The hyperprior learners saved by `state_dict()`; their sizes come from the tensors.
        `source` (where they were read) is named if some are missing.

        Raises:
            ValueError: `state` lacks some of the tensors, or holds others."""
        cls.check_keys(state, source=source)
        steps, context = state["step_size_weight"].shape
        hyperprior = cls(steps, context // 2, generator=torch.Generator())  # overwritten below: leave the global RNG alone
        hyperprior.load_state_dict({name: tensor.float() for name, tensor in state.items()})
        return hyperprior

    @staticmethod
    def check_keys(state: Mapping[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
        """Refuse a `state` that is not exactly the hyperprior learners' tensors, naming the missing
        and unexpected ones (`load_state_dict` would only list them, without saying whose file)."""
        missing = sorted(set(_TENSORS) - set(state))
        unexpected = sorted(set(state) - set(_TENSORS))
        if missing or unexpected:
            details = "; ".join(part for part in (
                f"missing {', '.join('hyperprior.' + name for name in missing)}" if missing else "",
                f"unexpected {', '.join('hyperprior.' + name for name in unexpected)}" if unexpected else "") if part)
            raise ValueError(f"{source} holds an incomplete set of E3BM hyperprior tensors: {details}")

    @property
    def steps(self) -> int:
        return self.step_size_init.shape[0]

    def forward(self, step: int, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 2D) task contexts -> (T,) step sizes and (T,) combination weights of inner step `step`."""
        def value(init: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            mapped = context @ weight[step].to(context) + bias[step].to(context)  # (T,): only row k is needed
            return init[step].to(context) + HYPERPRIOR_SCALE * mapped

        return (value(self.step_size_init, self.step_size_weight, self.step_size_bias),
                value(self.combination_init, self.combination_weight, self.combination_bias))
