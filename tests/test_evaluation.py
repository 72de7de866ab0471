"""evaluate_split: a FewShotModel on seeded episodes; features of only the images the episodes use,
scored like the whole split's; test-time views in the rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import metatransfer.model
from metatransfer.data.cache import ImageSplit, load_split
from metatransfer.data.episodes import TaskSampler
from metatransfer.evaluation import EpisodePlan, evaluate_split
from metatransfer.features import FeatureSettings, extract_features, forward_images
from metatransfer.model import FewShotModel, Preprocessing
from metatransfer.models.backbones import create_backbone
from metatransfer.models.fuse import inference_copy
from metatransfer.models.head import BaseLearner
from metatransfer.views import shift_offsets, shifted

CPU = torch.device("cpu")


def _model(backbone: torch.nn.Module, split: ImageSplit, **settings) -> FewShotModel:
    """`backbone` with a 5-way theta of small random rows and the default base-learner, fp32 (as the reference features)."""
    theta_w, theta_b = 0.01 * torch.randn(5, backbone.out_features), torch.zeros(5)
    learner = BaseLearner(steps=100, lr=0.01).with_theta(theta_w, theta_b)
    return FewShotModel(backbone, learner, Preprocessing.from_split(split.images, split.mean, split.std), **settings)


@pytest.mark.parametrize("protocol", ["standard", "paper"])
def test_only_the_used_images_are_extracted_and_accuracies_equal_those_of_the_whole_split(fc100_small, monkeypatch, protocol):
    root, name = fc100_small
    split = load_split(root, name, "test")  # 20 classes x 25 images
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    model = _model(backbone, split, channels_last=True)
    extracted = []
    original = metatransfer.model.extract_features

    def counting(*args, **kwargs):
        features = original(*args, **kwargs)
        extracted.append(len(features))
        return features

    monkeypatch.setattr(metatransfer.model, "extract_features", counting)
    results = evaluate_split(model, split, EpisodePlan(ways=[5], shots=[1], episodes=3, n_query=2, protocol=protocol, seed=7))

    query = 1 if protocol == "paper" else 2
    tasks = TaskSampler(split.labels, n_way=5, n_shot=1, n_query=query, seed=[7, 5, 1]).sample(3)
    used = np.unique(np.concatenate([tasks.support.ravel(), tasks.query.ravel()]))
    assert extracted == [len(used)] * (2 if protocol == "paper" else 1)
    assert len(used) < len(split.labels)

    settings = FeatureSettings(mean=split.mean, std=split.std, device=CPU, amp=False, channels_last=True)
    plain = inference_copy(backbone)
    whole = extract_features(plain, split.images, settings)
    flipped = extract_features(plain, split.images, settings, flip=True) if protocol == "paper" else None
    expected = model.score(whole, tasks, flipped=flipped)
    assert results[0]["per_episode"] == expected.round(4).tolist()


@pytest.mark.parametrize("bn_mode", ["frozen", "batch"])
def test_flip_average_scores_a_mirrored_split_as_the_split(fc100_small, bn_mode):
    """views.flip: each feature is the mean over the image and its mirror, so mirroring every
    image changes no score; without it, mirroring does change the features."""
    root, name = fc100_small
    split = load_split(root, name, "test")
    mirrored = dataclasses.replace(split, images=np.ascontiguousarray(np.asarray(split.images)[:, :, ::-1]))
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    model = _model(backbone, split, bn_mode=bn_mode)
    plan = EpisodePlan(ways=[5], shots=[1], episodes=6, n_query=3, seed=3)

    def scores(images, flip_average: bool) -> list[float]:
        return evaluate_split(dataclasses.replace(model, flip_average=flip_average), images, plan)[0]["per_episode"]

    assert scores(mirrored, True) == scores(split, True)
    assert scores(mirrored, False) != scores(split, False)  # so the episodes can tell
    settings = FeatureSettings(mean=split.mean, std=split.std, device=CPU)
    one, other = (extract_features(backbone, images.images[:4], settings) for images in (split, mirrored))
    averaged = extract_features(backbone, split.images[:4], dataclasses.replace(settings, flip_average=True))
    assert not torch.allclose(one, other, atol=1e-4)
    torch.testing.assert_close(averaged, (one + other) / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bn_mode", ["frozen", "batch"])
def test_shift_views_average_the_grid_of_shifted_copies_and_validation_can_leave_them_out(fc100_small, bn_mode):
    """views.shift_pixels=s: each feature is the mean over the image moved to the 3x3 grid of -s, 0, s
    pixels (zero-padded), extracted in smaller batches; a row says which s scored it."""
    root, name = fc100_small
    split = load_split(root, name, "test")
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_chans=3, width=0.25).eval()
    plain = FeatureSettings(mean=split.mean, std=split.std, device=CPU)
    shifts = dataclasses.replace(plain, shift_views=2)
    images = split.images[:5]
    copies = [forward_images(backbone, torch.from_numpy(np.array(images)), plain, augment=lambda x, dx=dx, dy=dy: shifted(x, dx, dy))
              for dx, dy in shift_offsets(2)]
    assert len(copies) == 9 and not torch.allclose(copies[0], copies[4], atol=1e-4)  # (-2, -2) is not the image itself
    averaged = extract_features(backbone, images, shifts, batch_size=9)  # one image a forward
    torch.testing.assert_close(averaged, torch.stack(copies).mean(0), atol=1e-5, rtol=1e-5)
    channels_last = extract_features(backbone, images, dataclasses.replace(shifts, channels_last=True))  # as the presets run
    torch.testing.assert_close(channels_last, averaged, atol=1e-4, rtol=1e-4)
    both = extract_features(backbone, images, dataclasses.replace(shifts, flip_average=True))
    mirrored = extract_features(backbone, images, shifts, flip=True)
    torch.testing.assert_close(both, (averaged + mirrored) / 2, atol=1e-5, rtol=1e-5)  # the grid is symmetric

    model = _model(backbone, split, bn_mode=bn_mode)
    plan = EpisodePlan(ways=[5], shots=[1], episodes=6, n_query=3, seed=3)

    def row(shift_views: int) -> dict:
        return evaluate_split(dataclasses.replace(model, shift_views=shift_views), split, plan)[0]

    plain, with_shifts = row(0), row(2)
    assert (plain["shift_views"], with_shifts["shift_views"]) == (0, 2)
    assert with_shifts["per_episode"] != plain["per_episode"]
