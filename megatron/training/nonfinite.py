"""--check-for-nan-in-loss-and-grad: which ranks produced a non-finite gradient, and in which parameter.

A NaN in one rank's gradient reaches every rank through the reductions (the data-parallel sum, the
tensor-parallel sum of partial gradients), so after them the gradient norm can say that something is
non-finite but not where it came from. `LocalGradCheck` therefore looks at this rank's LOCAL gradients:
just before a bucket of the gradient buffer starts its data-parallel reduction (a callback of
`GradBuffer`, during the backward with --overlap-grad-reduce, else after it), it computes the L1 norm of
every parameter's gradient in the bucket on the device: one fused pass over the bucket, no host read. A
NaN or inf makes the sum non-finite. (The L1 norm rather than the max: a CUDA max reduction may skip NaNs;
a sum cannot. A finite gradient whose absolute values sum past the fp32 range, ~3e38, also counts.)

`local_flag()` folds them into one device scalar (1.0: this rank holds a non-finite local gradient) that
the training step puts in this rank's slot of the world all-reduce it already runs for the stop flag, so
the step's one host read tells every rank which ranks had one. Only then (rarely) `first_nonfinite()`
reads this rank's norms to name the first parameter (in `model.named_parameters()` order, a logical name:
layers keep their global index at every pipeline layout).
"""

from __future__ import annotations

import math

import torch

from megatron.parallel.collectives import all_gather_object


class LocalGradCheck:
    """Per-parameter L1 norms of this rank's local gradients, taken before their reduction (see the
    module docstring). Attach once per gradient buffer (`for_optimizer`); `start()` before each
    iteration's backward."""

    def __init__(self, grad_buffer) -> None:
        self.grad_buffer = grad_buffer
        self.params = [list(bucket.params) for bucket in grad_buffer.buckets]
        self.flat_index: dict[int, int] = {}  # id(param) -> its place in the concatenated norms
        for params in self.params:
            for param in params:
                self.flat_index[id(param)] = len(self.flat_index)
        self.norms: dict[int, torch.Tensor] = {}  # bucket index -> [params of the bucket] fp32
        self.last: list[torch.Tensor] = []
        self.recording = False
        grad_buffer.before_reduction = self._record

    @classmethod
    def for_optimizer(cls, optimizer) -> LocalGradCheck:
        """The check attached to `optimizer`'s gradient buffer (created on first use)."""
        check = getattr(optimizer, "local_grad_check", None)
        if check is None or check.grad_buffer is not optimizer.grad_buffer:
            check = optimizer.local_grad_check = cls(optimizer.grad_buffer)
        return check

    def start(self) -> None:
        """Before an iteration's first backward: record each bucket once, before its reduction."""
        self.norms, self.recording = {}, True

    def _record(self, bucket) -> None:
        if self.recording and bucket.index not in self.norms:
            grads = [param.main_grad for param in self.params[bucket.index]]
            self.norms[bucket.index] = torch.stack(torch._foreach_norm(grads, 1))

    def local_flag(self, device: torch.device) -> torch.Tensor:
        """1.0 (fp32 scalar on the device, no host read) when any of this rank's local gradients is
        non-finite, else 0.0. Buckets whose reduction has not started yet are recorded now; call after
        the backward and before `finish_grad_sync`."""
        for bucket in self.grad_buffer.buckets:
            if not bucket.started:
                self._record(bucket)
        self.recording = False
        self.last = [self.norms[bucket.index] for bucket in self.grad_buffer.buckets]
        if not self.last:
            return torch.zeros((), dtype=torch.float32, device=device)
        return (~torch.isfinite(torch.cat(self.last))).any().float()

    def first_nonfinite(self) -> tuple[str, float] | None:
        """(name, L1 norm) of the first parameter whose local gradient was non-finite in the last
        `local_flag`, or None: a host read, for the rare iteration that had one."""
        if not self.last:
            return None
        values = torch.cat(self.last).tolist()
        for param_id, name in self.grad_buffer.names.items():  # model.named_parameters() order
            value = values[self.flat_index[param_id]]
            if not math.isfinite(value):
                return name, value
        return None


def name_nonfinite_ranks(check: LocalGradCheck, ranks: list[int], parallel_state) -> list[str]:
    """'rank R: first parameter P (gradient L1 norm V)' for each rank in `ranks` (every rank calls this:
    one object all-gather over the world, only in an iteration that had a non-finite local gradient)."""
    mine = check.first_nonfinite() if parallel_state.rank in ranks else None
    found = all_gather_object(mine, parallel_state.world_group)
    lines = []
    for rank in ranks:
        named = found[rank]
        what = f"first parameter {named[0]} (local gradient L1 norm {named[1]})" if named else "no parameter"
        lines.append(f"rank {rank}: {what}")
    return lines
