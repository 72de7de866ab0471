"""Backbones (a registry of feature extractors) and the scale-shift (SS) operation of MTL."""

from metatransfer.models.backbones import (
    BACKBONES,
    Backbone,
    create_backbone,
    list_backbones,
    register_backbone,
)
from metatransfer.models.scale_shift import (
    ScaleShiftConv2d,
    apply_scale_shift,
    fold_scale_shift,
    scale_shift_conv2d,
    scale_shift_parameters,
)

__all__ = [
    "BACKBONES",
    "Backbone",
    "ScaleShiftConv2d",
    "apply_scale_shift",
    "create_backbone",
    "fold_scale_shift",
    "list_backbones",
    "register_backbone",
    "scale_shift_conv2d",
    "scale_shift_parameters",
]
