"""Data parallelism on the training side: a contiguous fp32 gradient buffer reduced in buckets, and the
distributed optimizer's (ZeRO-1) sharded fp32 master weights.

Gradient buffer (`GradBuffer`)
- One flat fp32 tensor holds the gradient of every trainable parameter; `param.main_grad` is a view
  into it. fp32 parameters also get `param.grad` = that view, so autograd accumulates straight into the
  buffer (adding into a view of zeros is exact: one process computes what it computed without the
  buffer). bf16/fp16 parameters keep `param.grad` None: a post-accumulate-grad hook adds each fresh
  half-precision gradient into `main_grad`, so accumulation over micro-batches happens in fp32.
- The buffer is cut into buckets of about `bucket_size` elements, taking parameters in backward order
  (the reverse of `model.parameters()`, which is roughly when their gradients are produced). Each bucket
  is padded with zeros to a multiple of the data-parallel size so it splits evenly over the DP ranks.
  Inside a bucket the `tp_grad_reduce` parameters come first, so their tensor-parallel reduction is one
  in-place all-reduce of a contiguous slice.
- Reduction of a bucket: first the `tp_grad_reduce` slice is summed over the tensor-parallel group (those
  gradients are partial sums on each TP rank), then the whole bucket is summed over the data-parallel
  group. The DP reduction is a SUM, not a mean: the loss is already the global-batch token mean (see
  training/step.py).
- Tied word embedding under pipeline parallelism: the first and the last stage each hold a copy
  (`embedding_group_reduce` parameters). After the data-parallel reduction, and in both modes at the end
  of `finish_grad_sync`, their gradients are summed over `parallel_state.embedding_group`, so both copies
  take the same step and stay identical.
- With `overlap_grad_reduce`, the hooks count the parameters of each bucket whose gradient is final during
  the last micro-batch's backward; a complete bucket's reduction starts at once (the TP slice
  synchronously, the DP all-reduce asynchronously) while backward continues with earlier layers. Without
  overlap, `finish_grad_sync` reduces every bucket after backward. Both modes run exactly the same
  collectives on the same data, bucket by bucket, so their results are bit-identical.

Distributed optimizer (`ShardedMainParams`)
- DP rank r owns the r-th of the DP equal slices of every bucket. For each parameter overlapping that
  range it keeps an fp32 master copy of the overlapping elements (a "fragment", 1-D) whose `.grad` is the
  matching view of the gradient buffer; AdamW runs over these fragments (element-wise, so a fragment's
  update is exactly the whole parameter's update restricted to it), and Adam's moments therefore exist
  only for the owned range. After the step, each bucket's updated parameters are all-gathered over DP
  into every rank's model.
- The gradient of the owned range needs a reduce-scatter; the bucket is all-reduced instead and only the
  owned slice is read. gloo has no reduce-scatter (its fallback is this same all-reduce), there is no
  asynchronous reduce-scatter helper for the overlapped path, and using one collective for both
  optimizers keeps overlapped and non-overlapped runs bit-identical. On NCCL this moves twice the
  gradient bytes of a true reduce-scatter; swapping in an asynchronous reduce-scatter in
  `GradBuffer._start_reduction` is the whole change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron.parallel import collectives
from megatron.parallel.state import ParallelState

# Megatron's default: large buckets amortise the per-collective latency, growing with DP because each
# rank's shard of a bucket shrinks as DP grows.
DEFAULT_BUCKET_SIZE_BASE = 40_000_000
DEFAULT_BUCKET_SIZE_PER_DP_RANK = 1_000_000


def default_bucket_size(data_parallel_size: int) -> int:
    """Megatron's default bucket size in elements: max(40M, 1M * data-parallel size)."""
    return max(DEFAULT_BUCKET_SIZE_BASE, DEFAULT_BUCKET_SIZE_PER_DP_RANK * data_parallel_size)


@dataclass(eq=False)
class Bucket:
    """A contiguous slice `[start, end)` of the gradient buffer (end - start divisible by DP size).

    `params` in buffer order: those with `tp_grad_reduce` first (their `num_tp_reduce` elements), then the
    others, each group in backward order; the tail after the last parameter is zero padding.
    """

    index: int
    params: list[torch.nn.Parameter]
    start: int
    end: int
    num_tp_reduce: int  # elements at the start of the bucket that are summed over TP first
    dtype: torch.dtype  # of the model parameters (all the same within a bucket)
    data: torch.Tensor = field(repr=False)  # the buffer's [start:end] view
    ready: set[int] = field(default_factory=set, repr=False)  # id() of params final in this backward
    started: bool = False
    handle: object | None = field(default=None, repr=False)

    def owned_range(self, data_parallel_rank: int, data_parallel_size: int) -> tuple[int, int]:
        """Buffer offsets `[lo, hi)` of this bucket's slice owned by a DP rank (distributed optimizer)."""
        shard = (self.end - self.start) // data_parallel_size
        lo = self.start + data_parallel_rank * shard
        return lo, lo + shard


class GradBuffer:
    """The fp32 gradient buffer of a model's trainable parameters, reduced over TP/DP in buckets.

    `named_params`: (name, parameter) pairs in `model.named_parameters()` order (shared parameters once,
    only those with requires_grad). `bucket_size` in elements (None: `default_bucket_size(dp)`).
    Attaching a new buffer to the same parameters detaches the previous one (its hooks are removed).
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        parallel_state: ParallelState,
        *,
        bucket_size: int | None = None,
        overlap_grad_reduce: bool = False,
    ) -> None:
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size must be a positive number of elements, got {bucket_size}")
        self.parallel_state = parallel_state
        self.overlap_grad_reduce = overlap_grad_reduce
        self.bucket_size = bucket_size or default_bucket_size(parallel_state.data_parallel_size)
        self.names = {id(param): name for name, param in named_params}
        params = [param for _, param in named_params]
        for param in params:
            assert param.is_contiguous(), f"{self.names[id(param)]} is not contiguous"
        device = params[0].device if params else parallel_state.device
        self.param_ranges: dict[int, tuple[int, int]] = {}  # id(param) -> [lo, hi) in the buffer
        plans = self._layout(list(reversed(params)))
        self.data = torch.zeros(plans[-1][2] if plans else 0, dtype=torch.float32, device=device)
        self.buckets = [
            Bucket(index, ordered, start, end, num_tp_reduce, ordered[0].dtype, self.data[start:end])
            for index, (ordered, start, end, num_tp_reduce) in enumerate(plans)
        ]
        self._bucket_of = {id(param): bucket for bucket in self.buckets for param in bucket.params}
        self.embedding_params = self._embedding_group_params(named_params)
        self._last_micro_batch = True
        self._synced = False
        self._attach(params)

    # ------------------------------------------------------------------ layout
    def _layout(self, backward_order: list[torch.nn.Parameter]) -> list[tuple[list, int, int, int]]:
        """Group parameters into buckets and assign their buffer ranges (`self.param_ranges`); returns
        (parameters in buffer order, start, padded end, elements to sum over TP) per bucket."""
        groups: list[list[torch.nn.Parameter]] = []
        current: list[torch.nn.Parameter] = []
        current_numel = 0
        for param in backward_order:
            if current and (current[-1].dtype != param.dtype or current_numel >= self.bucket_size):
                groups.append(current)
                current, current_numel = [], 0
            current.append(param)
            current_numel += param.numel()
        if current:
            groups.append(current)
        plans = []
        offset = 0
        for group in groups:
            ordered = [p for p in group if _tp_grad_reduce(p)] + [p for p in group if not _tp_grad_reduce(p)]
            start = offset
            for param in ordered:
                self.param_ranges[id(param)] = (offset, offset + param.numel())
                offset += param.numel()
            dp = self.parallel_state.data_parallel_size
            offset += -(offset - start) % dp  # zero padding: the bucket splits evenly over DP ranks
            num_tp_reduce = sum(p.numel() for p in ordered if _tp_grad_reduce(p))
            plans.append((ordered, start, offset, num_tp_reduce))
        return plans

    def _embedding_group_params(self, named_params) -> list[torch.nn.Parameter]:
        """The `embedding_group_reduce` parameters by name; every rank of the embedding group must hold
        the same names (checked once here: a mismatch would hang or corrupt the reduction)."""
        named = [(n, p) for n, p in named_params if getattr(p, "embedding_group_reduce", False)]
        named.sort(key=lambda item: item[0])
        group = self.parallel_state.embedding_group
        names = [name for name, _ in named]
        per_rank = collectives.all_gather_object(names, group)
        if any(other != names for other in per_rank):
            raise RuntimeError(
                f"the ranks {list(group.ranks)} of the embedding group hold different embedding_group_reduce "
                f"parameters: {per_rank}"
            )
        return [param for _, param in named]

    def _attach(self, params: list[torch.nn.Parameter]) -> None:
        for param in params:
            lo, hi = self.param_ranges[id(param)]
            param.main_grad = self.data[lo:hi].view(param.shape)
            param.grad = param.main_grad if param.dtype == torch.float32 else None
            previous = getattr(param, "_grad_buffer_hook", None)
            if previous is not None:  # a second optimizer over the same model replaces the first
                previous.remove()
            param._grad_buffer_hook = param.register_post_accumulate_grad_hook(self._on_grad_ready)

    def param_range(self, param: torch.nn.Parameter) -> tuple[int, int]:
        """`[lo, hi)`: where `param`'s gradient lives in `self.data`."""
        return self.param_ranges[id(param)]

    def bucket_of(self, param: torch.nn.Parameter) -> Bucket:
        """The bucket holding `param`'s gradient."""
        return self._bucket_of[id(param)]

    # ------------------------------------------------------------------ per iteration
    def zero_grad(self) -> None:
        """Zero the buffer before the first micro-batch (waiting for reductions a skipped step left)."""
        self._wait_all()
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.started = False
        self.data.zero_()
        for bucket in self.buckets:
            for param in bucket.params:  # re-link fp32 grads that someone set to None
                if param.dtype == torch.float32:
                    param.grad = param.main_grad
        self._synced = False

    def start_backward(self, *, last_micro_batch: bool) -> None:
        """Called before each micro-batch's backward; reductions may start only in the last one's."""
        if self._synced:
            raise RuntimeError("backward after the gradients were reduced: call zero_grad() first")
        self._last_micro_batch = last_micro_batch

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate-grad hook: move the gradient into the buffer, start a complete bucket."""
        if param.grad is not None and param.grad.data_ptr() != param.main_grad.data_ptr():
            param.main_grad.add_(param.grad)  # half precision, or an fp32 grad someone set to None
            param.grad = param.main_grad if param.dtype == torch.float32 else None
        if not (self.overlap_grad_reduce and self._last_micro_batch):
            return
        bucket = self.bucket_of(param)
        if bucket.started:
            raise RuntimeError(
                f"the gradient of {self.names[id(param)]} changed after its bucket's reduction started: "
                "only the last micro-batch's backward may pass last_micro_batch=True"
            )
        bucket.ready.add(id(param))
        if len(bucket.ready) == len(bucket.params):
            self._start_reduction(bucket)

    def _start_reduction(self, bucket: Bucket) -> None:
        """Sum the bucket's `tp_grad_reduce` slice over TP, then start the DP sum of the whole bucket."""
        state = self.parallel_state
        if bucket.num_tp_reduce:
            collectives.all_reduce(bucket.data[: bucket.num_tp_reduce], state.tp_group)
        # An all-reduce also for the distributed optimizer, which reads only its owned slice (module doc).
        bucket.handle = collectives.all_reduce_async(bucket.data, state.dp_group)
        bucket.started = True

    def finish_grad_sync(self) -> None:
        """Reduce the buckets not started during backward, in bucket order, wait for all of them, then
        sum the tied embedding gradients over the embedding group. Idempotent until the next `zero_grad`."""
        if self._synced:
            return
        for bucket in self.buckets:
            if not bucket.started:
                self._start_reduction(bucket)
        self._wait_all()
        for param in self.embedding_params:  # tied embedding copies of the first and last stage
            collectives.all_reduce(param.main_grad, self.parallel_state.embedding_group)
        self._synced = True

    def _wait_all(self) -> None:
        for bucket in self.buckets:
            collectives.wait(bucket.handle)
            bucket.handle = None


@dataclass(eq=False)
class ParamFragment:
    """The elements `[param_start, param_start + numel)` of a flattened parameter that this DP rank owns,
    at `buffer_start` in the gradient buffer, with their fp32 master copy `main`."""

    param: torch.nn.Parameter
    param_start: int
    buffer_start: int
    numel: int
    main: torch.nn.Parameter


# Attributes the optimizer and the gradient norm read; masters and fragments carry them over.
SHARDING_ATTRIBUTES = (
    "no_weight_decay",
    "tensor_model_parallel",
    "partition_dim",
    "shared",
    "tp_grad_reduce",
    "full_shape",
    "pipeline_duplicate",
    "embedding_group_reduce",
)


def copy_sharding_attributes(source: torch.nn.Parameter, target: torch.nn.Parameter) -> None:
    """Carry `SHARDING_ATTRIBUTES` from a model parameter to its master copy or fragment."""
    for name in SHARDING_ATTRIBUTES:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


class ShardedMainParams:
    """ZeRO-1: fp32 master fragments of the slices of `grad_buffer`'s buckets this DP rank owns.

    `main_params` (1-D fp32 Parameters with sharding attributes, `.grad` = their slice of the gradient
    buffer) are what AdamW updates; `copy_to_model` all-gathers the updated parameters over DP.
    """

    def __init__(self, grad_buffer: GradBuffer) -> None:
        self.grad_buffer = grad_buffer
        state = grad_buffer.parallel_state
        self.fragments: list[ParamFragment] = []
        for bucket in grad_buffer.buckets:
            lo, hi = bucket.owned_range(state.data_parallel_rank, state.data_parallel_size)
            for param in bucket.params:
                p_lo, p_hi = grad_buffer.param_range(param)
                start, end = max(lo, p_lo), min(hi, p_hi)
                if start < end:
                    self.fragments.append(self._fragment(param, start - p_lo, start, end - start))
        self.main_params = [fragment.main for fragment in self.fragments]

    def _fragment(self, param, param_start: int, buffer_start: int, numel: int) -> ParamFragment:
        values = param.detach().view(-1)[param_start : param_start + numel]
        main = torch.nn.Parameter(values.to(torch.float32, copy=True))
        copy_sharding_attributes(param, main)
        main.grad = self.grad_buffer.data[buffer_start : buffer_start + numel]
        return ParamFragment(param, param_start, buffer_start, numel, main)

    @torch.no_grad()
    def load_from_model(self) -> None:
        """Refresh the masters from the model's parameters (after loading model weights)."""
        for fragment in self.fragments:
            start = fragment.param_start
            fragment.main.copy_(fragment.param.view(-1)[start : start + fragment.numel])

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write every DP rank's updated masters into every rank's model: one all-gather per bucket."""
        buffer, state = self.grad_buffer, self.grad_buffer.parallel_state
        by_bucket: dict[int, list[ParamFragment]] = {}
        for fragment in self.fragments:
            by_bucket.setdefault(buffer.bucket_of(fragment.param).index, []).append(fragment)
        for bucket in buffer.buckets:
            staging = torch.zeros(bucket.end - bucket.start, dtype=bucket.dtype, device=buffer.data.device)
            for fragment in by_bucket.get(bucket.index, []):
                offset = fragment.buffer_start - bucket.start
                staging[offset : offset + fragment.numel].copy_(fragment.main)
            chunks = list(staging.chunk(state.data_parallel_size))
            own = chunks[state.data_parallel_rank].clone()  # the input must not alias an output
            collectives.all_gather_into(chunks, own, state.dp_group)
            for param in bucket.params:
                p_lo, p_hi = buffer.param_range(param)
                param.view(-1).copy_(staging[p_lo - bucket.start : p_hi - bucket.start])


def _tp_grad_reduce(param: torch.nn.Parameter) -> bool:
    return bool(getattr(param, "tp_grad_reduce", False))
