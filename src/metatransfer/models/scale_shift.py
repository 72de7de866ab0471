"""Scaling and shifting (SS) of frozen convolutions, the meta-transfer operation of MTL.

Sun et al., "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019, Sec. 4.2: a pre-trained
conv with frozen weight W and bias b computes ``X * (W ⊙ Phi_S1) + (b + Phi_S2)``, where only the
scale Phi_S1 (init 1) and the shift Phi_S2 (init 0) are meta-learned.

Scale shapes ("mode"):
    "kernel": (Cout, Cin / groups, 1, 1), one scalar per kernel slice, broadcast over the kernel;
        the shape of both reference codes.
    "channel": (Cout, 1, 1, 1), one scalar per output channel.
The shift has shape (Cout,). As in the TF code, it is added even where the conv has no bias
(the PyTorch port instead gives a shift only to convs with a bias).

``apply_scale_shift`` wraps the 3x3 convs and, by default, not the 1x1 shortcut/downsample convs
(the TF code's choice; ``include_shortcuts=True`` follows the PyTorch port, which wraps every conv).
It only replaces convs: which other parameters (BN, ...) stay trainable is the trainer's choice.
After meta-training, ``fold_scale_shift`` turns the model back into plain convs for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SCALE_SHIFT_MODES",
    "ScaleShiftConv2d",
    "apply_scale_shift",
    "fold_scale_shift",
    "scale_shift_conv2d",
    "scale_shift_parameters",
]

SCALE_SHIFT_MODES = ("kernel", "channel")

_IntOrPair = int | tuple[int, int]


def scale_shift_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    stride: _IntOrPair,
    padding: _IntOrPair | str,
    dilation: _IntOrPair = 1,
    groups: int = 1,
) -> torch.Tensor:
    """Scaled-and-shifted convolution: ``conv2d(x, weight * scale) + (bias + shift)``.

    Args:
        x: input (B, Cin, H, W), any memory format.
        weight: frozen kernel (Cout, Cin / groups, kh, kw).
        bias: frozen bias (Cout,), or None (then the bias is just ``shift``).
        scale: (Cout, Cin / groups, 1, 1) in "kernel" mode or (Cout, 1, 1, 1) in "channel" mode.
        shift: (Cout,).
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d``.

    Returns:
        (B, Cout, H', W') output.

    Raises:
        ValueError: a scale or shift of the wrong shape.
    """
    out_chs = weight.shape[0]
    if scale.shape not in ((out_chs, weight.shape[1], 1, 1), (out_chs, 1, 1, 1)):
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not fit weight {tuple(weight.shape)}"
        )
    if shift.shape != (out_chs,):
        raise ValueError(f"shift shape {tuple(shift.shape)} must be ({out_chs},)")
    bias = shift if bias is None else bias + shift
    # Plain elementwise ops and F.conv2d: autocast casts the scaled weight like any conv weight.
    return F.conv2d(x, weight * scale, bias, stride, padding, dilation, groups)


class ScaleShiftConv2d(nn.Module):
    """A frozen conv with meta-learned scale and shift (MTL, CVPR 2019, Sec. 4.2).

    The pre-trained ``weight`` and ``bias`` are buffers, not parameters: no optimiser sees them,
    and the state_dict keys match those of the plain conv, so a pre-trained backbone's state_dict
    loads with ``strict=False`` (only ``scale`` and ``shift`` missing).

    Args:
        weight: pre-trained kernel (Cout, Cin / groups, kh, kw); copied.
        bias: pre-trained bias (Cout,) or None; copied.
        stride, padding, dilation, groups: as ``nn.Conv2d``.
        mode: "kernel" or "channel", the shape of ``scale`` (see the module docstring).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        mode: str = "kernel",
    ) -> None:
        super().__init__()
        if mode not in SCALE_SHIFT_MODES:
            raise ValueError(f"mode must be one of {SCALE_SHIFT_MODES}, got {mode!r}")
        out_chs, in_per_group, *kernel = weight.shape
        self.in_channels = in_per_group * groups
        self.out_channels = out_chs
        self.kernel_size = tuple(kernel)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.mode = mode
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        scale_shape = (out_chs, in_per_group if mode == "kernel" else 1, 1, 1)
        self.scale = nn.Parameter(torch.ones(scale_shape, dtype=weight.dtype, device=weight.device))
        self.shift = nn.Parameter(torch.zeros(out_chs, dtype=weight.dtype, device=weight.device))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode: str = "kernel") -> "ScaleShiftConv2d":
        """Wrap a (pre-trained) ``nn.Conv2d``, copying its weight, bias and geometry.

        Raises:
            ValueError: a conv with a padding_mode other than "zeros".
        """
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"only zero padding is supported, got padding_mode={conv.padding_mode!r}"
            )
        module = cls(
            conv.weight,
            conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            mode=mode,
        )
        return module.train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> (B, Cout, H', W')."""
        return scale_shift_conv2d(
            x,
            self.weight,
            self.bias,
            self.scale,
            self.shift,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def scaled_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W * scale`` and ``b + shift`` (b = 0 if None), differentiable in scale and shift."""
        return self.weight * self.scale, self.shift if self.bias is None else self.bias + self.shift

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """Plain ``nn.Conv2d``, weight ``W * scale`` and bias ``b + shift`` (b = 0 if None)."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        weight, bias = self.scaled_weight_and_bias()
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"mode={self.mode!r}"
        )


def _is_shortcut(conv: nn.Conv2d) -> bool:
    # Our backbones' convention: shortcut and downsample convs, and only they, are 1x1.
    return tuple(conv.kernel_size) == (1, 1)


def apply_scale_shift(
    model: nn.Module,
    *,
    mode: str = "kernel",
    include_shortcuts: bool = False,
) -> list[ScaleShiftConv2d]:
    """Replace, in place, the convs of ``model`` by ``ScaleShiftConv2d`` (scale 1, shift 0).

    Only convs are replaced; nothing is frozen here (BN and the rest keep ``requires_grad``), as
    which parameters meta-train is the trainer's choice. Already wrapped convs are left alone.

    Args:
        model: a network holding ``nn.Conv2d`` sub-modules (not itself a conv).
        mode: "kernel" (default, both reference codes) or "channel", the shape of the scales.
        include_shortcuts: also wrap the 1x1 shortcut/downsample convs (the PyTorch port's choice);
            default False, the TF code's choice: only the non-1x1 (3x3) convs.

    Returns:
        The new modules, in module order.
    """
    if mode not in SCALE_SHIFT_MODES:
        raise ValueError(f"mode must be one of {SCALE_SHIFT_MODES}, got {mode!r}")
    if isinstance(model, nn.Conv2d):
        raise ValueError("cannot replace the root module in place; use ScaleShiftConv2d.from_conv")
    # Keyed by id, so a conv shared by two parents is wrapped once.
    wrapped: dict[int, ScaleShiftConv2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and (include_shortcuts or not _is_shortcut(child)):
                if id(child) not in wrapped:
                    wrapped[id(child)] = ScaleShiftConv2d.from_conv(child, mode=mode)
                setattr(parent, name, wrapped[id(child)])
    return list(wrapped.values())


def fold_scale_shift(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``ScaleShiftConv2d`` by its folded plain ``nn.Conv2d``.

    Returns:
        ``model`` (or the folded conv if ``model`` itself is a ``ScaleShiftConv2d``).
    """
    if isinstance(model, ScaleShiftConv2d):
        return model.fold()
    folded: dict[int, nn.Conv2d] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ScaleShiftConv2d):
                if id(child) not in folded:
                    folded[id(child)] = child.fold()
                setattr(parent, name, folded[id(child)])
    return model


def scale_shift_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``scale`` and ``shift`` parameters of every ``ScaleShiftConv2d`` in ``model``."""
    modules = [m for m in model.modules() if isinstance(m, ScaleShiftConv2d)]
    return [p for m in modules for p in (m.scale, m.shift)]
