"""evaluate_split: features of only the images the episodes use, scored like the whole split's."""

from __future__ import annotations

import dataclasses

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


@pytest.mark.parametrize("bn_mode", ["frozen", "batch"])
def test_flip_average_scores_a_mirrored_split_as_the_split(fc100_small, bn_mode):
    """model.flip_average: each feature is the mean over the image and its mirror, so mirroring every
    image changes no score; without it, mirroring does change the features."""
    root, name = fc100_small
    split = load_split(root, name, "test")
    mirrored = dataclasses.replace(split, images=np.ascontiguousarray(np.asarray(split.images)[:, :, ::-1]))
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    theta_w, theta_b = 0.01 * torch.randn(5, backbone.out_features), torch.zeros(5)
    config = Config()
    config.amp, config.model.bn_mode = False, bn_mode

    def scores(images, flip_average: bool) -> list[float]:
        config.model.flip_average = flip_average
        return meta_test.evaluate_split(backbone, theta_w, theta_b, images, config, CPU, ways=[5], shots=[1], episodes=6,
                                        n_query=3, protocol="standard", seed=3)[0]["per_episode"]

    assert scores(mirrored, True) == scores(split, True)
    assert scores(mirrored, False) != scores(split, False)  # so the episodes can tell
    options = dict(mean=split.mean, std=split.std, device=CPU, amp=False, channels_last=False)
    one, other = (extract_features(backbone, images.images[:4], **options) for images in (split, mirrored))
    averaged = extract_features(backbone, split.images[:4], flip_average=True, **options)
    assert not torch.allclose(one, other, atol=1e-4)
    torch.testing.assert_close(averaged, (one + other) / 2, atol=1e-5, rtol=1e-5)
