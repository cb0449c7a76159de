"""The "strict" torch.distributed backend: gloo's transport with NCCL's matching rules checked, for CI.

CI has no multi-GPU machine, and gloo forgives what NCCL does not: a program whose ranks issue the
collectives of one communicator in different orders, or point-to-point messages that only tags keep
apart, passes on gloo and hangs or silently exchanges the wrong data on a cluster. This backend runs every
operation on gloo and first checks it against NCCL's rules, raising `StrictCollectiveError` (on every rank
involved, naming the ranks, the operation, the shapes and dtypes and the call's sequence number):

- Collectives: the ranks of a communicator must issue the same collectives, with the same shapes, dtypes
  and reduce operation, in the same order. Before each one the ranks all-gather a fingerprint of it
  (a digest and a description, `_RECORD_BYTES`) over a second gloo group of the same ranks, so the check
  never queues behind the data of asynchronous collectives still in flight. A mismatch is seen by every
  rank at once and raises there; a rank that never issues the call leaves the others waiting until the
  process group's timeout, when they raise naming what every waiting rank of the group was blocked in
  (written to the default store once the wait failed).
- Point to point: NCCL matches the sends and receives between two ranks in the order they are posted and
  ignores tags. Every message travels with tag 0 after a header (sequence number per direction, the tag
  the program gave, shape, dtype) that the receiver compares with the receive it posted: messages that
  gloo's tags would have sorted out, but NCCL would deliver to the wrong receive, fail.
- Every tensor must be contiguous (NCCL reads and writes flat buffers).

Every check runs before the data moves. The fingerprint exchange makes each collective a synchronisation
point of its group at the moment it is issued (the asynchronous ones included), which a correct program
does not notice.

Use: `ParallelState.initialize(..., backend="strict")`, or the environment variable
`MEGATRON_STRICT_COLLECTIVES=1` with the gloo backend; `register()` (idempotent) makes
`torch.distributed.init_process_group("strict")` and `new_group(..., backend="strict")` work in any
process. CPU tensors only (gloo's devices); groups created with `backend="gloo"` explicitly stay plain gloo.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

BACKEND = "strict"
ENV_FLAG = "MEGATRON_STRICT_COLLECTIVES"  # "1": ParallelState.initialize uses this backend instead of gloo
_DIGEST_BYTES = 16
_RECORD_BYTES = 512  # digest, a problem flag, then the description (truncated) of one call on one rank
_HEADER_BYTES = 256  # a point-to-point message's header, sent before it
_WAITING_KEY = "megatron/strict/waiting/"  # default store: what a rank that timed out was waiting in
_DIAGNOSIS_SECONDS = 3.0  # how long a rank that timed out waits for the others' descriptions
_REDUCE_OPS = ("SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR", "PREMUL_SUM")


class StrictCollectiveError(RuntimeError):
    """The program broke one of NCCL's rules: under NCCL it would hang or exchange the wrong data."""


def register() -> None:
    """Register the "strict" backend with torch.distributed (once per process; later calls do nothing)."""
    if BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])


def strict_requested() -> bool:
    """True when the environment asks for the strict backend in place of gloo (`ENV_FLAG`)."""
    return os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes")


def _create(options, _backend_options) -> StrictProcessGroup:
    ranks = tuple(options.global_ranks_in_group) or tuple(range(options.group_size))
    return StrictProcessGroup(
        options.store, options.group_rank, options.group_size, options.timeout, ranks, str(options.group_id)
    )


def describe(tensor: torch.Tensor) -> str:
    """ "float32[4, 8]": the dtype and shape NCCL needs to agree on."""
    return f"{str(tensor.dtype).removeprefix('torch.')}[{', '.join(str(s) for s in tensor.shape)}]"


def _reduce_name(op) -> str:
    for name in _REDUCE_OPS:
        if op == getattr(dist.ReduceOp.RedOpType, name, None):
            return name.lower()
    return str(op)


def _layout_problems(tensors: list[torch.Tensor], names: list[str]) -> list[str]:
    return [
        f"{name} {describe(t)} is not contiguous (strides {tuple(t.stride())})"
        for t, name in zip(tensors, names, strict=True)
        if not t.is_contiguous()
    ]


def _encode(text: str, size: int, digest_of: str | None = None, flag: bool = False) -> torch.Tensor:
    """`size` bytes: the BLAKE2b digest of `digest_of` (default `text`), a flag byte, then `text`."""
    digest = hashlib.blake2b((text if digest_of is None else digest_of).encode(), digest_size=_DIGEST_BYTES)
    body = text.encode()[: size - _DIGEST_BYTES - 1]
    data = digest.digest() + bytes([int(flag)]) + body
    out = torch.zeros(size, dtype=torch.uint8)
    out[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _decode(record: torch.Tensor) -> tuple[bytes, bool, str]:
    data = record.numpy().tobytes()
    text = data[_DIGEST_BYTES + 1 :].rstrip(b"\0").decode(errors="replace")
    return data[:_DIGEST_BYTES], bool(data[_DIGEST_BYTES]), text


class StrictWork(dist.distributed_c10d.Work):
    """The handle of one strict operation: waits for its gloo work, running the checks that need
    received data (a point-to-point header) before the data is waited for."""

    def __init__(self, steps: list[Callable[[], object]], tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self._steps = steps
        self._tensors = tensors  # the result, and kept alive until the work is done
        self._done = False

    def wait(self, timeout: timedelta | None = None) -> bool:
        if not self._done:
            for step in self._steps:
                step()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done

    def is_success(self) -> bool:
        return self._done

    def result(self) -> list[torch.Tensor]:
        return self._tensors

    def get_future(self) -> torch.futures.Future:
        self.wait()  # a completed future: the checks must run in this thread, before the result is used
        future = torch.futures.Future()
        future.set_result(self._tensors)
        return future


def _gloo_waits(*works) -> list[Callable[[], object]]:
    return [work.wait for work in works if work is not None]


class StrictProcessGroup(dist.ProcessGroup):
    """One communicator of the strict backend: a gloo group that carries the data and a second gloo group
    of the same ranks that carries the fingerprints (see the module docstring)."""

    def __init__(
        self, store, rank: int, size: int, timeout: timedelta, global_ranks: tuple[int, ...], name=""
    ):
        super().__init__(rank, size)
        self.global_ranks = global_ranks
        self.group_id = name  # torch's group name: tells apart two groups of the same ranks
        self.timeout = timeout
        self._data = dist.ProcessGroupGloo(dist.PrefixStore("strict/data", store), rank, size, timeout)
        self._check = dist.ProcessGroupGloo(dist.PrefixStore("strict/check", store), rank, size, timeout)
        self._calls = 0  # collectives issued on this group
        self._sent: dict[int, int] = defaultdict(int)  # messages sent to each group rank
        self._received: dict[int, int] = defaultdict(int)  # receives posted from each group rank

    def getBackendName(self) -> str:  # noqa: N802 - the name torch's C++ ProcessGroup calls
        return BACKEND

    # torch's ProcessGroup keeps its name in its backends, and this one has none (every call is Python):
    # kept here, for DeviceMesh (the checkpoint's) and torch's group registry
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_name(self) -> str:
        return getattr(self, "_group_name", self.group_id)

    def name(self) -> str:
        return BACKEND

    def __repr__(self) -> str:
        return f"StrictProcessGroup(ranks={list(self.global_ranks)}, rank={self.global_ranks[self.rank()]})"

    # ------------------------------------------------------------------ the fingerprint check
    def _where(self) -> str:
        return f"the process group of ranks {list(self.global_ranks)} (group {self.group_id or 'world'})"

    def _agree(self, what: str, tensors: list[torch.Tensor], names: list[str], extra=()) -> None:
        """Raise StrictCollectiveError on every rank of the group unless every rank issues `what` as its
        next collective on this group, with contiguous tensors and no local `extra` problems."""
        self._calls += 1
        problems = _layout_problems(tensors, names) + list(extra)
        text = what + "".join(f"\n{problem}" for problem in problems)
        record = _encode(text, _RECORD_BYTES, digest_of=what, flag=bool(problems))
        gathered = torch.empty(self.size() * _RECORD_BYTES, dtype=torch.uint8)
        try:
            self._check._allgather_base(gathered, record, AllgatherOptions()).wait()
        except RuntimeError as error:  # the timeout: some rank never issued this call on this group
            raise StrictCollectiveError(self._unmatched(what, error)) from error
        records = [_decode(chunk) for chunk in gathered.view(self.size(), _RECORD_BYTES)]
        if len({digest for digest, _, _ in records}) > 1:
            raise StrictCollectiveError(
                f"call #{self._calls} on {self._where()} differs between ranks: {self._by_rank(records)}. "
                "Under NCCL every rank of a communicator must issue the same collectives, with the same "
                "shapes, dtypes and reduce operation, in the same order; these ranks would hang or "
                "exchange the wrong data."
            )
        bad = [(rank, text) for rank, (_, flag, text) in zip(self.global_ranks, records, strict=True) if flag]
        if bad:
            details = "; ".join(f"rank {rank}: {text.replace(chr(10), ': ', 1)}" for rank, text in bad)
            raise StrictCollectiveError(
                f"call #{self._calls} on {self._where()}: {details}. NCCL reads and writes each tensor as "
                "one flat buffer of the size the collective implies (in place only at this rank's own "
                "chunk): pass contiguous tensors (.contiguous()) of those sizes."
            )

    def _by_rank(self, records) -> str:
        owners: dict[str, list[int]] = {}
        for rank, (_, _, text) in zip(self.global_ranks, records, strict=True):
            owners.setdefault(text.split("\n", 1)[0], []).append(rank)
        return "; ".join(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}"
            for text, ranks in owners.items()
        )

    def _unmatched(self, what: str, error: BaseException) -> str:
        """The message for a fingerprint exchange that timed out, with what the other ranks of this group
        were waiting in, as far as they wrote it to the default store."""
        me = self.global_ranks[self.rank()]
        mine = f"call #{self._calls} on {self._where()}: {what}"
        others = _share_waiting(me, mine, [rank for rank in self.global_ranks if rank != me])
        return (
            f"rank {me}: {mine} was not issued by every rank of the group (waited up to the timeout, "
            f"{self.timeout}): some rank issued fewer collectives on this group, is blocked in another "
            f"group's collective first (NCCL would hang), or is gone. "
            + ("Waiting at the time: " + "; ".join(others) + ". " if others else "")
            + f"gloo: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        )

    def _collective(self, what: str, tensors, names, run: Callable[[], object], result, extra=()):
        self._agree(what, list(tensors), list(names), extra)
        return StrictWork(_gloo_waits(run()), result)

    # ------------------------------------------------------------------ collectives
    def allreduce(self, tensors, opts):
        (tensor,) = _single(tensors, "all_reduce")
        what = f"all_reduce({_reduce_name(opts.reduceOp)}) {describe(tensor)}"
        return self._collective(
            what, [tensor], ["tensor"], lambda: self._data.allreduce([tensor], opts), [tensor]
        )

    def broadcast(self, tensors, opts):
        (tensor,) = _single(tensors, "broadcast")
        what = f"broadcast(from group rank {opts.rootRank}) {describe(tensor)}"
        return self._collective(
            what, [tensor], ["tensor"], lambda: self._data.broadcast([tensor], opts), [tensor]
        )

    def allgather(self, output_lists, inputs, opts):
        (outputs,) = _single(output_lists, "all_gather")
        (tensor,) = _single(inputs, "all_gather")
        what = f"all_gather(list) -> [{', '.join(describe(t) for t in outputs)}]"
        extra = []
        if len(outputs) != self.size() or describe(outputs[self.rank()]) != describe(tensor):
            extra.append(f"input {describe(tensor)} does not fit output {self.rank()} of {len(outputs)}")
        names = ["input"] + [f"output {i}" for i in range(len(outputs))]
        run = lambda: self._data.allgather([outputs], [tensor], opts)  # noqa: E731
        return self._collective(what, [tensor, *outputs], names, run, outputs, extra)

    def all_gather_single(self, output, tensor, opts):
        what = f"all_gather_into_tensor {describe(tensor)} -> {describe(output)}"
        extra = _size_problem(output, tensor, self.size(), "output", "input")
        extra += _alias_problem(output, tensor, self.rank(), "input", "output")
        run = lambda: self._data._allgather_base(output, tensor, opts)  # noqa: E731
        return self._collective(what, [tensor, output], ["input", "output"], run, [output], extra)

    _allgather_base = all_gather_single  # torch < 2.7 calls it by this name

    def reduce_scatter_single(self, output, tensor, opts):
        what = (
            f"reduce_scatter_tensor({_reduce_name(opts.reduceOp)}) {describe(tensor)} -> {describe(output)}"
        )
        extra = _size_problem(tensor, output, self.size(), "input", "output")
        extra += _alias_problem(tensor, output, self.rank(), "output", "input")
        run = lambda: self._data._reduce_scatter_base(output, tensor, opts)  # noqa: E731
        return self._collective(what, [tensor, output], ["input", "output"], run, [output], extra)

    _reduce_scatter_base = reduce_scatter_single  # torch < 2.7 calls it by this name

    def reduce_scatter(self, outputs, input_lists, opts):
        (output,) = _single(outputs, "reduce_scatter")
        (inputs,) = _single(input_lists, "reduce_scatter")
        what = f"reduce_scatter(list, {_reduce_name(opts.reduceOp)}) [{', '.join(map(describe, inputs))}]"
        names = ["output"] + [f"input {i}" for i in range(len(inputs))]
        run = lambda: self._data.reduce_scatter([output], [inputs], opts)  # noqa: E731
        return self._collective(what, [output, *inputs], names, run, [output])

    def reduce(self, tensors, opts):
        (tensor,) = _single(tensors, "reduce")
        what = f"reduce({_reduce_name(opts.reduceOp)}, to group rank {opts.rootRank}) {describe(tensor)}"
        return self._collective(
            what, [tensor], ["tensor"], lambda: self._data.reduce([tensor], opts), [tensor]
        )

    def barrier(self, opts=None):
        return self._collective("barrier", [], [], lambda: self._data.barrier(), [])

    # ------------------------------------------------------------------ point to point
    def send(self, tensors, dst: int, tag: int):
        (tensor,) = _single(tensors, "send")
        self._check_p2p_layout(tensor, f"send to rank {self.global_ranks[dst]}")
        self._sent[dst] += 1
        header = _encode(_p2p_header(self._sent[dst], tag, tensor), _HEADER_BYTES)
        works = (self._data.send([header], dst, 0), self._data.send([tensor], dst, 0))
        return StrictWork(_gloo_waits(*works), [tensor, header])

    def recv(self, tensors, src: int, tag: int):
        (tensor,) = _single(tensors, "recv")
        self._check_p2p_layout(tensor, f"receive from rank {self.global_ranks[src]}")
        self._received[src] += 1
        expected = _p2p_header(self._received[src], tag, tensor)
        header = torch.empty(_HEADER_BYTES, dtype=torch.uint8)
        header_work = self._data.recv([header], src, 0)
        data_work = self._data.recv([tensor], src, 0)

        def check_header() -> None:
            header_work.wait()
            size, _, wanted = expected.partition("\n")
            sent_size, _, sent = _decode(header)[2].partition("\n")
            if (sent_size, sent) != (size, wanted):
                if sent_size == size:
                    data_work.wait()  # the same size: take the message in, the group stays usable
                me, peer = self.global_ranks[self.rank()], self.global_ranks[src]
                raise StrictCollectiveError(
                    f"rank {me} posted receive {wanted} from rank {peer} on {self._where()}, and NCCL would "
                    f"match it with rank {peer}'s send {sent}: NCCL matches the sends and receives between "
                    "two ranks in the order they are posted, ignoring tags."
                )

        return StrictWork([check_header, data_work.wait], [tensor])

    def _check_p2p_layout(self, tensor: torch.Tensor, what: str) -> None:
        if not tensor.is_contiguous():  # raised here, on this rank only: nothing has been posted yet
            raise StrictCollectiveError(
                f"rank {self.global_ranks[self.rank()]}: {what} on {self._where()}: "
                f"{_layout_problems([tensor], ['tensor'])[0]}; NCCL sends and receives flat buffers: pass a "
                "contiguous tensor (.contiguous())."
            )

    def recv_anysource(self, tensors, tag: int):
        raise StrictCollectiveError("receive from any source: NCCL has no such operation")


def _unsupported(op: str):
    def method(self, *args, **kwargs):
        raise StrictCollectiveError(
            f"{op} on {self._where()}: not supported by the strict backend (the framework does not use it); "
            "add it to megatron/parallel/strict_backend.py with its fingerprint"
        )

    return method


for _op in (
    "gather",
    "scatter",
    "alltoall",
    "alltoall_base",
    "all_to_all_single",
    "allreduce_coalesced",
    "allgather_coalesced",
    "allgather_into_tensor_coalesced",
    "all_gather_single_coalesced",
    "reduce_scatter_tensor_coalesced",
    "reduce_scatter_single_coalesced",
    "monitored_barrier",
):
    setattr(StrictProcessGroup, _op, _unsupported(_op))


def _p2p_header(number: int, tag: int, tensor: torch.Tensor) -> str:
    """The size in bytes, then "#n (tag t, dtype[shape])": message n in this direction on this group."""
    return f"{tensor.numel() * tensor.element_size()}\n#{number} (tag {tag}, {describe(tensor)})"


def _single(tensors, op: str) -> list:
    if len(tensors) != 1:
        raise StrictCollectiveError(f"{op} with {len(tensors)} tensors: one tensor (list) per rank only")
    return list(tensors)


def _size_problem(whole, part, size: int, whole_name: str, part_name: str) -> list[str]:
    if whole.numel() == part.numel() * size and whole.dtype == part.dtype:
        return []
    return [f"{whole_name} {describe(whole)} is not {size} x {part_name} {describe(part)}"]


def _alias_problem(whole, part, rank: int, part_name: str, whole_name: str) -> list[str]:
    """NCCL runs an all-gather or reduce-scatter in place only when the per-rank tensor is exactly this
    rank's chunk of the whole one; any other overlap is undefined."""
    start, end = part.data_ptr(), part.data_ptr() + part.numel() * part.element_size()
    whole_start = whole.data_ptr()
    whole_end = whole_start + whole.numel() * whole.element_size()
    own = whole_start + rank * (end - start)
    if end <= whole_start or start >= whole_end or start == own:
        return []
    return [f"{part_name} overlaps the {whole_name} but is not this rank's chunk {rank} of it"]


def _share_waiting(me: int, mine: str, peers: list[int]) -> list[str]:
    """Write what this rank is waiting in to the default store, then read what `peers` wrote (for up to
    `_DIAGNOSIS_SECONDS`): "rank R: <call>" for each that did. Best effort: [] without a store."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_WAITING_KEY}{me}", mine)
        found: dict[int, str] = {}
        deadline = time.monotonic() + _DIAGNOSIS_SECONDS
        while len(found) < len(peers) and time.monotonic() < deadline:
            for peer in peers:
                if peer not in found and store.check([f"{_WAITING_KEY}{peer}"]):
                    found[peer] = store.get(f"{_WAITING_KEY}{peer}").decode(errors="replace")
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - diagnosis only: the timeout error is raised anyway
        return []
    return [f"rank {peer}: {found[peer]}" for peer in sorted(found)] + [
        f"rank {peer}: not waiting in a collective of this backend" for peer in peers if peer not in found
    ]
