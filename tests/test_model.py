"""FewShotModel: fit on support features, predict queries; a batch of episodes scored as each one alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metatransfer.data.episodes import TaskSampler
from metatransfer.features import FeatureSettings, batch_statistics, extract_features, forward_images
from metatransfer.model import FewShotModel, Preprocessing
from metatransfer.models.backbones import create_backbone
from metatransfer.models.head import BaseLearner

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _model(**settings) -> FewShotModel:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    learner = BaseLearner(steps=5, lr=0.5).with_theta(0.01 * torch.randn(5, backbone.out_features), torch.zeros(5))
    return FewShotModel(backbone, learner, Preprocessing(image_size=16, channels=3, mean=MEAN, std=STD), **settings)


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 16, 16, 3), dtype=np.uint8)


def test_a_batch_of_episodes_scores_as_each_episode_fitted_and_predicted_alone():
    model = _model()
    labels = np.repeat(np.arange(6), 5)
    features = model.features(_images(len(labels)))
    tasks = TaskSampler(labels, n_way=5, n_shot=2, n_query=3, seed=1).sample(4)
    batched = model.score(features, tasks, chunk=3)  # two chunks
    for t, accuracy in enumerate(batched):
        support, query = features[torch.from_numpy(tasks.support[t])], features[torch.from_numpy(tasks.query[t])]
        predictions = model.fit(support[None], tasks.support_labels()[:1], 5).predict(query[None])
        assert predictions.shape == (1, 15)
        assert accuracy == pytest.approx((predictions == tasks.query_labels()[:1]).float().mean().item())


def test_fit_keeps_no_autograd_graph_even_with_learned_hyperprior_parameters(monkeypatch):
    """E3BM's loaded hyperprior learners are parameters: outside no_grad every inner step would stay in a
    graph while fitting. What the learner adapts inside fit carries none, cosine steps included."""
    from metatransfer.config import BaseLearnerConfig

    torch.manual_seed(0)
    adapted = []
    original = BaseLearner.adapt
    monkeypatch.setattr(BaseLearner, "adapt", lambda self, *args, **kwargs: adapted.append(original(self, *args, **kwargs)) or adapted[-1])
    support, query, labels = torch.randn(2, 10, 8), torch.randn(2, 6, 8), torch.arange(5).repeat(2).expand(2, -1)
    for logits in ("linear", "cosine"):
        config = BaseLearnerConfig(ensemble="e3bm", steps=3, logits=logits, init="kaiming")
        learner = BaseLearner.from_config(config, BaseLearner.untrained(config, 8, n_way=5, seed=0).tensors())
        assert all(p.requires_grad for p in learner.hyperprior.parameters())  # as loaded
        model = FewShotModel(lambda x: x, learner, Preprocessing(image_size=16, channels=3, mean=MEAN, std=STD))
        assert model.fit(support, labels, 5).predict(query).shape == (2, 6)
        weight, bias = adapted[-1]
        assert weight.grad_fn is None and bias.grad_fn is None and model.head[0].grad_fn is None


def test_features_use_running_statistics_or_each_set_s_own():
    images = _images(6)
    frozen, batch = _model(), _model(bn_mode="batch")
    settings = FeatureSettings(mean=MEAN, std=STD, device=CPU)
    assert frozen.feature_settings() == settings
    torch.testing.assert_close(frozen.features(images), extract_features(frozen.backbone, images, settings))
    with batch_statistics(batch.backbone):
        expected = forward_images(batch.backbone, torch.from_numpy(images), settings)
    torch.testing.assert_close(batch.features(images), expected)
    assert not torch.allclose(batch.features(images), frozen.features(images), atol=1e-4)
    assert not batch.backbone.training  # left as it was


def test_predict_before_fit_and_a_negative_shift_are_refused():
    with pytest.raises(RuntimeError, match="not fitted"):
        _model().predict(torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="is a number of pixels"):
        _model(shift_views=-1)
