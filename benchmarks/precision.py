"""How much bf16 + channels_last buys on this machine, per conv layer and per resnet12 forward.

Every speed ratio of `speed.py` is bounded by these numbers: both sides spend nearly all their time
in the backbone, and ours differs per image only by its precision and memory format. Random
inputs; nothing is read from disk.

    .venv/bin/python benchmarks/precision.py --threads 1 --image-size 32
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from metatransfer.models.backbones import create_backbone
from metatransfer.models.fuse import inference_copy


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return min(times)


def conv_layers(size: int, batch: int) -> None:
    """The four 3x3 conv shapes of resnet12 at their feature-map sizes, forward and backward."""
    print(f"3x3 conv, batch {batch}, channels_last: ms fp32 / bf16 (ratio)")
    for channels, side in ((64, size), (128, size // 2), (256, size // 4), (512, size // 8)):
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(batch, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(channels, channels, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            grad = torch.randn_like(F.conv2d(x, w, padding=1))
            forward = best_seconds(lambda: F.conv2d(x, w, padding=1))
            backward = best_seconds(lambda: torch.ops.aten.convolution_backward(
                grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]))
            cells.append((forward, backward))
        (f32_fwd, f32_bwd), (bf_fwd, bf_bwd) = cells
        print(f"  {channels:3d} ch at {side:2d} px: forward {f32_fwd * 1e3:6.1f} / {bf_fwd * 1e3:6.1f} ({f32_fwd / bf_fwd:.1f}x), "
              f"backward {f32_bwd * 1e3:6.1f} / {bf_bwd * 1e3:6.1f} ({f32_bwd / bf_bwd:.1f}x)")


def whole_forward(size: int) -> None:
    """The port's way (fp32 module, batch 100) against ours (BN folded, bf16 autocast, batch 256)."""
    torch.manual_seed(0)
    backbone = create_backbone("resnet12", in_chans=3).eval()
    folded = inference_copy(backbone).to(memory_format=torch.channels_last)
    x100, x256 = torch.randn(100, 3, size, size), torch.randn(256, 3, size, size).contiguous(memory_format=torch.channels_last)

    def ours() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return folded(x256)

    with torch.no_grad():
        fp32 = 100 / best_seconds(lambda: backbone(x100), repeats=3)
        bf16 = 256 / best_seconds(ours, repeats=3)
    print(f"resnet12 forward at {size} px: fp32 {fp32:.1f} images/s, ours {bf16:.1f} images/s ({bf16 / fp32:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=150, help="conv layer batch (a T=2 meta-batch's queries)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    conv_layers(args.image_size, args.batch)
    whole_forward(args.image_size)


if __name__ == "__main__":
    main()
