"""Tests for metatransfer.models.backbones: every registered backbone is enrolled (as timm)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from metatransfer.models.backbones import (
    BACKBONES,
    DropBlock2d,
    create_backbone,
    list_backbones,
    register_backbone,
)

ALL_BACKBONES = list_backbones()


def _build(name: str, **kwargs: float) -> nn.Module:
    torch.manual_seed(0)
    return create_backbone(name, **kwargs)


def test_registry_lists_the_four_backbones() -> None:
    assert ALL_BACKBONES == ["conv4", "resnet12", "resnet12_wide", "resnet25"]
    assert list_backbones("resnet12*") == ["resnet12", "resnet12_wide"]
    assert list_backbones("nothing*") == []


def test_unknown_backbone_raises_value_error_listing_known_names() -> None:
    with pytest.raises(ValueError, match="resnet12, resnet12_wide"):
        create_backbone("resnet13")


def test_registering_a_name_twice_warns() -> None:
    original = BACKBONES["conv4"]
    try:
        with pytest.warns(UserWarning, match="registered twice"):
            register_backbone(original)
    finally:
        BACKBONES["conv4"] = original


@pytest.mark.parametrize("kwargs", [{"width": 0.0}, {"in_chans": 0}, {"drop_rate": 1.0}])
def test_invalid_arguments_raise_value_error(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        create_backbone("conv4", **kwargs)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_constructor_arguments_are_keyword_only(name: str) -> None:
    with pytest.raises(TypeError):
        BACKBONES[name](3)


@pytest.mark.parametrize("name", ALL_BACKBONES)
@pytest.mark.parametrize("size", [28, 32, 84])
def test_forward_gives_finite_features_of_out_features(name: str, size: int) -> None:
    model = _build(name).eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, size, size))
    assert features.shape == (2, model.out_features)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_one_channel_input(name: str) -> None:
    model = _build(name, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, model.out_features)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = _build(name, drop_rate=0.1).train()
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_half_width_halves_out_features(name: str) -> None:
    full, half = _build(name), _build(name, width=0.5).eval()
    assert half.out_features == full.out_features // 2
    with torch.no_grad():
        assert half(torch.randn(2, 3, 28, 28)).shape == (2, half.out_features)


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_channels_last_bf16_autocast_forward(name: str) -> None:
    model = _build(name).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = model(x)
    assert features.shape == (2, model.out_features)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_dropout_acts_only_in_training(name: str) -> None:
    model = _build(name, drop_rate=0.5)
    x = torch.randn(2, 3, 28, 28)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.drop.train()  # dropout only: BN batch statistics would differ from running ones too
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("conv4", 0.11e6, 0.12e6),  # 113,088
        ("resnet12", 7.9e6, 8.1e6),  # 7,998,720
        ("resnet12_wide", 12.3e6, 12.5e6),  # 12,426,688
        ("resnet25", 36.5e6, 36.7e6),  # 36,579,360: the PyTorch port's 36.6M
    ],
)
def test_parameter_count(name: str, low: float, high: float) -> None:
    count = sum(p.numel() for p in create_backbone(name).parameters())
    assert low < count < high


@pytest.mark.parametrize(
    ("name", "n_3x3", "n_1x1"),
    [("conv4", 4, 0), ("resnet12", 12, 4), ("resnet12_wide", 12, 4), ("resnet25", 25, 3)],
)
def test_conv_layout(name: str, n_3x3: int, n_1x1: int) -> None:
    # Scale-shift relies on this: shortcuts/downsamples are 1x1, every other conv is 3x3.
    kernels = [m.kernel_size for m in create_backbone(name).modules() if isinstance(m, nn.Conv2d)]
    assert kernels.count((3, 3)) == n_3x3
    assert kernels.count((1, 1)) == n_1x1
    assert len(kernels) == n_3x3 + n_1x1


def test_no_warnings_on_build_and_forward() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backbone = create_backbone("resnet12", width=0.25).eval()
        with torch.no_grad():
            features = backbone(torch.zeros(2, 3, 32, 32))
    assert [str(warning.message) for warning in caught] == []
    assert features.shape == (2, backbone.out_features)


def test_drop_block_drops_squares_at_about_its_rate_and_keeps_the_mean() -> None:
    """In training: the zeros form 2x2 squares, about `rate` of the positions (overlapping squares
    make it a little more at the centre, less at the edges), and the kept values are scaled up so
    the mean is kept; in eval mode it is the identity."""
    torch.manual_seed(0)
    drop = DropBlock2d(0.1, 2)
    x = torch.rand(32, 64, 8, 8) + 1.0  # no zeros of its own
    out = drop(x)
    dropped = out == 0
    assert 0.07 < dropped.float().mean().item() < 0.14
    # every dropped position lies in a fully dropped 2x2 square: the morphological opening of the
    # dropped set by a 2x2 square (erode to the squares' corners, dilate back) is the set itself
    corners = 1.0 - nn.functional.max_pool2d(1.0 - dropped.float(), 2, stride=1)
    opened = nn.functional.max_pool2d(nn.functional.pad(corners, (1, 1, 1, 1)), 2, stride=1)
    assert torch.equal(opened, dropped.float())
    share_kept = 1.0 - dropped.float().mean().item()
    ratio = out[~dropped] / x[~dropped]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1.0 / share_kept))
    drop.eval()
    assert drop(x) is x
    # where few blocks fit, the paper's correction of the seed rate keeps the dropped share at
    # `rate`: blocks of 5 on 5x5 maps (one place to start) drop about 10%, not rate / 25
    big_blocks = DropBlock2d(0.1, 5)(torch.rand(64, 64, 5, 5) + 1.0)
    assert 0.08 < (big_blocks == 0).float().mean().item() < 0.12


def test_drop_block_follows_the_last_two_resnet12_blocks_only_and_changes_no_checkpoint_key() -> None:
    plain = _build("resnet12", width=0.25)
    model = _build("resnet12", width=0.25, drop_block_rate=0.1, drop_block_size=2)
    rates = [getattr(block.drop_block, "rate", 0.0) for block in model.features]
    assert rates == [0.0, 0.0, 0.1, 0.1]
    assert plain.state_dict().keys() == model.state_dict().keys()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    with pytest.raises(TypeError):
        _build("conv4", drop_block_rate=0.1)
    with pytest.raises(ValueError, match="rate"):
        DropBlock2d(1.0, 2)
