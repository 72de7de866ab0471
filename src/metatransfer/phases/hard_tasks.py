"""The hard-task (HT) meta-batch of MTL (Sun et al., CVPR 2019, section 4.3; TPAMI 2022).

After each task's inner loop the classes are ranked by their accuracy on the task's queries; the
lowest is the task's failure class. The failure classes of `normal_iterations` meta-batches form a
pool; then `hard_iterations` meta-batches of hard tasks are sampled from the pool (fresh images of
those classes, as the papers found better) and get exactly the same meta-update; then the pool is cleared.
This follows the authors' preliminary TF code (10 normal : 5 hard, from iteration 10) except for
its defect: there the per-task accuracy list is never cleared, so from the second cycle on the
"failure" classes come from the first 20 tasks. Here every cycle ranks its own tasks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from metatransfer.config import HardTaskConfig
from metatransfer.data.episodes import TaskIndices, TaskSampler

__all__ = ["failure_classes", "HardTaskScheduler"]


def failure_classes(per_class_accuracy: torch.Tensor, per_class_loss: torch.Tensor) -> torch.Tensor:
    """(T, N) query accuracy and mean query loss per task class -> (T,) position of the failure class.

    Lowest accuracy wins; ties go to the higher loss (the class the learner is least sure of),
    then to the first position, so the choice is deterministic.
    """
    # Lexicographic order by two stable sorts, least significant key first: positions ordered by
    # loss descending (ties keep position order), then by accuracy ascending (ties keep that order).
    by_loss = per_class_loss.argsort(dim=1, descending=True, stable=True)
    by_accuracy = per_class_accuracy.gather(1, by_loss).argsort(dim=1, stable=True)
    return by_loss.gather(1, by_accuracy[:, :1]).squeeze(1)


class HardTaskScheduler:
    """Decides whether each meta-iteration is normal or hard and samples the hard tasks.

    Args:
        config: the `meta_train.hard_tasks` settings.
        n_way: classes per task; a hard cycle waits until the pool holds at least
            n_way distinct classes (it keeps collecting until then).
    """

    def __init__(self, config: HardTaskConfig, n_way: int) -> None:
        self.config = config
        self.needed = n_way
        self.pool: list[int] = []  # failure classes of the current cycle, with repeats
        self.normal_done = 0
        self.hard_left = 0
        self.failure_counts: Counter[int] = Counter()

    def next_kind(self, iteration: int) -> str:
        if not self.config.enabled:
            return "normal"
        if self.hard_left == 0 and iteration >= self.config.start and self.normal_done >= self.config.normal_iterations:
            if len(set(self.pool)) >= self.needed:
                self.hard_left = self.config.hard_iterations
                if self.hard_left == 0:  # a cycle without hard meta-batches still ends here
                    self.pool, self.normal_done = [], 0
        return "hard" if self.hard_left > 0 else "normal"

    def sample(self, kind: str, sampler: TaskSampler, n_tasks: int) -> TaskIndices:
        if kind == "normal":
            return sampler.sample(n_tasks)
        return sampler.sample(n_tasks, classes=self.pool)  # fresh images of the failure classes

    def observe(self, kind: str, tasks: TaskIndices, per_class_accuracy: torch.Tensor, per_class_loss: torch.Tensor) -> None:
        """Record the failure classes of a normal meta-batch; count down a hard one."""
        if kind == "hard":
            self.hard_left -= 1
            if self.hard_left == 0:
                self.pool, self.normal_done = [], 0
            return
        positions = failure_classes(per_class_accuracy.cpu(), per_class_loss.cpu()).tolist()
        for t, c in enumerate(positions):
            class_id = int(tasks.class_ids[t, c])
            self.pool.append(class_id)
            self.failure_counts[class_id] += 1
        self.normal_done += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "normal_done": self.normal_done,
            "hard_left": self.hard_left, "failure_counts": {str(k): v for k, v in self.failure_counts.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool = list(state["pool"])  # a checkpoint of older code also holds "pool_images", unused
        self.normal_done, self.hard_left = state["normal_done"], state["hard_left"]
        self.failure_counts = Counter({int(k): v for k, v in state["failure_counts"].items()})
