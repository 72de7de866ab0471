"""Test-time views: shifted copies of an image (the averaging itself is tested with evaluate_split)."""

from __future__ import annotations

import torch

from metatransfer.views import shifted


def test_shifted_moves_the_picture_and_pads_with_zeros():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    right, up = shifted(x, 1, 0)[0, 0], shifted(x, 0, -1)[0, 0]
    torch.testing.assert_close(right[:, 1:], x[0, 0, :, :3])
    assert right[:, 0].eq(0).all()
    torch.testing.assert_close(up[:3], x[0, 0, 1:])
    assert up[3].eq(0).all()
    assert shifted(x, 0, 0) is x
