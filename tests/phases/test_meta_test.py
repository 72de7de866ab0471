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
from metatransfer.phases.features import extract_features, forward_images, shift_offsets, shifted

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


@pytest.mark.parametrize("bn_mode", ["frozen", "batch"])
def test_shift_views_average_the_grid_of_shifted_copies_and_validation_can_leave_them_out(fc100_small, bn_mode):
    """model.shift_views=s: each feature is the mean over the image moved to the 3x3 grid of -s, 0, s
    pixels (zero-padded), extracted in smaller batches; evaluate_split(with_shifts=False) scores as s=0."""
    root, name = fc100_small
    split = load_split(root, name, "test")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    options = dict(mean=split.mean, std=split.std, device=CPU, amp=False, channels_last=False)
    images = split.images[:5]
    copies = [forward_images(backbone, torch.from_numpy(np.array(images)), augment=lambda x, dx=dx, dy=dy: shifted(x, dx, dy), **options)
              for dx, dy in shift_offsets(2)]
    assert len(copies) == 9 and not torch.allclose(copies[0], copies[4], atol=1e-4)  # (-2, -2) is not the image itself
    averaged = extract_features(backbone, images, shift_views=2, batch_size=9, **options)  # one image a forward
    torch.testing.assert_close(averaged, torch.stack(copies).mean(0), atol=1e-5, rtol=1e-5)
    channels_last = extract_features(backbone, images, shift_views=2, **{**options, "channels_last": True})  # as the presets run
    torch.testing.assert_close(channels_last, averaged, atol=1e-4, rtol=1e-4)
    both = extract_features(backbone, images, shift_views=2, flip_average=True, **options)
    mirrored = extract_features(backbone, images, shift_views=2, flip=True, **options)
    torch.testing.assert_close(both, (averaged + mirrored) / 2, atol=1e-5, rtol=1e-5)  # the grid is symmetric

    theta_w, theta_b = 0.01 * torch.randn(5, backbone.out_features), torch.zeros(5)
    config = Config()
    config.amp, config.model.bn_mode = False, bn_mode

    def row(shift_views: int, **kwargs) -> dict:
        config.model.shift_views = shift_views
        return meta_test.evaluate_split(backbone, theta_w, theta_b, split, config, CPU, ways=[5], shots=[1], episodes=6,
                                        n_query=3, protocol="standard", seed=3, **kwargs)[0]

    plain, with_shifts, left_out = row(0), row(2), row(2, with_shifts=False)
    assert (plain["shift_views"], with_shifts["shift_views"], left_out["shift_views"]) == (0, 2, 0)
    assert left_out["per_episode"] == plain["per_episode"]
    assert with_shifts["per_episode"] != plain["per_episode"]


def test_shifted_moves_the_picture_and_pads_with_zeros():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    right, up = shifted(x, 1, 0)[0, 0], shifted(x, 0, -1)[0, 0]
    torch.testing.assert_close(right[:, 1:], x[0, 0, :, :3])
    assert right[:, 0].eq(0).all()
    torch.testing.assert_close(up[:3], x[0, 0, 1:])
    assert up[3].eq(0).all()
    assert shifted(x, 0, 0) is x
