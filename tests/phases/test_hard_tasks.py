"""The hard-task meta-batch: failure classes, the normal/hard schedule, hard-task sampling, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metatransfer.config import HardTaskConfig
from metatransfer.data.episodes import TaskSampler
from metatransfer.phases.hard_tasks import HardTaskScheduler, failure_classes

N_WAY, N_SHOT, N_QUERY, N_TASKS = 5, 1, 3, 2
NUM_CLASSES, PER_CLASS = 30, 40


def _sampler(seed: int = 0) -> TaskSampler:
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    return TaskSampler(labels, n_way=N_WAY, n_shot=N_SHOT, n_query=N_QUERY, seed=seed)


def _scheduler(**settings) -> HardTaskScheduler:
    return HardTaskScheduler(HardTaskConfig(**settings), N_WAY)


def _results(tasks, fail_at=None):
    """(T, N) accuracy and loss in which the class at position fail_at[t] (default 0) fails."""
    T = tasks.n_tasks
    positions = [0] * T if fail_at is None else fail_at
    accuracy = torch.ones(T, N_WAY)
    loss = torch.full((T, N_WAY), 0.1)
    for t, position in enumerate(positions):
        accuracy[t, position] = 0.0
        loss[t, position] = 2.0
    return accuracy, loss


def _step(scheduler, sampler, iteration, fail=None):
    """One meta-iteration as meta_train runs it; `fail(tasks)` picks failing positions."""
    kind = scheduler.next_kind(iteration)
    tasks = scheduler.sample(kind, sampler, N_TASKS)
    scheduler.observe(kind, tasks, *_results(tasks, fail(tasks) if fail else None))
    return kind, tasks


# failure_classes ---------------------------------------------------------------------------------

def test_failure_class_is_the_lowest_accuracy_class():
    accuracy = torch.tensor([[0.8, 0.2, 1.0, 0.6, 0.4], [0.0, 0.2, 0.2, 0.2, 0.2]])
    loss = torch.zeros(2, 5)
    assert failure_classes(accuracy, loss).tolist() == [1, 0]


def test_failure_class_accuracy_outranks_loss_even_for_small_differences():
    # accuracies 1/15 apart (15 queries); the loss must only break exact ties
    accuracy = torch.tensor([[0.0, 1 / 15, 1.0, 1.0, 1.0], [2 / 15, 1 / 15, 1 / 15, 3 / 15, 1.0]])
    loss = torch.tensor([[0.1, 5.0, 0.2, 0.3, 0.4], [9.0, 0.5, 0.4, 9.0, 9.0]])
    assert failure_classes(accuracy, loss).tolist() == [0, 1]


def test_failure_class_ties_go_to_higher_loss_then_first_position():
    accuracy = torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.6], [0.5, 0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    loss = torch.tensor([[9.0, 1.0, 3.0, 2.0, 0.0], [1.0, 2.0, 2.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    assert failure_classes(accuracy, loss).tolist() == [2, 1, 0]


def test_failure_class_is_deterministic_under_repetition():
    generator = torch.Generator().manual_seed(0)
    accuracy = torch.randint(0, 4, (50, 5), generator=generator).float() / 3
    loss = torch.randint(0, 3, (50, 5), generator=generator).float()
    first = failure_classes(accuracy, loss)
    assert torch.equal(first, failure_classes(accuracy.clone(), loss.clone()))
    for t in range(50):  # brute-force lexicographic reference
        expected = min(range(5), key=lambda c: (accuracy[t, c].item(), -loss[t, c].item(), c))
        assert first[t].item() == expected


# schedule ----------------------------------------------------------------------------------------

def test_default_schedule_is_ten_normal_then_five_hard():
    scheduler, sampler = _scheduler(), _sampler()
    kinds = [_step(scheduler, sampler, i)[0] for i in range(45)]
    expected = (["normal"] * 10 + ["hard"] * 5) * 3
    assert kinds == expected
    assert kinds.count("hard") * 3 == len(kinds)  # one update in three is hard


def test_custom_ratio():
    scheduler, sampler = _scheduler(normal_iterations=4, hard_iterations=2, start=0), _sampler()
    kinds = [_step(scheduler, sampler, i)[0] for i in range(12)]
    assert kinds == (["normal"] * 4 + ["hard"] * 2) * 2


def test_no_hard_iteration_before_start():
    scheduler, sampler = _scheduler(normal_iterations=2, hard_iterations=1, start=7), _sampler()
    kinds = [_step(scheduler, sampler, i)[0] for i in range(12)]
    assert "hard" not in kinds[:7]
    assert kinds[7] == "hard"  # the pool is ready by then: the first hard iteration is `start`


def test_disabled_is_always_normal():
    scheduler, sampler = _scheduler(enabled=False), _sampler()
    assert {_step(scheduler, sampler, i)[0] for i in range(40)} == {"normal"}


def test_waits_while_the_pool_has_fewer_than_n_way_classes():
    labels = np.repeat(np.arange(6), PER_CLASS)
    sampler = TaskSampler(labels, n_way=N_WAY, n_shot=N_SHOT, n_query=N_QUERY, seed=0)
    scheduler = _scheduler(normal_iterations=2, hard_iterations=1, start=0)
    # 5 of 6 classes per task: the smallest class id is 0 or 1, so the pool never holds 5 classes
    smallest = lambda tasks: tasks.class_ids.argmin(axis=1).tolist()
    kinds = [_step(scheduler, sampler, i, fail=smallest)[0] for i in range(20)]
    assert kinds == ["normal"] * 20
    assert set(scheduler.pool) == {0, 1}
    assert scheduler.normal_done == 20 and len(scheduler.pool) == 20 * N_TASKS  # it keeps collecting
    # once the pool reaches N classes, the hard iterations follow
    scheduler.pool += [2, 3, 4]
    assert scheduler.next_kind(20) == "hard"


# hard-task sampling ------------------------------------------------------------------------------

def _fill_pool(scheduler, sampler, iterations):
    records = []
    for i in range(iterations):
        kind, tasks = _step(scheduler, sampler, i)
        assert kind == "normal"
        records.append(tasks)
    return records


def test_hard_tasks_draw_only_failure_classes():
    scheduler, sampler = _scheduler(start=0), _sampler()
    records = _fill_pool(scheduler, sampler, 10)
    failed = {int(tasks.class_ids[t, 0]) for tasks in records for t in range(N_TASKS)}  # position 0 fails
    assert set(scheduler.pool) == failed
    for i in range(10, 15):
        kind, tasks = _step(scheduler, sampler, i)
        assert kind == "hard"
        assert set(tasks.class_ids.ravel().tolist()) <= failed
        labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
        assert (labels[tasks.support].reshape(N_TASKS, N_WAY, N_SHOT) == tasks.class_ids[:, :, None]).all()


def test_hard_tasks_draw_fresh_images_of_the_failure_classes():
    scheduler, sampler = _scheduler(start=0), _sampler()
    records = _fill_pool(scheduler, sampler, 10)
    failed_images = {i for tasks in records for t in range(N_TASKS)  # position 0 fails
                     for i in [*tasks.support[t, :N_SHOT].tolist(), *tasks.query[t, :N_QUERY].tolist()]}
    hard_images = set()
    for _ in range(5):
        tasks = scheduler.sample("hard", sampler, N_TASKS)
        hard_images |= set(tasks.support.ravel().tolist()) | set(tasks.query.ravel().tolist())
    # 40 images per class, 4 of them used: fresh draws are almost never all among the failed ones
    assert hard_images - failed_images


def test_pool_is_cleared_after_the_hard_iterations():
    scheduler, sampler = _scheduler(start=0), _sampler()
    for i in range(15):
        _step(scheduler, sampler, i)
    assert scheduler.pool == [] and scheduler.normal_done == 0
    assert sum(scheduler.failure_counts.values()) == 10 * N_TASKS  # normal tasks only


def test_second_cycle_pool_comes_only_from_second_cycle_tasks():
    """The authors' TF code never cleared the per-task accuracies (reference §3); we must."""
    scheduler, sampler = _scheduler(start=0), _sampler()
    first_cycle = set(range(0, 15))
    second_cycle = set(range(15, 30))

    def fail_in(allowed):
        def fail(tasks):
            positions = []
            for row in tasks.class_ids:
                inside = np.flatnonzero(np.isin(row, sorted(allowed)))
                positions.append(int(inside[0]) if len(inside) else 0)
            return positions
        return fail

    second_failures = set()
    for i in range(30):
        kind = scheduler.next_kind(i)
        tasks = scheduler.sample(kind, sampler, N_TASKS)
        fail = fail_in(first_cycle if i < 15 else second_cycle)
        positions = fail(tasks)
        if kind == "normal" and i >= 15:
            second_failures |= {int(tasks.class_ids[t, p]) for t, p in enumerate(positions)}
        if i >= 25:  # the second cycle's hard iterations
            assert kind == "hard"
            assert set(tasks.class_ids.ravel().tolist()) <= second_failures
        scheduler.observe(kind, tasks, *_results(tasks, positions))
        if i == 24:
            assert set(scheduler.pool) == second_failures
            assert len(scheduler.pool) == 10 * N_TASKS


def test_state_dict_round_trip_continues_identically():
    def run(resume_at=None):
        scheduler, sampler = _scheduler(start=0), _sampler(seed=4)
        kinds, draws = [], []
        for i in range(40):
            if i == resume_at:
                state = json.loads(json.dumps(scheduler.state_dict()))  # checkpoints keep JSON
                sampler_state = json.loads(json.dumps(sampler.state_dict()))
                scheduler, sampler = _scheduler(start=0), _sampler(seed=99)
                scheduler.load_state_dict(state)
                sampler.load_state_dict(sampler_state)
            kind, tasks = _step(scheduler, sampler, i, fail=lambda t: [i % N_WAY] * N_TASKS)
            kinds.append(kind)
            draws.append(tasks.support.tolist())
        return kinds, draws, dict(scheduler.failure_counts)

    straight = run()
    assert run(resume_at=12) == straight  # mid hard phase
    assert run(resume_at=5) == straight  # mid normal phase


def test_reproducible_from_the_seed():
    def run(seed):
        scheduler, sampler = _scheduler(start=0), _sampler(seed=seed)
        return [(kind, tasks.class_ids.tolist()) for kind, tasks in (_step(scheduler, sampler, i) for i in range(30))]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_hard_tasks_have_the_normal_shapes():
    scheduler, sampler = _scheduler(start=0), _sampler()
    _fill_pool(scheduler, sampler, 10)
    tasks = scheduler.sample("hard", sampler, 3)
    assert tasks.support.shape == (3, N_WAY * N_SHOT)
    assert tasks.query.shape == (3, N_WAY * N_QUERY)
    assert tasks.class_ids.shape == (3, N_WAY)
    assert (tasks.n_way, tasks.n_shot, tasks.n_query) == (N_WAY, N_SHOT, N_QUERY)


def test_zero_hard_iterations_still_clear_the_pool_each_cycle():
    config = HardTaskConfig(normal_iterations=2, hard_iterations=0, start=0)
    scheduler = HardTaskScheduler(config, n_way=2)
    sampler = TaskSampler(np.repeat(np.arange(6), 10), n_way=2, n_shot=1, n_query=2, seed=0)
    for iteration in range(12):
        kind = scheduler.next_kind(iteration)
        assert kind == "normal"
        tasks = scheduler.sample(kind, sampler, 2)
        scheduler.observe(kind, tasks, torch.rand(2, 2), torch.rand(2, 2))
        assert len(scheduler.pool) <= 2 * config.normal_iterations
