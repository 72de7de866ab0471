"""What folding frozen BN into its conv saves a meta-iteration: the same meta-iteration with and without it.

Why: with `model.bn_mode=frozen` each BN is a per-channel affine map, yet run as its own layer it
reads and writes every activation twice more (forward and backward); at 84 px that was a sixth of a
meta-iteration. `meta_batch_loss` now runs the backbone through `models.fuse.folded_view`, which
folds each BN into its conv at every call, so gradients still reach SS (or FT's convs).

How: `e3bm_cost.meta_iteration` (one backbone with SS, one random meta-batch, `meta_batch_loss`,
backward, Adam) with the fold as shipped, and with `folded_view` replaced by the identity (the
backbone as it is: conv, then BN). The two alternate (A-B-A-B...) after a warm-up of each; the median
of each is reported with their ratio.

    .venv/bin/python benchmarks/fold_cost.py --width 0.5 --image-size 84 --logits cosine   # at miniimagenet-cpu's size

The last line is the headline: `folded / unfolded meta-iteration: R.RRx (...)`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark, however this script is run
from e3bm_cost import meta_iteration, meta_iteration_setup, setting_of, time_alternately  # noqa: E402
from metatransfer.phases import meta_train  # noqa: E402


def main() -> None:
    args, config, episode, device = meta_iteration_setup(__doc__.split("\n\n")[0])
    step = meta_iteration(config, args, episode, device)
    shipped = meta_train.folded_view

    def with_fold(fold: Callable[[nn.Module], nn.Module]) -> Callable[[], None]:
        def run() -> None:
            meta_train.folded_view = fold
            try:
                step()
            finally:
                meta_train.folded_view = shipped
        return run

    median = time_alternately({"folded": with_fold(shipped), "unfolded": with_fold(lambda backbone: backbone)}, args.repeats)
    print(f"folded / unfolded meta-iteration: {median['folded'] / median['unfolded']:.2f}x ({setting_of(args, device)})")


if __name__ == "__main__":
    main()
