"""Tests for metatransfer.models.scale_shift, on single convs and on every registered backbone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metatransfer.models.backbones import create_backbone, list_backbones
from metatransfer.models.scale_shift import (
    ScaleShiftConv2d,
    apply_scale_shift,
    fold_scale_shift,
    scale_shift_conv2d,
    scale_shift_parameters,
)

ALL_BACKBONES = list_backbones()


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(name).eval()


def _randomise_scale_shift(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ScaleShiftConv2d):
                module.scale.copy_(1 + 0.1 * torch.randn(module.scale.shape, generator=generator))
                module.shift.copy_(0.1 * torch.randn(module.shift.shape, generator=generator))


# --- the pure function and the module -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kernel", "channel"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 1, 1), (2, 0, 1), (1, 1, 2)])
def test_pure_function_matches_conv2d_with_scaled_weights(
    mode: str, with_bias: bool, stride: int, padding: int, groups: int
) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9)
    weight = torch.randn(6, 4 // groups, 3, 3)
    bias = torch.randn(6) if with_bias else None
    scale = torch.randn(6, 4 // groups if mode == "kernel" else 1, 1, 1)
    shift = torch.randn(6)
    out = scale_shift_conv2d(
        x, weight, bias, scale, shift, stride=stride, padding=padding, groups=groups
    )
    manual_weight = weight * scale.expand_as(weight)
    manual_bias = shift if bias is None else bias + shift
    expected = F.conv2d(
        x, manual_weight, manual_bias, stride=stride, padding=padding, groups=groups
    )
    torch.testing.assert_close(out, expected)


def test_pure_function_rejects_mismatched_shapes() -> None:
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)
    scale, shift = torch.ones(6, 4, 1, 1), torch.zeros(6)
    with pytest.raises(ValueError, match="scale"):
        scale_shift_conv2d(x, weight, None, scale[:1], shift, stride=1, padding=1)
    with pytest.raises(ValueError, match="shift"):
        scale_shift_conv2d(x, weight, None, scale, shift[:4], stride=1, padding=1)


def test_pure_function_under_bf16_autocast_and_channels_last() -> None:
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    weight, shift = torch.randn(6, 4, 3, 3), torch.zeros(6)
    scale = torch.ones(6, 4, 1, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scale_shift_conv2d(x, weight, None, scale, shift, stride=1, padding=1)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert scale.grad is not None and scale.grad.dtype == torch.float32


def test_module_keeps_frozen_weights_as_buffers() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ss = ScaleShiftConv2d.from_conv(conv)
    assert [name for name, _ in ss.named_parameters()] == ["scale", "shift"]
    assert {name for name, _ in ss.named_buffers()} == {"weight", "bias"}
    assert set(ss.state_dict()) == {"weight", "bias", "scale", "shift"}
    assert ss.scale.shape == (6, 4, 1, 1) and torch.all(ss.scale == 1)
    assert ss.shift.shape == (6,) and torch.all(ss.shift == 0)
    torch.testing.assert_close(ss.weight, conv.weight.detach())
    assert ss.weight.data_ptr() != conv.weight.data_ptr()  # a copy, not a view


def test_module_channel_mode_shapes() -> None:
    ss = ScaleShiftConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, bias=False), mode="channel")
    assert ss.scale.shape == (6, 1, 1, 1)
    assert ss.shift.shape == (6,)
    assert ss.bias is None
    assert ss(torch.randn(2, 4, 9, 9)).shape == (2, 6, 4, 4)


def test_fold_creates_a_bias_when_the_source_had_none() -> None:
    torch.manual_seed(0)
    ss = ScaleShiftConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, bias=False))
    _randomise_scale_shift(ss)
    folded = ss.fold()
    assert type(folded) is nn.Conv2d and folded.bias is not None
    torch.testing.assert_close(folded.bias, ss.shift.detach())
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(folded(x), ss(x))


def test_invalid_mode_and_padding_mode_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        ScaleShiftConv2d.from_conv(nn.Conv2d(4, 6, 3), mode="row")
    with pytest.raises(ValueError, match="padding_mode"):
        ScaleShiftConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="mode"):
        apply_scale_shift(nn.Sequential(nn.Conv2d(4, 6, 3)), mode="row")


# --- on every backbone ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_scale_shift_at_init_equals_the_plain_model_exactly(name: str) -> None:
    model = _build(name)
    ss_model = copy.deepcopy(model)
    apply_scale_shift(ss_model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ss_model(x), model(x))


@pytest.mark.parametrize("name", ALL_BACKBONES)
@pytest.mark.parametrize("include_shortcuts", [False, True])
def test_folding_gives_the_scale_shift_features(name: str, include_shortcuts: bool) -> None:
    model = _build(name)
    apply_scale_shift(model, include_shortcuts=include_shortcuts)
    _randomise_scale_shift(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        folded = fold_scale_shift(model)
        assert not any(isinstance(m, ScaleShiftConv2d) for m in folded.modules())
        assert (folded(x) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_only_3x3_convs_are_wrapped_by_default(name: str) -> None:
    model = _build(name)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    wrapped = apply_scale_shift(model)
    assert wrapped and all(m.kernel_size == (3, 3) for m in wrapped)
    remaining = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.kernel_size == (1, 1) for m in remaining)
    assert len(wrapped) + len(remaining) == n_convs
    assert apply_scale_shift(model) == []  # idempotent


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_include_shortcuts_wraps_every_conv(name: str) -> None:
    model = _build(name)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    wrapped = apply_scale_shift(model, include_shortcuts=True)
    assert len(wrapped) == n_convs
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_channel_mode_shapes_on_a_backbone(name: str) -> None:
    model = _build(name)
    for module in apply_scale_shift(model, mode="channel"):
        assert module.scale.shape == (module.out_channels, 1, 1, 1)
        assert module.shift.shape == (module.out_channels,)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 28, 28)).shape == (2, model.out_features)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_trainable_parameters_after_freezing_the_rest_are_the_ss_parameters(name: str) -> None:
    model = _build(name)
    plain_state = copy.deepcopy(model.state_dict())
    apply_scale_shift(model, include_shortcuts=True)
    ss_params = scale_shift_parameters(model)
    # Conv weights became buffers: freezing BN is all a trainer has left to do.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in ss_params}
    assert len(trainable) == len(ss_params)
    # A pre-trained plain state_dict loads into the SS model; only scale and shift are missing.
    missing, unexpected = model.load_state_dict(plain_state, strict=False)
    assert unexpected == []
    assert missing and all(key.endswith((".scale", ".shift")) for key in missing)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_scale_shift_model_channels_last_bf16_autocast_and_backward(name: str) -> None:
    model = _build(name).train()
    apply_scale_shift(model)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model(x)
    assert features.shape == (2, model.out_features)
    assert torch.isfinite(features).all()
    features.float().square().mean().backward()
    for param in scale_shift_parameters(model):
        assert param.grad is not None and torch.isfinite(param.grad).all()
