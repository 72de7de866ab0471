"""Batched augmentation: normalisation, crops and flips, seeding, shapes and memory format."""

from __future__ import annotations

import pytest
import torch

from metatransfer.data.augment import (
    augment_batch,
    color_jitter,
    hflip,
    random_crop_flip,
    random_resized_crop_flip,
    to_float,
)


def _batch(b: int = 6, c: int = 3, h: int = 8, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float_normalises_per_channel_and_moves_channels_first():
    images = torch.zeros(2, 3, 4, 5, 3, dtype=torch.uint8)  # (T, M, H, W, C)
    images[..., 0], images[..., 1], images[..., 2] = 255, 51, 0
    x = to_float(images, mean=(0.5, 0.2, 0.1), std=(0.5, 0.1, 0.2))
    assert x.shape == (6, 3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(1.0))  # (1 - 0.5) / 0.5
    assert torch.allclose(x[:, 1], torch.tensor(0.0), atol=1e-6)  # (0.2 - 0.2) / 0.1
    assert torch.allclose(x[:, 2], torch.tensor(-0.5))  # (0 - 0.1) / 0.2


def test_to_float_keeps_pixel_positions():
    images = torch.randint(0, 256, (2, 4, 5, 1), dtype=torch.uint8, generator=_gen())
    x = to_float(images, mean=(0.0,), std=(1.0,))
    assert torch.allclose(x[:, 0], images[..., 0].float() / 255)


def test_to_float_channels_last_is_the_same_values():
    images = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8, generator=_gen())
    plain = to_float(images, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    last = to_float(images, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous()
    assert torch.equal(plain, last)


def test_hflip_reverses_the_width_axis():
    x = _batch()
    assert torch.equal(hflip(x)[..., 0], x[..., -1])
    assert torch.equal(hflip(hflip(x)), x)


def test_crop_with_no_padding_and_no_flip_is_identity():
    x = _batch()
    assert torch.equal(random_crop_flip(x, padding=0, flip=False, generator=_gen()), x)


def test_crop_keeps_shape_and_content_is_a_shifted_window():
    x = _batch(b=16)
    padding = 2
    out = random_crop_flip(x, padding=padding, flip=False, generator=_gen(1))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    shifts = set()
    for b in range(len(x)):
        windows = [
            (top, left)
            for top in range(2 * padding + 1)
            for left in range(2 * padding + 1)
            if torch.equal(out[b], padded[b, :, top : top + x.shape[2], left : left + x.shape[3]])
        ]
        assert windows, f"image {b} is not a crop of its padded self"
        shifts.add(windows[0])
    assert len(shifts) > 1  # the crop position is random


def test_flip_only_flips_about_half_and_each_exactly():
    x = _batch(b=64)
    out = random_crop_flip(x, padding=0, flip=True, generator=_gen(2))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(len(x))]
    same = [torch.equal(out[b], x[b]) for b in range(len(x))]
    assert all(f or s for f, s in zip(flipped, same))
    assert 10 < sum(flipped) < 54


def test_same_generator_seed_same_output_other_seed_differs():
    x = _batch(b=16)
    a = random_crop_flip(x, padding=3, flip=True, generator=_gen(5))
    b = random_crop_flip(x, padding=3, flip=True, generator=_gen(5))
    c = random_crop_flip(x, padding=3, flip=True, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_preserves_channels_last():
    x = _batch().contiguous(memory_format=torch.channels_last)
    out = random_crop_flip(x, padding=2, flip=True, generator=_gen())
    assert out.is_contiguous(memory_format=torch.channels_last)
    reference = random_crop_flip(x.contiguous(), padding=2, flip=True, generator=_gen())
    assert torch.equal(out, reference)


@pytest.mark.parametrize("flip", [False, True])
def test_resized_crop_keeps_shape_and_is_seeded(flip):
    x = _batch(b=5, h=12, w=12)
    a = random_resized_crop_flip(x, flip=flip, generator=_gen(3))
    b = random_resized_crop_flip(x, flip=flip, generator=_gen(3))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.allclose(a, x)


def test_resized_crop_of_the_whole_image_is_identity():
    x = _batch(b=4, h=8, w=8)
    out = random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, generator=_gen())
    assert torch.allclose(out, x, atol=1e-5)


def test_color_jitter_zero_strength_is_identity_and_keeps_shape():
    x = _batch()
    assert torch.allclose(color_jitter(x, strength=0.0, generator=_gen()), x, atol=1e-6)
    out = color_jitter(x, strength=0.4, generator=_gen())
    assert out.shape == x.shape and not torch.allclose(out, x)


def test_augment_batch_dispatch():
    x = _batch()
    assert torch.equal(augment_batch(x, kind="none", padding=4, flip=True, jitter=0.0, generator=_gen()), x)
    assert torch.equal(
        augment_batch(x, kind="crop_flip", padding=2, flip=True, jitter=0.0, generator=_gen(4)),
        random_crop_flip(x, padding=2, flip=True, generator=_gen(4)),
    )
    assert augment_batch(x, kind="resized_crop_flip", padding=0, flip=True, jitter=0.2, generator=_gen()).shape == x.shape
    with pytest.raises(ValueError, match="mixup"):
        augment_batch(x, kind="mixup", padding=0, flip=True, jitter=0.0, generator=_gen())
