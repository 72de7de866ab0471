"""evaluate_split: features of only the images the episodes use, scored like the whole split's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import metatransfer.phases.meta_test as meta_test
from metatransfer.config import Config
from metatransfer.data.cache import load_split
from metatransfer.data.episodes import TaskSampler
from metatransfer.models.backbones import create_backbone
from metatransfer.models.fuse import inference_copy
from metatransfer.models.head import BaseLearner
from metatransfer.phases.features import extract_features

CPU = torch.device("cpu")


@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_only_the_used_images_are_extracted_and_accuracies_equal_those_of_the_whole_split(fc100_small, monkeypatch, protocol):
    root, name = fc100_small
    split = load_split(root, name, "test")  # 20 classes x 25 images
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    theta_w, theta_b = 0.01 * torch.randn(5, backbone.out_features), torch.zeros(5)
    config = Config()
    config.amp = False  # fp32 on every machine, as the reference features below
    extracted = []
    original = meta_test.extract_features

    def counting(*args, **kwargs):
        features = original(*args, **kwargs)
        extracted.append(len(features))
        return features

    monkeypatch.setattr(meta_test, "extract_features", counting)
    results = meta_test.evaluate_split(backbone, theta_w, theta_b, split, config, CPU, ways=[5], shots=[1], episodes=3,
                                       n_query=2, protocol=protocol, seed=7)

    query = 1 if protocol == "paper" else 2
    tasks = TaskSampler(split.labels, n_way=5, n_shot=1, n_query=query, seed=[7, 5, 1]).sample(3)
    used = np.unique(np.concatenate([tasks.support.ravel(), tasks.query.ravel()]))
    assert extracted == [len(used)] * (2 if protocol == "paper" else 1)
    assert len(used) < len(split.labels)

    options = dict(mean=split.mean, std=split.std, device=CPU, amp=False, channels_last=True)
    plain = inference_copy(backbone)
    whole = extract_features(plain, split.images, **options)
    flipped = extract_features(plain, split.images, flip=True, **options) if protocol == "paper" else None
    expected = meta_test.evaluate_features(whole, tasks, theta_w, theta_b, learner=BaseLearner.from_config(config.base_learner),
                                           temperature=config.base_learner.temperature, flipped=flipped)
    assert results[0]["per_episode"] == expected.round(4).tolist()
