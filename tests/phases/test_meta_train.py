"""meta_batch_loss: the first-order fast path computes the same loss and gradients with less work; E3BM's
hyperprior learners get their meta-gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from metatransfer.config import Config
from metatransfer.data.episodes import Episode
from metatransfer.models.backbones import create_backbone
from metatransfer.model import Preprocessing
from metatransfer.models.head import BaseLearner, adapt_head, expand_head, head_logits
from metatransfer.models.scale_shift import apply_scale_shift, scale_shift_parameters
from metatransfer.features import FeatureSettings, forward_images
from metatransfer.phases.meta_train import meta_batch_loss

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")
PREPROCESSING = Preprocessing(image_size=16, channels=3, mean=MEAN, std=STD)


def _learner(config: Config, head_weight: torch.Tensor, head_bias: torch.Tensor) -> BaseLearner:
    return BaseLearner.from_config(config.base_learner).with_theta(head_weight, head_bias)


def _setup(n_tasks: int = 2, n_way: int = 3, n_shot: int = 2, n_query: int = 4):
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    apply_scale_shift(backbone)
    with torch.no_grad():  # move SS off its identity so its gradients are not degenerate
        for parameter in scale_shift_parameters(backbone):
            parameter.add_(0.1 * torch.randn_like(parameter))
    labels = lambda k: torch.arange(n_way).repeat_interleave(k).expand(n_tasks, -1).clone()
    episode = Episode(
        support_images=torch.randint(0, 256, (n_tasks, n_way * n_shot, 16, 16, 3), dtype=torch.uint8),
        support_labels=labels(n_shot),
        query_images=torch.randint(0, 256, (n_tasks, n_way * n_query, 16, 16, 3), dtype=torch.uint8),
        query_labels=labels(n_query),
        class_ids=torch.arange(n_way).expand(n_tasks, -1).clone(),
    )
    config = Config()
    config.amp, config.channels_last = False, False  # fp32, so both paths agree to rounding
    config.meta_train.first_order = True
    config.base_learner.steps, config.base_learner.lr = 10, 0.1
    head_weight = torch.nn.Parameter(0.01 * torch.randn(n_way, backbone.out_features))
    head_bias = torch.nn.Parameter(torch.zeros(n_way))
    return backbone, head_weight, head_bias, episode, config


def _reference_first_order_loss(backbone, head_weight, head_bias, episode, config) -> torch.Tensor:
    """The plain way: one forward of support and query together, then cut the support's gradient."""
    T, n_support = episode.support_labels.shape
    images = torch.cat([episode.support_images.flatten(0, 1), episode.query_images.flatten(0, 1)])
    features = forward_images(backbone, images, FeatureSettings(mean=MEAN, std=STD, device=CPU))
    support = features[: T * n_support].view(T, n_support, -1).detach()
    query = features[T * n_support :].view(T, -1, features.shape[-1])
    weight, bias = expand_head(head_weight, head_bias, head_weight.shape[0], T)
    weight, bias = adapt_head(support, episode.support_labels, weight, bias,
                              steps=config.base_learner.steps, lr=config.base_learner.lr, second_order=False)
    logits = head_logits(query, weight, bias)
    return F.cross_entropy(logits.flatten(0, 1), episode.query_labels.flatten())


def _gradients(loss, parameters) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, parameters))


def test_first_order_matches_the_one_forward_reference():
    backbone, head_weight, head_bias, episode, config = _setup()
    reference = copy.deepcopy(backbone)
    loss = meta_batch_loss(backbone, _learner(config, head_weight, head_bias), episode, config, PREPROCESSING)[0]
    expected = _reference_first_order_loss(reference, head_weight, head_bias, episode, config)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ours = _gradients(loss, [*scale_shift_parameters(backbone), head_weight, head_bias])
    theirs = _gradients(expected, [*scale_shift_parameters(reference), head_weight, head_bias])
    assert any(g.abs().sum() > 0 for g in ours[:-2])
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-6)


def test_first_order_backpropagates_through_the_query_images_only():
    backbone, head_weight, head_bias, episode, config = _setup()
    first_activation = next(m for m in backbone.modules() if isinstance(m, torch.nn.ReLU))  # after the first conv and BN, folded or not
    graphs: list[tuple[int, bool]] = []  # (batch size, output has a graph) of each forward of the first block's activation
    first_activation.register_forward_hook(lambda module, args, output: graphs.append((output.shape[0], output.requires_grad)))
    meta_batch_loss(backbone, _learner(config, head_weight, head_bias), episode, config, PREPROCESSING)
    support, query = episode.support_images.shape[:2].numel(), episode.query_images.shape[:2].numel()
    assert graphs == [(support, False), (query, True)]

    config.meta_train.first_order = False  # second order needs the support's graph: one forward of all
    graphs.clear()
    meta_batch_loss(backbone, _learner(config, head_weight, head_bias), episode, config, PREPROCESSING)
    assert graphs == [(support + query, True)]


@pytest.mark.parametrize("first_order", [True, False])
def test_a_meta_train_step_with_e3bm_reaches_the_hyperprior_learners_ss_and_theta(first_order):
    backbone, head_weight, head_bias, episode, config = _setup()
    config.meta_train.first_order = first_order
    config.base_learner.ensemble = "e3bm"
    learner = BaseLearner.untrained(config.base_learner, backbone.out_features, n_way=3, seed=config.seed).with_theta(head_weight, head_bias)
    hyperprior = dict(learner.hyperprior.named_parameters())
    loss = meta_batch_loss(backbone, learner, episode, config, PREPROCESSING)[0]
    gradients = dict(zip([*hyperprior, "ss", "theta"], _gradients(loss, [*hyperprior.values(), scale_shift_parameters(backbone)[0], head_weight])))
    for name, gradient in gradients.items():
        assert gradient.abs().sum() > 0, name
