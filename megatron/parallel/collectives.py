"""Process groups and the few collectives the framework uses, each timed and counted in bytes.

`Group` wraps a `torch.distributed` process group together with its member ranks and its kind ("tp",
"dp", "pp", ...). A group of size 1 has no process group (`pg is None`) and every collective on it is the
identity, so the same code runs in one process without `torch.distributed` initialised. (torch's own
convention, where `group=None` means the whole world, is never used here: it is too easy to reduce over
the wrong ranks by accident.)

The same algorithm runs on every backend: reduce-scatter is `reduce_scatter_tensor` and all-gather is
`all_gather_into_tensor` on gloo (torch >= 2.6) as on NCCL, so CI runs the collectives a cluster runs.

Accounting, for tests and benchmarks (costs that do not depend on the machine are counted, not timed):
- `COMM_TIMER`: wall seconds and calls. gloo collectives are synchronous, so on CPU that is the time spent
  communicating (including waiting for slower ranks); NCCL collectives are asynchronous on the CUDA
  stream, so there it only counts the launch.
- `HOST_WAIT`: seconds the host thread spent blocked in the calls that wait for peers (the synchronous
  collectives, `wait()` on an asynchronous one, object gathers, the pipeline's send/receive) and in the
  training step's device sync (`host_waiting`), never reset: readers take differences. Busy time = wall
  time minus this is what the straggler report compares (`megatron.training.stragglers`). With NCCL the
  collectives return once queued on the stream and the wait for peers happens on the device, which the
  host meets at the step's device sync: there busy time is host time only.
- `COMM_BYTES`: per group kind, the bytes each rank sends under the bandwidth-optimal (ring) algorithm, the
  standard cost model: for a tensor of B bytes over n ranks, all-reduce 2 (n-1)/n B, reduce-scatter
  (n-1)/n B of its input, all-gather (n-1)/n B of its output, a point-to-point send B, a broadcast
  (n-1)/n B (the mean over the group of a pipelined ring broadcast, where every rank but the last sends
  B: the group's total (n-1) B is exact, the least that gives every other rank the tensor). The planner's
  communication table uses the same formulas (`wire_bytes`), so a test can compare plan and count.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    """Ranks (global, in group order) of one process group, this process's index in it, and its kind."""

    ranks: tuple[int, ...] = (0,)
    rank: int = 0
    pg: object | None = None  # torch.distributed.ProcessGroup when size > 1
    kind: str = ""  # "tp", "dp", "pp", "model_parallel", "embedding", "world" (the byte counter's key)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_trivial(self) -> bool:
        return self.size == 1

    def __repr__(self) -> str:  # the process group object is not informative
        return f"Group(ranks={self.ranks}, rank={self.rank}, kind={self.kind!r})"


TRIVIAL = Group()


class HostWait:
    """Seconds blocked waiting for peers since the process started (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds = 0.0


HOST_WAIT = HostWait()


class CommTimer:
    """Accumulated seconds and number of calls spent in collectives (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    @contextmanager
    def measure(self, blocking: bool = True):
        """Time the block; `blocking` (the call waits for peers, not only starts a collective) also adds
        the seconds to `HOST_WAIT`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.seconds += seconds
            self.calls += 1
            if blocking:
                HOST_WAIT.seconds += seconds


COMM_TIMER = CommTimer()


@contextmanager
def host_waiting():
    """Count the block's seconds in `HOST_WAIT` only: a device sync, where with NCCL the host waits for
    the queued collectives, hence for the slowest peer."""
    start = time.perf_counter()
    try:
        yield
    finally:
        HOST_WAIT.seconds += time.perf_counter() - start


# bytes a rank sends, per byte of the tensor, under the ring algorithm over n ranks (module docstring)
_WIRE_FACTORS = {
    "all_reduce": lambda n: Fraction(2 * (n - 1), n),
    "reduce_scatter": lambda n: Fraction(n - 1, n),  # of the input (the whole, unscattered tensor)
    "all_gather": lambda n: Fraction(n - 1, n),  # of the output (the whole, gathered tensor)
    "send": lambda n: Fraction(1),
    "broadcast": lambda n: Fraction(n - 1, n),  # mean per rank (module docstring)
}


def wire_bytes(op: str, nbytes: int, group_size: int) -> Fraction:
    """Bytes one rank sends for collective `op` over a tensor of `nbytes` (see the module docstring)."""
    if group_size <= 1:
        return Fraction(0)
    return _WIRE_FACTORS[op](group_size) * nbytes


class CommBytes:
    """Bytes sent by this rank, per group kind and per collective, since the last `reset`.

    `by_kind()` -> {kind: bytes}; `by_op()` -> {(kind, op): bytes}; `calls` -> {(kind, op): count}.
    Bytes are exact fractions of the ring model; all-gather/reduce-scatter sizes divisible by the group
    size (every one the framework issues) give whole numbers.
    """

    def __init__(self) -> None:
        self.bytes: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def record(self, group: Group, op: str, tensor: torch.Tensor) -> None:
        key = (group.kind or "unnamed", op)
        self.bytes[key] += wire_bytes(op, tensor.numel() * tensor.element_size(), group.size)
        self.calls[key] += 1

    def by_kind(self) -> dict[str, Fraction]:
        out: dict[str, Fraction] = defaultdict(Fraction)
        for (kind, _), value in self.bytes.items():
            out[kind] += value
        return dict(out)

    def by_op(self) -> dict[tuple[str, str], Fraction]:
        return dict(self.bytes)


COMM_BYTES = CommBytes()


def all_reduce(tensor: torch.Tensor, group: Group, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `tensor` over `group` ("sum" or "max"); returns `tensor`."""
    if group.is_trivial:
        return tensor
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    COMM_BYTES.record(group, "all_reduce", tensor)
    with COMM_TIMER.measure():
        dist.all_reduce(tensor, op=reduce_op, group=group.pg)
    return tensor


def broadcast(tensor: torch.Tensor, group: Group, src: int) -> torch.Tensor:
    """In place: group rank `src`'s `tensor` (contiguous) on every rank of `group`; returns `tensor`."""
    if group.is_trivial:
        return tensor
    assert tensor.is_contiguous(), "broadcast needs a contiguous tensor"
    COMM_BYTES.record(group, "broadcast", tensor)
    with COMM_TIMER.measure():
        dist.broadcast(tensor, src=group.ranks[src], group=group.pg)
    return tensor


def all_reduce_async(tensor: torch.Tensor, group: Group):
    """Start an in-place sum all-reduce; returns a work handle (`wait`), or None for a trivial group."""
    if group.is_trivial:
        return None
    COMM_BYTES.record(group, "all_reduce", tensor)
    with COMM_TIMER.measure(blocking=False):
        return dist.all_reduce(tensor, group=group.pg, async_op=True)


def wait(handle) -> None:
    """Wait for a handle from an `*_async` collective (None is already done), counting the wait as comm
    time."""
    if handle is not None:
        with COMM_TIMER.measure():
            handle.wait()


def _check_split(size: int, group: Group, dim: int) -> None:
    assert size % group.size == 0, f"dimension {dim} of size {size} does not split over {group.size} ranks"


def all_gather_into_tensor_async(output: torch.Tensor, tensor: torch.Tensor, group: Group):
    """Start gathering every rank's `tensor` (contiguous, 1/n of `output`) into the contiguous `output`,
    in group order along dim 0; returns a handle for `wait` (None for a trivial group: copied now).
    `tensor` may be this rank's slice of `output` (an in-place gather, no staging copy)."""
    return _start_flat("all_gather", output, tensor, whole=output, group=group)


def reduce_scatter_tensor_async(output: torch.Tensor, tensor: torch.Tensor, group: Group):
    """Start summing the contiguous `tensor` over `group` into `output`, this rank's 1/n chunk of the sum
    (chunks along dim 0 in group order); returns a handle for `wait` (None for a trivial group: copied
    now). `output` may be this rank's chunk of `tensor` itself."""
    return _start_flat("reduce_scatter", output, tensor, whole=tensor, group=group)


def _start_flat(op: str, output: torch.Tensor, tensor: torch.Tensor, *, whole: torch.Tensor, group: Group):
    """The two flat collectives: `whole` (the output of an all-gather, the input of a reduce-scatter) is
    the group size times the other side; the byte counter charges the whole tensor's ring traffic."""
    assert output.is_contiguous() and tensor.is_contiguous(), f"{op} needs contiguous tensors"
    part = tensor if whole is output else output
    assert whole.numel() == part.numel() * group.size, (op, tuple(output.shape), tuple(tensor.shape), group)
    if group.is_trivial:
        if output.data_ptr() != tensor.data_ptr():
            output.view(-1).copy_(tensor.view(-1))
        return None
    COMM_BYTES.record(group, op, whole)
    start = dist.all_gather_into_tensor if op == "all_gather" else dist.reduce_scatter_tensor
    with COMM_TIMER.measure(blocking=False):
        return start(output, tensor, group=group.pg, async_op=True)


class Pending:
    """An asynchronous collective in flight: `wait()` completes it and returns its result (a tensor).
    It holds the collective's input until then (`keep`), so the memory is not reused while it is read."""

    __slots__ = ("_handle", "_finish", "_keep")

    def __init__(self, handle, finish, keep=None) -> None:
        self._handle, self._finish, self._keep = handle, finish, keep

    def wait(self) -> torch.Tensor:
        wait(self._handle)
        self._keep = None
        return self._finish()


def all_gather_async(tensor: torch.Tensor, group: Group, dim: int) -> Pending:
    """Start `all_gather(tensor, group, dim)`; `.wait()` returns the gathered tensor."""
    if group.is_trivial:
        return Pending(None, lambda: tensor)
    dim = dim % tensor.dim()
    tensor = tensor.contiguous()
    flat = torch.empty(
        (group.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device
    )  # the layout every backend accepts: ranks' tensors stacked along dim 0
    handle = all_gather_into_tensor_async(flat, tensor, group)
    if dim == 0:
        return Pending(handle, lambda: flat, keep=tensor)
    shape = list(tensor.shape)
    shape[dim] *= group.size
    rank_leading = flat.view(group.size, *tensor.shape)
    return Pending(handle, lambda: rank_leading.movedim(0, dim).reshape(shape), keep=tensor)


def all_gather(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Concatenation along `dim` of `tensor` from every rank of `group`, in group order.

    One `all_gather_into_tensor` into a buffer with the ranks leading; for `dim` != 0 the result is that
    buffer with the rank axis moved next to `dim` (a view when everything before `dim` has size 1, e.g.
    the sequence of a micro-batch of one, else one copy)."""
    return all_gather_async(tensor, group, dim).wait()


def reduce_scatter_async(tensor: torch.Tensor, group: Group, dim: int) -> Pending:
    """Start `reduce_scatter(tensor, group, dim)`; `.wait()` returns this rank's chunk of the sum."""
    if group.is_trivial:
        return Pending(None, lambda: tensor)
    dim = dim % tensor.dim()
    size = tensor.shape[dim]
    _check_split(size, group, dim)
    if dim == 0:
        moved = tensor.contiguous()
    else:  # [..., n * c, ...] -> [n, ..., c, ...]: each rank's chunk contiguous
        shape = list(tensor.shape)
        shape[dim : dim + 1] = [group.size, size // group.size]
        moved = tensor.reshape(shape).movedim(dim, 0).contiguous()
    output = torch.empty(
        moved.shape[1:] if dim else (size // group.size, *moved.shape[1:]),
        dtype=tensor.dtype,
        device=tensor.device,
    )
    handle = reduce_scatter_tensor_async(output, moved.view(-1, *output.shape[1:]), group)
    return Pending(handle, lambda: output, keep=moved)


def reduce_scatter(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """Sum over `group`, then this rank's chunk along `dim` (`tensor.shape[dim]` divisible by the size):
    one `reduce_scatter_tensor` (the input is laid out with `dim` leading first when `dim` != 0)."""
    return reduce_scatter_async(tensor, group, dim).wait()


def split(tensor: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
    """This rank's chunk of `tensor` along `dim` (no communication)."""
    if group.is_trivial:
        return tensor
    size = tensor.shape[dim]
    _check_split(size, group, dim)
    return tensor.chunk(group.size, dim=dim)[group.rank].contiguous()


def all_gather_object(obj, group: Group) -> list:
    """Python objects from every rank of `group` (small payloads: fingerprints, flags)."""
    if group.is_trivial:
        return [obj]
    out = [None] * group.size
    with COMM_TIMER.measure():
        dist.all_gather_object(out, obj, group=group.pg)
    return out


def count_send(group: Group, tensor: torch.Tensor) -> None:
    """Record a point-to-point send of `tensor` to a peer in `group` (the pipeline's messages)."""
    COMM_BYTES.record(group, "send", tensor)
