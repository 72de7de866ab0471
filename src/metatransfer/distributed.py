"""Several processes, one per device: the few collective operations the phases need.

Started by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), the
phases run data-parallel: pre-training splits each global batch across ranks, meta-training splits
the T tasks of each meta-batch. Every rank draws the same batches and tasks from the same seed,
computes the loss of its slice, and the gradients are averaged, so all ranks take identical
optimizer steps and hold identical weights; only rank 0 writes files. Without torchrun (no
WORLD_SIZE, or WORLD_SIZE=1) every function here is a no-op and the code runs as one process.
Backend: NCCL on CUDA, gloo on CPU. See docs/distributed.md.
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "is_distributed",
    "is_main",
    "rank",
    "world_size",
    "rank_slice",
    "all_reduce_gradients",
    "all_reduce_sum",
    "all_gather",
    "barrier",
    "cleanup",
]


def init_distributed(device: str = "auto") -> None:
    """Join the process group described by torchrun's environment; no-op for one process.

    Args:
        device: the config's device (auto | cpu | cuda | cuda:N). On CUDA each process takes
            GPU LOCAL_RANK and the backend is NCCL; on CPU it is gloo.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (the one process that writes files and logs), and without torchrun."""
    return rank() == 0


def rank_slice(total: int, what: str) -> slice:
    """This rank's contiguous share of `total` items (a global batch, the tasks of a meta-batch).

    Raises:
        ValueError: `total` is not a multiple of the world size (equal shares keep the averaged
            gradient equal to the single-process one).
    """
    size = world_size()
    if total % size:
        raise ValueError(f"{what} is {total}, not a multiple of the {size} processes; each process takes an equal share.")
    share = total // size
    return slice(rank() * share, (rank() + 1) * share)


def all_reduce_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average the gradients of `parameters` over ranks, in place, with one flat all-reduce."""
    if not is_distributed():
        return
    parameters = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for parameter, grad in zip(parameters, grads):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad)
        offset += grad.numel()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (a copy); `tensor` itself without torchrun."""
    if not is_distributed():
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally shaped `tensor` along dim 0, in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written the checkpoint the next phase reads)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
