"""The copy an asynchronous save takes of the live tensors, off the save call. Staging hands each tensor to
`Snapshot.take`, which returns a CPU buffer (pinned for CUDA tensors; reused from the previous save when
the shapes match) to be filled later: CUDA tensors are copied right away on a side stream (the save call
only queues them), CPU tensors by the background writer before it writes. Training may run forward and
backward meanwhile; the first optimizer step after the save is fenced until the copies are done (a
step pre-hook on the torch optimizer: on CUDA the current stream waits for the copies' event, nothing
blocks the host; on the CPU the step waits for the writer's copy). `fence_seconds` is the time training
spent blocked in that fence. See docs/checkpoints.md.
"""

from __future__ import annotations

import threading
import time

import torch


class BufferPool:
    """The snapshot buffers of one checkpointer, reused by the next save when shapes and dtypes match
    (pinned host memory is slow to allocate, and fresh pages are slow to touch)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def restart(self) -> None:
        self._next = 0

    def get(self, like: torch.Tensor) -> torch.Tensor:
        index, self._next = self._next, self._next + 1
        if index < len(self._buffers):
            buffer = self._buffers[index]
            if buffer.shape == like.shape and buffer.dtype == like.dtype:
                return buffer
        pin = like.is_cuda and torch.cuda.is_available()
        buffer = torch.empty(like.shape, dtype=like.dtype, pin_memory=pin)
        if index < len(self._buffers):
            self._buffers[index] = buffer
        else:
            self._buffers.append(buffer)
        return buffer


class Snapshot:
    """The deferred copies of one asynchronous save (see the module docstring)."""

    def __init__(self, pool: BufferPool) -> None:
        pool.restart()
        self._pool = pool
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._event = None  # CUDA: recorded after the side-stream copies
        self._copied = threading.Event()  # CPU copies done (or failed)
        self._hook = None
        self.fence_seconds = 0.0

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The CPU buffer that will hold `tensor`'s values as of the save call."""
        buffer = self._pool.get(tensor)
        self._pairs.append((tensor.detach(), buffer))
        return buffer

    def start(self, torch_optimizer) -> None:
        """Queue the CUDA copies and fence `torch_optimizer`'s next step (called by the save, after
        staging)."""
        cuda = [(source, buffer) for source, buffer in self._pairs if source.is_cuda]
        if cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for source, buffer in cuda:
                    buffer.copy_(source, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        self._hook = torch_optimizer.register_step_pre_hook(lambda *args: self.fence())

    def copy_cpu(self) -> None:
        """The writer thread, before writing: copy the CPU tensors, wait for the CUDA copies."""
        try:
            for source, buffer in self._pairs:
                if not source.is_cuda:
                    buffer.copy_(source)
            if self._event is not None:
                self._event.synchronize()
        finally:
            self._copied.set()

    def fence(self) -> None:
        """Training, before anything changes the saved tensors: wait until they are copied (once)."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        start = time.perf_counter()
        if self._event is not None:  # the GPU waits, not the host
            torch.cuda.current_stream().wait_event(self._event)
        if any(not source.is_cuda for source, _ in self._pairs):
            self._copied.wait()
        self.fence_seconds += time.perf_counter() - start


def fenceable(optimizer) -> object | None:
    """The torch optimizer whose step an async save can fence (None: copy on the save call instead)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if hasattr(inner, "register_step_pre_hook") else None
