import pytest
import torch
import torch.nn as nn

from metatransfer.models import apply_scale_shift, create_backbone, list_backbones
from metatransfer.models.fuse import fuse_batch_norm, inference_copy


def _randomise(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
            module.bias.data.normal_(0, 0.2, generator=generator)
    for parameter in model.parameters():
        if parameter.dim() == 4 and parameter.shape[-1] == 1:  # SS scales
            parameter.data.uniform_(0.8, 1.2, generator=generator)


@pytest.mark.parametrize("name", list_backbones())
def test_folding_batch_norm_keeps_the_features(name):
    model = create_backbone(name, width=0.25).eval()
    apply_scale_shift(model)
    _randomise(model)
    x = torch.randn(3, 3, 32, 32)
    plain = inference_copy(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    with torch.no_grad():
        expected = model(x)
        # Relative: random deep nets have large activations, and fp32 keeps ~7 digits.
        assert ((plain(x) - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert any(p.requires_grad for p in model.parameters())  # the original is untouched


def test_batch_norm_not_after_a_conv_is_left_alone():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval()
    fuse_batch_norm(model)
    assert isinstance(model[1], nn.BatchNorm2d)
