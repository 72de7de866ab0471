"""Fold frozen BatchNorm into the conv before it, for inference and for meta-training.

A BN at its running statistics is a per-channel affine map, so conv -> BN equals one conv with
weight W * g / sqrt(var + eps) and bias (b - mean) * g / sqrt(var + eps) + beta. Feature extraction
with frozen BN (meta-test, validation) runs on such a copy: about 1.4x faster on CPU in bf16.
Meta-training with frozen BN runs on `folded_view`, which folds at every forward instead, so the
gradient still reaches the scale-shift (or, for FT, the conv weights) and a learned BN affine:
the BN's own forward and backward passes, a sixth of an 84-px meta-iteration, are gone.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from metatransfer.models.scale_shift import ScaleShiftConv2d, fold_scale_shift

__all__ = ["FoldedConvBN", "folded_view", "fuse_batch_norm", "inference_copy"]


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one conv equal to conv (`weight`, `bias`) -> `norm` at its running statistics."""
    factor = torch.rsqrt(norm.running_var + norm.eps)
    if norm.affine:
        factor = factor * norm.weight
    bias = -norm.running_mean * factor if bias is None else (bias - norm.running_mean) * factor
    return weight * factor.view(-1, 1, 1, 1), bias + norm.bias if norm.affine else bias


@torch.no_grad()
def fuse_batch_norm(model: nn.Module) -> nn.Module:
    """In place: every BatchNorm2d registered right after a Conv2d sibling is folded into it."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for previous, name in zip(names, names[1:]):
            conv, norm = parent._modules[previous], parent._modules[name]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                weight, bias = _fold(conv.weight, conv.bias, norm)
                conv.weight.copy_(weight)
                conv.bias = nn.Parameter(bias, requires_grad=False)
                parent._modules[name] = nn.Identity()
    return model


def inference_copy(backbone: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy with scale-shift and BatchNorm folded into plain convs."""
    plain = fold_scale_shift(copy.deepcopy(backbone)).eval()
    for parameter in plain.parameters():
        parameter.requires_grad_(False)
    return fuse_batch_norm(plain)


class FoldedConvBN(nn.Module):
    """A conv (plain or scale-shifted) and the BN at running statistics after it, run as one conv
    whose weight and bias are folded from theirs at every call: differentiable in every parameter
    of both, and holding none of its own (the two modules are shared, not copied)."""

    def __init__(self, conv: nn.Conv2d | ScaleShiftConv2d, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.norm = conv, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        weight, bias = conv.scaled_weight_and_bias() if isinstance(conv, ScaleShiftConv2d) else (conv.weight, conv.bias)
        weight, bias = _fold(weight, bias, self.norm)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _is_conv(module: nn.Module | None) -> bool:
    return isinstance(module, (nn.Conv2d, ScaleShiftConv2d)) and getattr(module, "padding_mode", "zeros") == "zeros"


def folded_view(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm2d registered right after a conv sibling folded into it
    (`FoldedConvBN`), for training at running statistics (BN frozen, `model.bn_mode=frozen`).

    A view, not a copy: it shares every parameter and buffer with `model`, so an optimiser over
    `model`'s parameters trains it and `model.state_dict()` saves it. Its BN layers ignore
    `train()`: call it only where `model`'s BN would run at running statistics anyway.
    """
    view = copy.copy(model)  # shallow: the same parameter and buffer dicts, a new child dict
    view._modules = dict(model._modules)
    names = list(view._modules)
    folded = set()
    for previous, name in zip(names, names[1:]):
        conv, norm = view._modules[previous], view._modules[name]
        if _is_conv(conv) and isinstance(norm, nn.BatchNorm2d) and previous not in folded:
            view._modules[previous], view._modules[name] = FoldedConvBN(conv, norm), nn.Identity()
            folded.update((previous, name))
    for name, child in view._modules.items():
        if name not in folded and child is not None:
            view._modules[name] = folded_view(child)
    return view
