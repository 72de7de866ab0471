"""TaskSampler and gather_episode: shapes, labels, distinct classes, seeding, restrictions, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metatransfer.data.episodes import Episode, TaskIndices, TaskSampler, gather_episode

N_WAY, N_SHOT, N_QUERY, N_TASKS = 5, 2, 3, 40


def _labels(num_classes: int = 12, per_class: int = 10, shuffle: bool = True) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(123).permutation(labels) if shuffle else labels


def _sampler(labels: np.ndarray, seed: int = 0, **sizes) -> TaskSampler:
    sizes = {"n_way": N_WAY, "n_shot": N_SHOT, "n_query": N_QUERY, **sizes}
    return TaskSampler(labels, seed=seed, **sizes)


def _check_tasks(tasks: TaskIndices, labels: np.ndarray, n_way=N_WAY, n_shot=N_SHOT, n_query=N_QUERY) -> None:
    """Every structural promise of a batch of tasks, on a label array of the split."""
    T = tasks.n_tasks
    assert tasks.support.shape == (T, n_way * n_shot)
    assert tasks.query.shape == (T, n_way * n_query)
    assert tasks.class_ids.shape == (T, n_way)
    for t in range(T):
        assert len(set(tasks.class_ids[t].tolist())) == n_way  # distinct classes
        assert not set(tasks.support[t].tolist()) & set(tasks.query[t].tolist())  # disjoint sets
        assert len(set(tasks.support[t].tolist())) == n_way * n_shot  # no image twice
        assert len(set(tasks.query[t].tolist())) == n_way * n_query
        # class-major: the images of label c are all of split class class_ids[t, c]
        support_classes = labels[tasks.support[t]].reshape(n_way, n_shot)
        query_classes = labels[tasks.query[t]].reshape(n_way, n_query)
        assert (support_classes == tasks.class_ids[t][:, None]).all()
        assert (query_classes == tasks.class_ids[t][:, None]).all()


def test_shapes_classes_and_disjoint_sets():
    labels = _labels()
    tasks = _sampler(labels).sample(N_TASKS)
    assert (tasks.n_way, tasks.n_shot, tasks.n_query, tasks.n_tasks) == (N_WAY, N_SHOT, N_QUERY, N_TASKS)
    _check_tasks(tasks, labels)


def test_labels_are_class_major_zero_to_n_minus_one():
    tasks = _sampler(_labels()).sample(3)
    expected_support = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    expected_query = torch.arange(N_WAY).repeat_interleave(N_QUERY)
    assert tasks.support_labels().shape == (3, N_WAY * N_SHOT)
    assert (tasks.support_labels() == expected_support).all()
    assert (tasks.query_labels() == expected_query).all()
    assert tasks.query_labels().dtype == torch.int64


def test_unequal_class_sizes_path():
    rng = np.random.default_rng(5)
    counts = [5, 9, 6, 20, 7, 5, 11]
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    sampler = _sampler(labels)
    assert sampler._table is None  # the per-class loop, not the vectorised draw
    tasks = sampler.sample(N_TASKS)
    _check_tasks(tasks, labels)
    drawn = set(tasks.class_ids.ravel().tolist())
    assert drawn == set(range(len(counts)))  # 40 tasks of 5 out of 7: every class appears


def test_labels_with_gaps_draw_only_present_classes():
    labels = np.repeat(np.array([2, 5, 7, 8, 11, 20]), 6)
    tasks = _sampler(labels).sample(20)
    _check_tasks(tasks, labels)
    assert set(tasks.class_ids.ravel().tolist()) <= {2, 5, 7, 8, 11, 20}


def test_every_class_and_image_gets_drawn_eventually():
    labels = _labels(num_classes=6, per_class=5)
    tasks = _sampler(labels).sample(200)
    assert set(tasks.class_ids.ravel().tolist()) == set(range(6))
    used = set(tasks.support.ravel().tolist()) | set(tasks.query.ravel().tolist())
    assert used == set(range(len(labels)))


def test_same_seed_same_episodes_other_seed_other_episodes():
    labels = _labels()
    a, b, c = _sampler(labels, seed=7).sample(10), _sampler(labels, seed=7).sample(10), _sampler(labels, seed=8).sample(10)
    for name in ("support", "query", "class_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.support, c.support)


def test_successive_draws_differ():
    sampler = _sampler(_labels())
    first, second = sampler.sample(5), sampler.sample(5)
    assert not np.array_equal(first.support, second.support)


def test_pinned_episodes_for_seed_zero():
    """Same episodes on any machine: a change of the sampling algorithm must be noticed here."""
    labels = np.repeat(np.arange(4), 5)
    tasks = TaskSampler(labels, n_way=3, n_shot=1, n_query=2, seed=0).sample(2)
    assert tasks.class_ids.tolist() == [[3, 2, 1], [2, 3, 0]]
    assert tasks.support.tolist() == [[18, 10, 7], [12, 19, 2]]
    assert tasks.query.tolist() == [[15, 17, 12, 14, 8, 5], [11, 10, 18, 16, 3, 1]]


def test_pinned_episodes_for_seed_zero_unequal_sizes():
    labels = np.array([0] * 4 + [1] * 6 + [2] * 5 + [3] * 3)
    tasks = TaskSampler(labels, n_way=2, n_shot=1, n_query=2, seed=0).sample(2)
    assert tasks.class_ids.tolist() == [[3, 2], [2, 3]]
    assert tasks.support.tolist() == [[15, 13], [12, 17]]
    assert tasks.query.tolist() == [[17, 16, 14, 10], [13, 10, 16, 15]]


def test_restricted_classes_only_draws_those():
    labels = _labels()
    allowed = [1, 4, 6, 9, 10, 11]
    tasks = _sampler(labels).sample(30, classes=allowed + [4, 4])  # repeats are fine
    _check_tasks(tasks, labels)
    assert set(tasks.class_ids.ravel().tolist()) == set(allowed)


def test_restricted_to_too_few_classes_fails():
    with pytest.raises(ValueError, match="Need 5 distinct classes.*got 3"):
        _sampler(_labels()).sample(1, classes=[0, 1, 2, 2])


def test_restricted_to_absent_classes_fails():
    labels = np.repeat(np.array([0, 1, 2, 3, 4, 6]), 6)
    with pytest.raises(ValueError, match=r"\[5\]"):
        _sampler(labels).sample(1, classes=[0, 1, 2, 3, 5])


def test_too_few_images_names_the_class():
    labels = np.repeat(np.arange(6), [10, 10, 4, 10, 10, 10])
    with pytest.raises(ValueError, match="'class 2' has 4 images.*5"):
        _sampler(labels)
    names = [f"name{i}" for i in range(6)]
    with pytest.raises(ValueError, match="'name2' has 4 images"):
        TaskSampler(labels, n_way=5, n_shot=2, n_query=3, seed=0, class_names=names)


def test_too_few_classes_fails():
    with pytest.raises(ValueError, match="5-way task needs 5 classes.*only 4"):
        _sampler(_labels(num_classes=4))


def test_state_dict_round_trip_continues_the_same_stream():
    labels = _labels()
    sampler = _sampler(labels, seed=3)
    sampler.sample(4)
    state = json.loads(json.dumps(sampler.state_dict()))  # checkpoints keep it as JSON
    expected = sampler.sample(6)
    resumed = _sampler(labels, seed=99)
    resumed.load_state_dict(state)
    again = resumed.sample(6)
    assert np.array_equal(expected.support, again.support)
    assert np.array_equal(expected.query, again.query)
    assert np.array_equal(expected.class_ids, again.class_ids)


def test_gather_episode_returns_the_indexed_images():
    labels = _labels(num_classes=8, per_class=6)
    # image i is filled with the value i % 256 in a distinct (H, W, C) pattern
    images = np.zeros((len(labels), 4, 3, 2), dtype=np.uint8)
    images[:] = (np.arange(len(labels)) % 256)[:, None, None, None]
    images[:, 0, 0, 0] = labels  # the class, readable from the image itself
    tasks = _sampler(labels, n_shot=1, n_query=2).sample(3)
    episode = gather_episode(images, tasks)
    assert isinstance(episode, Episode)
    assert episode.support_images.shape == (3, N_WAY * 1, 4, 3, 2)
    assert episode.query_images.shape == (3, N_WAY * 2, 4, 3, 2)
    assert episode.support_images.dtype == torch.uint8
    assert np.array_equal(episode.support_images.numpy(), images[tasks.support])
    assert np.array_equal(episode.query_images.numpy(), images[tasks.query])
    assert torch.equal(episode.support_labels, tasks.support_labels())
    assert torch.equal(episode.query_labels, tasks.query_labels())
    assert torch.equal(episode.class_ids, torch.from_numpy(tasks.class_ids))
    # the label of each image agrees with the class its task label stands for
    for t in range(3):
        classes = episode.support_images[t, :, 0, 0, 0].long()
        assert torch.equal(classes, episode.class_ids[t][episode.support_labels[t]])


def test_gather_episode_reads_a_memory_map(tmp_path):
    labels = _labels(num_classes=6, per_class=5)
    images = np.random.default_rng(0).integers(0, 256, (len(labels), 2, 2, 1), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    tasks = _sampler(labels, n_shot=1, n_query=1).sample(2)
    episode = gather_episode(mapped, tasks)
    assert np.array_equal(episode.query_images.numpy(), images[tasks.query])
