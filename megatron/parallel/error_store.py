"""Errors shared across ranks through the default process group's key-value store.

A rank that raises inside a guarded section (`run_guarded`: the pipeline schedules) writes
"rank R: <error>" into the store, then re-raises. A rank whose own operation then fails - its p2p peer
exited, or the wait ran past the process group's timeout - raises `PipelineError` quoting what the other
ranks wrote. So every rank exits with an error within the distributed timeout, naming the rank that
started it. (The store is served by global rank 0's process: when rank 0 is the one that failed and has
exited, its message cannot be read, and the others report only their own failure.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron.parallel.state import ParallelState

_ERROR_COUNT_KEY = "megatron/pipeline/num_errors"
_ERROR_KEY = "megatron/pipeline/error/"
_MAX_ERROR_CHARS = 2000


class PipelineError(RuntimeError):
    """Pipeline communication failed, or this rank failed after another rank had (named in the message)."""


def run_guarded(parallel_state: ParallelState, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`run()`; on an exception, record it in the store and raise it, or a `PipelineError` quoting the
    errors other ranks recorded first (this rank's failure is then most likely their consequence)."""
    try:
        return run()
    except Exception as error:
        causes = _errors_from_other_ranks(parallel_state.rank)
        _record_error(parallel_state.rank, error)
        if causes:
            raise PipelineError(
                f"rank {parallel_state.rank}: the pipeline failed on another rank: {' | '.join(causes)} "
                f"(this rank then failed with {_describe(error)})"
            ) from error
        raise


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _default_store():
    """The default process group's key-value store, or None (no process group, or none to be had)."""
    try:
        if dist.is_available() and dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - a private API: without it, errors just are not shared
        pass
    return None


def _record_error(rank: int, error: BaseException) -> None:
    """Append "rank R: <error>" to the store's list, marked as a consequence when it is a
    `PipelineError` (a failed p2p or another rank's failure), else as a cause."""
    store = _default_store()
    if store is None:
        return
    kind = "consequence" if isinstance(error, PipelineError) else "cause"
    try:
        index = store.add(_ERROR_COUNT_KEY, 1)
        store.set(f"{_ERROR_KEY}{index}", f"{kind}\nrank {rank}: {_describe(error)}")
    except Exception:  # noqa: BLE001 - the store's host may be gone; the error itself is raised anyway
        pass


def _errors_from_other_ranks(rank: int) -> list[str]:
    """What other ranks recorded, oldest first: their causes, or when there are none their
    consequences (empty when the store is unreachable)."""
    store = _default_store()
    if store is None:
        return []
    recorded: dict[str, list[str]] = {"cause": [], "consequence": []}
    try:
        for index in range(1, store.add(_ERROR_COUNT_KEY, 0) + 1):
            key = f"{_ERROR_KEY}{index}"
            if store.check([key]):
                kind, message = store.get(key).decode(errors="replace").split("\n", 1)
                if not message.startswith(f"rank {rank}: "):
                    recorded[kind].append(message)
    except Exception:  # noqa: BLE001 - best effort, as above
        pass
    return recorded["cause"] or recorded["consequence"]
