"""Process groups and the few collectives the framework uses, with a communication timer.

`Group` wraps a `torch.distributed` process group together with its member ranks. A group of size 1 has
no process group (`pg is None`) and every collective on it is the identity, so the same code runs in one
process without `torch.distributed` initialised. (torch's own convention, where `group=None` means the
whole world, is never used here: it is too easy to reduce over the wrong ranks by accident.)

gloo has no reduce-scatter; `reduce_scatter` falls back to an all-reduce followed by taking this rank's
chunk there (twice the traffic, same numbers).

Every collective adds its wall time to `COMM_TIMER`. gloo collectives are synchronous, so on CPU that is
the time spent communicating (including waiting for slower ranks); NCCL collectives are asynchronous on
the CUDA stream, so there it only counts the launch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """Ranks (global, in group order) of one process group, and this process's index in it."""

    ranks: tuple[int, ...] = (0,)
    rank: int = 0
    pg: object | None = None  # torch.distributed.ProcessGroup when size > 1

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_trivial(self) -> bool:
        return self.size == 1

    def __repr__(self) -> str:  # the process group object is not informative
        return f"Group(ranks={self.ranks}, rank={self.rank})"


TRIVIAL = Group()


class CommTimer:
    """Accumulated seconds and number of calls spent in collectives (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    @contextmanager
    def measure(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


COMM_TIMER = CommTimer()


def _is_gloo(group: Group) -> bool:
    return dist.get_backend(group.pg) == "gloo"


def all_reduce(tensor: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group` ("sum" or "max"); returns `tensor`."""
    if group.is_trivial:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    with COMM_TIMER.measure():
        dist.all_reduce(tensor, op=reduce_op, group=group.pg)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: Group):
    """Start an in-place sum all-reduce; returns a work handle (`.wait()`), or None for a trivial group."""
    if group.is_trivial:
        return None
    with COMM_TIMER.measure():
        return dist.all_reduce(tensor, group=group.pg, async_op=True)


def wait(handle) -> None:
    """Wait for a handle from `all_reduce_async` (None is already done), counting the wait as comm time."""
    if handle is not None:
        with COMM_TIMER.measure():
            handle.wait()


def all_gather(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Concatenation along `dim` of `tensor` from every rank of `group`, in group order."""
    if group.is_trivial:
        return tensor
    tensor = tensor.contiguous()
    chunks = [torch.empty_like(tensor) for _ in range(group.size)]
    with COMM_TIMER.measure():
        dist.all_gather(chunks, tensor, group=group.pg)
    return torch.cat(chunks, dim=dim)


def all_gather_into(output_chunks: list[torch.Tensor], tensor: torch.Tensor, group: Group) -> None:
    """All-gather `tensor` into the given contiguous output chunks (one per rank, in group order)."""
    if group.is_trivial:
        output_chunks[0].copy_(tensor)
        return
    with COMM_TIMER.measure():
        dist.all_gather(output_chunks, tensor.contiguous(), group=group.pg)


def reduce_scatter(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Sum over `group`, then this rank's chunk along `dim` (`tensor.shape[dim]` divisible by the size)."""
    if group.is_trivial:
        return tensor
    size = tensor.shape[dim]
    assert size % group.size == 0, f"dimension {dim} of size {size} does not split over {group.size} ranks"
    if _is_gloo(group):
        summed = all_reduce(tensor.contiguous().clone(), group)
        return summed.chunk(group.size, dim=dim)[group.rank].contiguous()
    moved = tensor.movedim(dim, 0).contiguous()
    output = torch.empty((size // group.size, *moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    with COMM_TIMER.measure():
        dist.reduce_scatter_tensor(output, moved, group=group.pg)
    return output.movedim(0, dim).contiguous()


def split(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's chunk of `tensor` along `dim` (no communication)."""
    if group.is_trivial:
        return tensor
    size = tensor.shape[dim]
    assert size % group.size == 0, f"dimension {dim} of size {size} does not split over {group.size} ranks"
    return tensor.chunk(group.size, dim=dim)[group.rank].contiguous()


def all_gather_object(obj, group: Group) -> list:
    """Python objects from every rank of `group` (small payloads: fingerprints, flags)."""
    if group.is_trivial:
        return [obj]
    out = [None] * group.size
    with COMM_TIMER.measure():
        dist.all_gather_object(out, obj, group=group.pg)
    return out
