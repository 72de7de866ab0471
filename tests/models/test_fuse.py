import pytest
import torch
import torch.nn as nn

from metatransfer.models import apply_scale_shift, create_backbone, list_backbones
from metatransfer.models.fuse import FoldedConvBN, folded_view, fuse_batch_norm, inference_copy


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


def _gradients(model: nn.Module, x: torch.Tensor, parameters: list[nn.Parameter]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    features = model(x)
    loss = (features * torch.linspace(-1, 1, features.shape[1])).sum()  # not a plain sum: its gradient would be too uniform
    return features.detach(), torch.autograd.grad(loss, parameters)


@pytest.mark.parametrize("adapt", ["ss", "ss+bn", "ft"])
@pytest.mark.parametrize("name", list_backbones())
def test_the_folded_view_computes_the_same_features_and_gradients(name, adapt):
    torch.manual_seed(0)
    model = create_backbone(name, width=0.25).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if adapt == "ft":
        trained = [p.requires_grad_(True) for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters()]
    else:
        apply_scale_shift(model)
        trained = [p for p in model.parameters() if p.requires_grad]
        if adapt == "ss+bn":
            trained += [p.requires_grad_(True) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    _randomise(model)
    view = folded_view(model)
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(p, FoldedConvBN) for p in view.modules() for m in p.children())
    x = torch.randn(3, 3, 32, 32)
    expected, expected_grads = _gradients(model, x, trained)
    folded, folded_grads = _gradients(view, x, trained)
    assert ((folded - expected).abs().max() / expected.abs().max()).item() < 1e-5
    for want, got in zip(expected_grads, folded_grads, strict=True):  # fp32 rounding, through up to 25 layers
        assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_the_folded_view_shares_the_models_tensors():
    model = create_backbone("resnet12", width=0.25).eval()
    apply_scale_shift(model)
    keys = set(model.state_dict())
    view = folded_view(model)
    assert set(model.state_dict()) == keys  # the model itself is not restructured
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = view(x)
        for parameter in model.parameters():
            if parameter.dim() == 4 and parameter.shape[-1] == 1:  # an optimiser step on the model's SS scales
                parameter.mul_(1.1)
        assert not torch.allclose(view(x), before)
        assert torch.allclose(view(x), model(x), rtol=1e-4, atol=1e-5)
