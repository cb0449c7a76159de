"""Data parallelism on the training side: a contiguous fp32 gradient buffer reduced in buckets, and the
distributed optimizer's (ZeRO-1) sharded fp32 master weights over a contiguous parameter buffer.

Gradient buffer (`GradBuffer`)
- One flat fp32 tensor holds the gradient of every trainable parameter; `param.main_grad` is a view
  into it. fp32 parameters also get `param.grad` = that view, so autograd accumulates straight into the
  buffer (adding into a view of zeros is exact: one process computes what it computed without the
  buffer). bf16/fp16 parameters keep `param.grad` None: a post-accumulate-grad hook adds each fresh
  half-precision gradient into `main_grad`, so accumulation over micro-batches happens in fp32.
- The buffer is cut into buckets of about `bucket_size` elements, taking parameters in backward order
  (the reverse of `model.parameters()`, which is roughly when their gradients are produced). Each bucket
  is padded with zeros to a multiple of the data-parallel size so it splits evenly over the DP ranks.
  Inside a bucket the `tp_grad_reduce` parameters come first, so their tensor-parallel sum is one
  all-reduce of a contiguous slice. An `embedding_group_reduce` parameter (the tied word embedding of
  the first and the last pipeline stage) gets a bucket of its own, so that both stages' DP rank r own
  the same elements of it under the distributed optimizer. `bucket_layout` is the layout as a pure
  function of the parameters' sizes; the planner uses it too.
- Reduction of a bucket, in this order: (1) over the data-parallel group, a SUM (the loss is already
  the global-batch token mean, see training/step.py): an all-reduce, or with the distributed optimizer a
  reduce-scatter whose output is this rank's own chunk of the bucket, in place (half the bytes); (2) the
  `tp_grad_reduce` slice (partial sums on each TP rank: the multi-query K/V projection, and under
  sequence parallelism LayerNorms and row-parallel biases) summed over the tensor-parallel group, only
  the owned part of it with the distributed optimizer; (3) after every bucket, the tied embedding's
  gradient (its owned part) over `parallel_state.embedding_group`. Reducing over DP first and summing
  over TP last means every TP replica receives the result of one all-reduce: the replicas stay
  bit-identical whatever order each DP communicator sums in (NCCL does not promise one order across
  communicators). Likewise the two tied-embedding copies receive one all-reduce's result.
- With `overlap_grad_reduce`, the hooks count the parameters of each bucket whose gradient is final during
  the last micro-batch's backward; a complete bucket's DP reduction starts at once (asynchronously) while
  backward continues with earlier layers, and `finish_grad_sync` waits for each and runs steps (2) and (3).
  Without overlap, `finish_grad_sync` starts every bucket after backward. Both modes run exactly the same
  collectives on the same data, bucket by bucket, so their results are bit-identical. The same
  collectives run on gloo and NCCL.

Distributed optimizer (`ShardedMainParams`)
- DP rank r owns the r-th of the DP equal chunks of every bucket. The model's parameters are re-pointed
  (`param.data`) into a contiguous per-bucket buffer in the model dtype laid out like the gradient
  buffer (Megatron's parameter buffer). Per bucket the rank keeps an fp32 master of its own chunk (in
  fp32 training the own chunk itself, no copy); each parameter overlapping the chunk has a "fragment", a
  1-D master view whose `.grad` is the matching view of the gradient buffer. AdamW runs over the
  fragments (element-wise, so a fragment's update is the whole parameter's update restricted to it), and
  Adam's moments exist only for the owned range.
- After the step the masters are written into the own chunk of the parameter buffer (one copy per
  bucket, none in fp32) and every bucket is all-gathered over DP straight into the buffer, in place: the
  model's parameters are its views, so nothing else is copied. With `overlap_param_gather` the
  all-gathers are only started (in forward order) and each module's forward pre-hook waits for the
  buckets of its subtree's parameters (and of every earlier bucket) just before their first use in the
  next forward; weights read outside their module's forward (the tied output embedding) are waited for
  by the forward's first hook. Anything else that reads the parameters (checkpoint save, evaluation,
  the replica check) calls `finish_param_gather` first.

Bytes per step and rank (ring model, `collectives.wire_bytes`): `sync_wire_bytes` gives them per group
kind and collective from a `bucket_layout`, padding included; the planner prints them and the tests
compare them with what `collectives.COMM_BYTES` counts.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

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


@dataclass(frozen=True)
class BucketPlan:
    """Where one bucket's parameters live in the gradient buffer: `params` in buffer order (those with
    `tp_grad_reduce` first, their `num_tp_reduce` elements, then the others), `offsets` their starts,
    `[start, end)` the bucket with its zero padding (end - start divisible by the DP size), `embedding`
    True for the bucket of a lone `embedding_group_reduce` parameter."""

    params: tuple
    offsets: tuple[int, ...]
    start: int
    end: int
    num_tp_reduce: int
    embedding: bool

    def owned_range(self, data_parallel_rank: int, data_parallel_size: int) -> tuple[int, int]:
        """Buffer offsets `[lo, hi)` of this bucket's chunk owned by a DP rank (distributed optimizer)."""
        shard = (self.end - self.start) // data_parallel_size
        lo = self.start + data_parallel_rank * shard
        return lo, lo + shard

    def tp_reduce_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The part of `[lo, hi)` holding `tp_grad_reduce` gradients (empty: lo >= hi)."""
        return max(lo, self.start), min(hi, self.start + self.num_tp_reduce)

    def embedding_range(self, lo: int, hi: int) -> tuple[int, int]:
        """The part of `[lo, hi)` holding the tied embedding's gradient (empty unless `embedding`)."""
        if not self.embedding:
            return lo, lo
        return max(lo, self.offsets[0]), min(hi, self.offsets[0] + self.params[0].numel())


def _tp_grad_reduce(param) -> bool:
    return bool(getattr(param, "tp_grad_reduce", False))


def _embedding_group_reduce(param) -> bool:
    return bool(getattr(param, "embedding_group_reduce", False))


def _group_into_buckets(backward_order: list, bucket_size: int) -> list[list]:
    """Consecutive parameters, a new bucket at `bucket_size` elements or a dtype change; a tied
    embedding parameter alone in its bucket."""
    groups: list[list] = []
    current: list = []
    current_numel = 0
    for param in backward_order:
        alone = _embedding_group_reduce(param) or (current and _embedding_group_reduce(current[-1]))
        if current and (alone or current[-1].dtype != param.dtype or current_numel >= bucket_size):
            groups.append(current)
            current, current_numel = [], 0
        current.append(param)
        current_numel += param.numel()
    if current:
        groups.append(current)
    return groups


def bucket_layout(backward_order: list, bucket_size: int, data_parallel_size: int) -> list[BucketPlan]:
    """The buckets of parameters taken in `backward_order` (see the module docstring); parameters may
    live on the meta device (only sizes, dtypes and attributes are read)."""
    plans = []
    offset = 0
    for group in _group_into_buckets(backward_order, bucket_size):
        ordered = [p for p in group if _tp_grad_reduce(p)] + [p for p in group if not _tp_grad_reduce(p)]
        start, offsets = offset, []
        for param in ordered:
            offsets.append(offset)
            offset += param.numel()
        offset += -(offset - start) % data_parallel_size  # zero padding: splits evenly over DP ranks
        num_tp_reduce = sum(p.numel() for p in ordered if _tp_grad_reduce(p))
        embedding = len(ordered) == 1 and _embedding_group_reduce(ordered[0])
        plans.append(BucketPlan(tuple(ordered), tuple(offsets), start, offset, num_tp_reduce, embedding))
    return plans


def sync_wire_bytes(
    plans: list[BucketPlan],
    *,
    data_parallel_size: int,
    data_parallel_rank: int = 0,
    tensor_parallel_size: int,
    embedding_group_size: int,
    distributed_optimizer: bool,
    param_element_size: int,
) -> dict[tuple[str, str], Fraction]:
    """Bytes one rank sends per step to synchronise gradients and parameters, per (group kind,
    collective), under the ring model (`collectives.wire_bytes`), for the layout `plans`.

    Gradients are fp32 (4 bytes); `param_element_size` is the model dtype's (the distributed optimizer's
    all-gather). With the distributed optimizer the TP and embedding sums cover only the owned chunk,
    whose size depends on `data_parallel_rank` (rank 0 owns the start of each bucket, where the
    `tp_grad_reduce` slice lies: the most TP bytes)."""
    dp, out = data_parallel_size, {}

    def add(kind: str, op: str, nbytes: int, size: int) -> None:
        if size > 1 and nbytes > 0:
            out[(kind, op)] = out.get((kind, op), Fraction(0)) + collectives.wire_bytes(op, nbytes, size)

    for plan in plans:
        numel = plan.end - plan.start
        if distributed_optimizer:
            add("dp", "reduce_scatter", 4 * numel, dp)
            add("dp", "all_gather", param_element_size * numel, dp)
            lo, hi = plan.owned_range(data_parallel_rank, dp)
        else:
            add("dp", "all_reduce", 4 * numel, dp)
            lo, hi = plan.start, plan.end
        tp_lo, tp_hi = plan.tp_reduce_range(lo, hi)
        add("tp", "all_reduce", 4 * (tp_hi - tp_lo), tensor_parallel_size)
        e_lo, e_hi = plan.embedding_range(lo, hi)
        add("embedding", "all_reduce", 4 * (e_hi - e_lo), embedding_group_size)
    return out


@dataclass(eq=False)
class Bucket:
    """A bucket of the gradient buffer at run time: its `plan`, the buffer's `[start:end]` view `data`,
    and the state of its reductions (and, under the distributed optimizer, of its parameter buffer)."""

    index: int
    plan: BucketPlan
    dtype: torch.dtype  # of the model parameters (all the same within a bucket)
    data: torch.Tensor = field(repr=False)  # the gradient buffer's [start:end] view
    ready: set[int] = field(default_factory=set, repr=False)  # id() of params final in this backward
    started: bool = False
    handle: object | None = field(default=None, repr=False)
    param_data: torch.Tensor | None = field(default=None, repr=False)  # distributed optimizer only
    main_shard: torch.Tensor | None = field(default=None, repr=False)  # fp32 master of the own chunk
    param_handle: object | None = field(default=None, repr=False)  # a pending parameter all-gather

    @property
    def params(self) -> tuple:
        return self.plan.params

    @property
    def start(self) -> int:
        return self.plan.start

    @property
    def end(self) -> int:
        return self.plan.end

    @property
    def num_tp_reduce(self) -> int:
        return self.plan.num_tp_reduce

    def owned_range(self, data_parallel_rank: int, data_parallel_size: int) -> tuple[int, int]:
        """Buffer offsets `[lo, hi)` of this bucket's chunk owned by a DP rank (distributed optimizer)."""
        return self.plan.owned_range(data_parallel_rank, data_parallel_size)


class GradBuffer:
    """The fp32 gradient buffer of a model's trainable parameters, reduced over DP/TP in buckets.

    `named_params`: (name, parameter) pairs in `model.named_parameters()` order (shared parameters once,
    only those with requires_grad). `bucket_size` in elements (None: `default_bucket_size(dp)`).
    `shard_over_data_parallel` (distributed optimizer): each bucket is reduce-scattered into this rank's
    own chunk instead of all-reduced, and only that chunk is valid after `finish_grad_sync`.
    Attaching a new buffer to the same parameters detaches the previous one (its hooks are removed).
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        parallel_state: ParallelState,
        *,
        bucket_size: int | None = None,
        overlap_grad_reduce: bool = False,
        shard_over_data_parallel: bool = False,
    ) -> None:
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"--ddp-bucket-size must be a positive number of elements, got {bucket_size}")
        self.parallel_state = parallel_state
        self.overlap_grad_reduce = overlap_grad_reduce
        self.shard_over_data_parallel = shard_over_data_parallel
        self.bucket_size = bucket_size or default_bucket_size(parallel_state.data_parallel_size)
        self.names = {id(param): name for name, param in named_params}
        params = [param for _, param in named_params]
        for param in params:
            assert param.is_contiguous(), f"{self.names[id(param)]} is not contiguous"
        device = params[0].device if params else parallel_state.device
        plans = bucket_layout(list(reversed(params)), self.bucket_size, parallel_state.data_parallel_size)
        self.param_ranges: dict[int, tuple[int, int]] = {
            id(param): (offset, offset + param.numel())
            for plan in plans
            for param, offset in zip(plan.params, plan.offsets, strict=True)
        }
        self.data = torch.zeros(plans[-1].end if plans else 0, dtype=torch.float32, device=device)
        self.buckets = [
            Bucket(index, plan, plan.params[0].dtype, self.data[plan.start : plan.end])
            for index, plan in enumerate(plans)
        ]
        self._bucket_of = {id(param): bucket for bucket in self.buckets for param in bucket.params}
        self._check_embedding_group(named_params)
        self._last_micro_batch = True
        self._synced = False
        self.before_reduction = None  # called with each bucket, its gradients still local (a NaN check)
        self._attach(params)

    def _check_embedding_group(self, named_params) -> None:
        """Every rank of the embedding group must hold the same `embedding_group_reduce` parameter names
        and sizes (checked once here: a mismatch would hang or corrupt the reduction)."""
        named = sorted(
            (name, param.numel()) for name, param in named_params if _embedding_group_reduce(param)
        )
        group = self.parallel_state.embedding_group
        per_rank = collectives.all_gather_object(named, group)
        if any(other != named for other in per_rank):
            raise RuntimeError(
                f"the ranks {list(group.ranks)} of the embedding group hold different embedding_group_reduce "
                f"parameters: {per_rank}"
            )

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

    def valid_range(self, bucket: Bucket) -> tuple[int, int]:
        """Buffer offsets of `bucket` whose gradients are fully reduced after `finish_grad_sync`: the own
        chunk under the distributed optimizer, else the whole bucket."""
        if self.shard_over_data_parallel:
            state = self.parallel_state
            return bucket.owned_range(state.data_parallel_rank, state.data_parallel_size)
        return bucket.start, bucket.end

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
        """Start the DP sum of the bucket: a reduce-scatter into the own chunk (in place) under the
        distributed optimizer, else an all-reduce."""
        dp_group = self.parallel_state.dp_group
        if self.before_reduction is not None:
            self.before_reduction(bucket)
        if self.shard_over_data_parallel:
            lo, hi = self.valid_range(bucket)
            bucket.handle = collectives.reduce_scatter_tensor_async(self.data[lo:hi], bucket.data, dp_group)
        else:
            bucket.handle = collectives.all_reduce_async(bucket.data, dp_group)
        bucket.started = True

    def _finish_reduction(self, bucket: Bucket) -> None:
        """Wait for the bucket's DP sum, then sum its (valid) `tp_grad_reduce` slice over TP."""
        collectives.wait(bucket.handle)
        bucket.handle = None
        lo, hi = bucket.plan.tp_reduce_range(*self.valid_range(bucket))
        if lo < hi:
            collectives.all_reduce(self.data[lo:hi], self.parallel_state.tp_group)

    def finish_grad_sync(self) -> None:
        """Start the buckets not started during backward, in bucket order; wait for each and sum its
        TP-partial slice over TP; then sum the tied embedding over the embedding group. Idempotent until
        the next `zero_grad`."""
        if self._synced:
            return
        for bucket in self.buckets:
            if not bucket.started:
                self._start_reduction(bucket)
        for bucket in self.buckets:
            self._finish_reduction(bucket)
        for bucket in self.buckets:  # tied embedding copies of the first and last stage
            lo, hi = bucket.plan.embedding_range(*self.valid_range(bucket))
            if lo < hi:
                collectives.all_reduce(self.data[lo:hi], self.parallel_state.embedding_group)
        self._synced = True

    def _wait_all(self) -> None:
        for bucket in self.buckets:
            collectives.wait(bucket.handle)
            bucket.handle = None


@dataclass(eq=False)
class ParamFragment:
    """The elements `[param_start, param_start + numel)` of a flattened parameter that this DP rank owns,
    at `buffer_start` in the gradient buffer, with their fp32 master `main` (a view of the bucket's
    master shard)."""

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
    """ZeRO-1 over `grad_buffer` (built with `shard_over_data_parallel`): the model's parameters moved into
    a per-bucket parameter buffer, and fp32 master fragments of this DP rank's own chunks.

    `main_params` (1-D fp32 Parameters with sharding attributes, `.grad` = their slice of the gradient
    buffer) are what AdamW updates; `copy_to_model` all-gathers the updated parameters over DP into the
    parameter buffer (`start_param_gather` + `finish_param_gather`; see the module docstring).
    """

    def __init__(self, grad_buffer: GradBuffer, *, overlap_param_gather: bool = False) -> None:
        assert grad_buffer.shard_over_data_parallel, "the distributed optimizer needs a sharded GradBuffer"
        self.grad_buffer = grad_buffer
        self.overlap_param_gather = overlap_param_gather
        self.fragments: list[ParamFragment] = []
        for bucket in grad_buffer.buckets:
            self._move_into_param_buffer(bucket)
            self.fragments.extend(self._bucket_fragments(bucket))
        self.main_params = [fragment.main for fragment in self.fragments]
        self._pending: deque[Bucket] = deque()  # started parameter all-gathers, in start order
        self._first_wait: int | None = None  # set per gather: see `register_forward_pre_hooks`
        self._hooked: list[torch.nn.Module] = []  # modules with a forward pre-hook
        self._ran: set[int] | None = None  # id() of hooked modules whose forward ran (None: no hooks)
        self._first_wait_cache: tuple[int, int] = (-1, 0)  # (len(self._ran), its _first_wait_index)

    def _own_chunk(self, bucket: Bucket) -> torch.Tensor:
        state = self.grad_buffer.parallel_state
        return bucket.param_data.chunk(state.data_parallel_size)[state.data_parallel_rank]

    @torch.no_grad()
    def _move_into_param_buffer(self, bucket: Bucket) -> None:
        """Re-point the bucket's parameters into a new contiguous buffer laid out like the gradient
        bucket (padding zero), and create the fp32 master of this rank's own chunk."""
        device = self.grad_buffer.data.device
        bucket.param_data = torch.zeros(bucket.end - bucket.start, dtype=bucket.dtype, device=device)
        for param in bucket.params:
            lo, hi = self.grad_buffer.param_range(param)
            view = bucket.param_data[lo - bucket.start : hi - bucket.start].view(param.shape)
            view.copy_(param.detach())
            param.data = view
        own = self._own_chunk(bucket)
        bucket.main_shard = own if bucket.dtype == torch.float32 else own.to(torch.float32, copy=True)

    def _bucket_fragments(self, bucket: Bucket) -> list[ParamFragment]:
        """A fragment (master view, gradient view) per parameter overlapping the own chunk."""
        lo, hi = self.grad_buffer.valid_range(bucket)
        fragments = []
        for param in bucket.params:
            p_lo, p_hi = self.grad_buffer.param_range(param)
            start, end = max(lo, p_lo), min(hi, p_hi)
            if start < end:
                main = torch.nn.Parameter(bucket.main_shard[start - lo : end - lo])
                copy_sharding_attributes(param, main)
                main.grad = self.grad_buffer.data[start:end]
                fragments.append(ParamFragment(param, start - p_lo, start, end - start, main))
        return fragments

    @torch.no_grad()
    def load_from_model(self) -> None:
        """Refresh the masters from the model's parameters (after loading model weights)."""
        self.finish_param_gather()
        for bucket in self.grad_buffer.buckets:
            own = self._own_chunk(bucket)
            if bucket.main_shard.data_ptr() != own.data_ptr():
                bucket.main_shard.copy_(own)

    @torch.no_grad()
    def start_param_gather(self) -> None:
        """Write the updated masters into the own chunks and start the all-gather of every bucket over
        DP into its parameter buffer, in forward order (the last bucket holds the first layers)."""
        self.finish_param_gather()  # never two gathers into one buffer
        if self._ran is not None:
            if self._first_wait_cache[0] != len(self._ran):  # recomputed only while new modules run
                self._first_wait_cache = (len(self._ran), self._first_wait_index())
            self._first_wait = self._first_wait_cache[1]
        dp_group = self.grad_buffer.parallel_state.dp_group
        for bucket in reversed(self.grad_buffer.buckets):
            own = self._own_chunk(bucket)
            if bucket.main_shard.data_ptr() != own.data_ptr():
                own.copy_(bucket.main_shard)  # rounds to the model dtype
            bucket.param_handle = collectives.all_gather_into_tensor_async(bucket.param_data, own, dp_group)
            self._pending.append(bucket)

    def finish_param_gather(self, down_to: int = 0) -> None:
        """Wait for the pending parameter all-gathers of the buckets with index >= `down_to` (all by
        default): gathers complete in start order, so this waits for nothing that a later wait would
        not have."""
        while self._pending and self._pending[0].index >= down_to:
            bucket = self._pending.popleft()
            collectives.wait(bucket.param_handle)
            bucket.param_handle = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Bring every rank's updated masters into every rank's model: the all-gathers, waited for unless
        `overlap_param_gather` (then the next forward's pre-hooks wait)."""
        self.start_param_gather()
        if not self.overlap_param_gather:
            self.finish_param_gather()

    def register_forward_pre_hooks(self, model: torch.nn.Module) -> None:
        """Before each module's forward (every module below `model`), wait for the all-gathers of the
        buckets holding the parameters of its subtree (a module may read its children's weights without
        calling them) and of every bucket started before those (the earlier layers). A parameter outside
        the subtree of every module whose forward has run so far is read by the model itself (the tied
        output embedding of the last stage): the first hook of a forward waits for its bucket too.
        Replaces the hooks of an earlier optimizer over the same model."""
        for handle in getattr(model, "_param_gather_hooks", []):
            handle.remove()
        bucket_index = {id(p): bucket.index for bucket in self.grad_buffer.buckets for p in bucket.params}
        self._ran, self._hooked, handles = set(), [], []
        self._first_wait_cache = (-1, 0)
        for module in model.modules():
            indices = [bucket_index[id(p)] for p in module.parameters() if id(p) in bucket_index]
            if module is not model and indices:
                hook = functools.partial(self._before_forward, min(indices))
                handles.append(module.register_forward_pre_hook(hook))
                self._hooked.append(module)
        model._param_gather_hooks = handles

    def _first_wait_index(self) -> int:
        """The lowest bucket index holding a parameter that no module whose forward ran holds in its
        subtree (before any forward: every bucket)."""
        covered = {id(p) for module in self._hooked if id(module) in self._ran for p in module.parameters()}
        indices = [
            bucket.index for bucket in self.grad_buffer.buckets for p in bucket.params if id(p) not in covered
        ]
        return min(indices, default=len(self.grad_buffer.buckets))

    def _before_forward(self, bucket_index: int, module, args) -> None:
        self._ran.add(id(module))
        if self._pending:
            if self._first_wait is not None:
                bucket_index, self._first_wait = min(bucket_index, self._first_wait), None
            self.finish_param_gather(bucket_index)
