"""What every training phase starts from: checked settings, the device, seeded RNGs, train and val splits."""

from __future__ import annotations

import torch

from metatransfer.config import Config, check_config
from metatransfer.data.cache import ImageSplit
from metatransfer.run import resolve_device, seed_everything
from metatransfer.splits import load_run_split

__all__ = ["start_phase"]


def start_phase(config: Config) -> tuple[torch.device, ImageSplit, ImageSplit]:
    """Device, seeded RNGs, and the train and val splits that every training phase starts from;
    settings that do not work together are refused first (`config.check_config`)."""
    check_config(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    return device, load_run_split(config, "train"), load_run_split(config, "val")
