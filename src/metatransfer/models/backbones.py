"""Feature-extractor backbones for few-shot learning, and their registry.

Every backbone maps images (B, C, H, W) to features (B, out_features): a stack of plain
``nn.Conv2d`` / ``nn.BatchNorm2d`` layers, then a global average pool (adaptive, so 28x28
Omniglot, 32x32 CIFAR and 84x84 miniImageNet inputs all work), then dropout.

Backbones:
    conv4: the usual few-shot Conv-4 (Vinyals et al. 2016; Snell et al. 2017).
    resnet12, resnet12_wide: the ResNet-12 of the MTL paper's TensorFlow code (Sun et al.,
        CVPR 2019), and the same with the 64-160-320-640 widths common in later work.
    resnet25: the "ResNet-25" of the MTL PyTorch port (``resnet_mtl.py``): 36.6M parameters.

The ResNet-12s also take ``drop_block_rate``: DropBlock (Ghiasi et al., NeurIPS 2018) after their
last two blocks, as in MetaOptNet and RFS, a regulariser of pre-training (no parameters, so
checkpoints are the same with and without it).

Convention the scale-shift code relies on (``scale_shift.apply_scale_shift``): shortcut and
downsample convs, and only they, have a 1x1 kernel; every other conv is 3x3.

Deviation from the TF reference: its BN has no gamma and a beta frozen at 0, and always uses batch
statistics; here BN is a standard ``nn.BatchNorm2d`` and how it is trained is the trainer's choice.
"""

from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "BACKBONES",
    "Backbone",
    "BasicBlock",
    "ConvBlock",
    "DropBlock2d",
    "ResNet12Block",
    "conv4",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "resnet12",
    "resnet12_wide",
    "resnet25",
]

BACKBONES: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(fn: Callable[..., "Backbone"]) -> Callable[..., "Backbone"]:
    """Register a backbone constructor under its function name (as timm's ``register_model``).

    Args:
        fn: a constructor taking keyword-only ``in_chans``, ``width`` and ``drop_rate``.

    Returns:
        ``fn`` unchanged. Registering a name twice warns and keeps the newer constructor.
    """
    name = fn.__name__
    if name in BACKBONES:
        warnings.warn(f"backbone {name!r} is registered twice; the newer one wins", stacklevel=2)
    BACKBONES[name] = fn
    return fn


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted names of the registered backbones that match a shell-style wildcard pattern."""
    return sorted(fnmatch.filter(BACKBONES, pattern))


def create_backbone(
    name: str,
    *,
    in_chans: int = 3,
    width: float = 1.0,
    drop_rate: float = 0.0,
    **kwargs: float,
) -> "Backbone":
    """Build a registered backbone.

    Args:
        name: a name from ``list_backbones()``.
        in_chans: number of input image channels (1 for Omniglot, 3 for RGB).
        width: multiplier applied to every channel count (0.5 halves ``out_features``).
        drop_rate: dropout probability on the final features, active in training only.
        **kwargs: options of one family, passed to its constructor (as timm's ``create_model``):
            ``drop_block_rate`` and ``drop_block_size`` for the ResNet-12s.

    Returns:
        The backbone, mapping (B, in_chans, H, W) images to (B, out_features) features.

    Raises:
        ValueError: unknown name, or an invalid argument.
    """
    if name not in BACKBONES:
        known = ", ".join(list_backbones())
        raise ValueError(f"unknown backbone {name!r}; known backbones: {known}")
    return BACKBONES[name](in_chans=in_chans, width=width, drop_rate=drop_rate, **kwargs)


# --- blocks: one per architecture family ---------------------------------------------------------


class ConvBlock(nn.Sequential):
    """Conv-4 block: 3x3 conv (bias), BN, ReLU, 2x2 max-pool; halves the spatial size."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


class DropBlock2d(nn.Module):
    """DropBlock (Ghiasi et al. 2018): in training, zero random ``block_size`` squares of each
    channel's map, about ``rate`` of its positions in all, and rescale the rest to keep the mean.

    Dropout on a conv map is weak (a neighbour carries the same information); dropping contiguous
    blocks makes the next layers use more of the map. The square shrinks to fit small maps, so on
    a 2x2 map with ``block_size`` 2 it drops whole channels. Identity in eval mode.
    """

    def __init__(self, rate: float, block_size: int) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0 or block_size < 1:
            raise ValueError(f"DropBlock needs a rate in [0, 1) and a block size >= 1, got {rate} and {block_size}")
        self.rate = rate
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        height, width = x.shape[-2:]
        size = min(self.block_size, height, width)
        # Seeds where a block may start; gamma makes the expected dropped share `rate` (paper, eq. 1).
        valid = (height - size + 1) * (width - size + 1)
        gamma = self.rate * height * width / (size * size * valid)
        seeds = torch.rand(*x.shape[:2], height - size + 1, width - size + 1, device=x.device) < gamma
        padded = nn.functional.pad(seeds.float(), (size - 1, size - 1, size - 1, size - 1))
        keep = 1.0 - nn.functional.max_pool2d(padded, size, stride=1)  # each seed covers its size x size block
        return (x.float() * keep * (keep.numel() / keep.sum().clamp(min=1.0))).to(x.dtype)  # scale in fp32, not bf16

    def extra_repr(self) -> str:
        return f"rate={self.rate}, block_size={self.block_size}"


class ResNet12Block(nn.Module):
    """ResNet-12 block of the MTL TF code: three [3x3 conv (bias), BN, LeakyReLU 0.1].

    The last LeakyReLU comes after the residual add; the shortcut is a 1x1 conv with bias and no
    BN; a 2x2 max-pool ends the block, halving the spatial size, then an optional DropBlock.
    """

    def __init__(self, in_chs: int, out_chs: int, drop_block_rate: float = 0.0, drop_block_size: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.conv3 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1, bias=True)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.shortcut = nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=True)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)
        self.drop_block = DropBlock2d(drop_block_rate, drop_block_size) if drop_block_rate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.act(out + self.shortcut(x))
        return self.drop_block(self.pool(out))


class BasicBlock(nn.Module):
    """ResNet BasicBlock (He et al. 2016) as in the MTL PyTorch port: two 3x3 convs without bias.

    When ``stride`` > 1 or the width changes, the shortcut is a 1x1 conv (no bias) + BN.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + shortcut)


# --- the backbone shell ---------------------------------------------------------------------------


class Backbone(nn.Module):
    """Feature extractor: ``features`` (a conv stack), global average pool, dropout.

    Args:
        features: maps (B, C, H, W) images to a (B, out_features, h, w) map.
        out_features: channels of that map, the feature size D.
        drop_rate: dropout probability on the pooled features (training only).
    """

    def __init__(self, features: nn.Sequential, out_features: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.features = features
        self.out_features = out_features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # Kaiming-normal convs and unit BN, as the MTL PyTorch port (resnet_mtl.py).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, out_features, h, w) feature map, before pooling."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, out_features) pooled features."""
        return self.drop(self.pool(self.forward_features(x)).flatten(1))


# --- private builders -----------------------------------------------------------------------------


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _check_args(in_chans: int, width: float, drop_rate: float) -> None:
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")


def _conv4(*, widths: Sequence[int], in_chans: int, width: float, drop_rate: float) -> Backbone:
    """Stack of ``ConvBlock``s; needs inputs of at least 16x16."""
    _check_args(in_chans, width, drop_rate)
    blocks, in_chs = [], in_chans
    for chs in widths:
        blocks.append(ConvBlock(in_chs, _scaled(chs, width)))
        in_chs = _scaled(chs, width)
    return Backbone(nn.Sequential(*blocks), in_chs, drop_rate)


def _resnet12(
    *, widths: Sequence[int], in_chans: int, width: float, drop_rate: float, drop_block_rate: float, drop_block_size: int
) -> Backbone:
    """Stack of ``ResNet12Block``s; needs inputs of at least 2**len(widths) pixels a side.
    DropBlock, if on, follows the last two blocks (MetaOptNet's and RFS's placement)."""
    _check_args(in_chans, width, drop_rate)
    blocks, in_chs = [], in_chans
    for index, chs in enumerate(widths):
        rate = drop_block_rate if index >= len(widths) - 2 else 0.0
        blocks.append(ResNet12Block(in_chs, _scaled(chs, width), rate, drop_block_size))
        in_chs = _scaled(chs, width)
    return Backbone(nn.Sequential(*blocks), in_chs, drop_rate)


def _resnet(
    *,
    stem_width: int,
    widths: Sequence[int],
    depths: Sequence[int],
    in_chans: int,
    width: float,
    drop_rate: float,
) -> Backbone:
    """3x3 stem conv (bias) + BN + ReLU, then stages of ``BasicBlock``s opening at stride 2."""
    _check_args(in_chans, width, drop_rate)
    in_chs = _scaled(stem_width, width)
    layers: list[nn.Module] = [
        nn.Conv2d(in_chans, in_chs, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(in_chs),
        nn.ReLU(inplace=True),
    ]
    for chs, depth in zip(widths, depths, strict=True):
        out_chs = _scaled(chs, width)
        stage = [BasicBlock(in_chs, out_chs, stride=2)]
        stage += [BasicBlock(out_chs, out_chs) for _ in range(depth - 1)]
        layers.append(nn.Sequential(*stage))
        in_chs = out_chs
    return Backbone(nn.Sequential(*layers), in_chs, drop_rate)


# --- registered constructors: hyper-parameters only -----------------------------------------------


@register_backbone
def conv4(*, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.0) -> Backbone:
    """Conv-4: 4 x [3x3 conv 64, BN, ReLU, 2x2 max-pool]; 64-d features (1600-d maps unpooled)."""
    return _conv4(widths=(64, 64, 64, 64), in_chans=in_chans, width=width, drop_rate=drop_rate)


@register_backbone
def resnet12(
    *, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.0, drop_block_rate: float = 0.0, drop_block_size: int = 2
) -> Backbone:
    """ResNet-12 of the MTL paper's TF code, widths 64-128-256-512; 512-d features, ~8.0M params."""
    return _resnet12(
        widths=(64, 128, 256, 512), in_chans=in_chans, width=width, drop_rate=drop_rate,
        drop_block_rate=drop_block_rate, drop_block_size=drop_block_size,
    )


@register_backbone
def resnet12_wide(
    *, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.0, drop_block_rate: float = 0.0, drop_block_size: int = 2
) -> Backbone:
    """ResNet-12 with widths 64-160-320-640 (MetaOptNet and later); 640-d, ~12.4M params."""
    return _resnet12(
        widths=(64, 160, 320, 640), in_chans=in_chans, width=width, drop_rate=drop_rate,
        drop_block_rate=drop_block_rate, drop_block_size=drop_block_size,
    )


@register_backbone
def resnet25(*, in_chans: int = 3, width: float = 1.0, drop_rate: float = 0.0) -> Backbone:
    """The "ResNet-25" of the MTL PyTorch port: stem 80, 3 x 4 BasicBlocks 160-320-640; 640-d."""
    return _resnet(
        stem_width=80,
        widths=(160, 320, 640),
        depths=(4, 4, 4),
        in_chans=in_chans,
        width=width,
        drop_rate=drop_rate,
    )
