"""Conjugate autograd collectives at the boundaries of tensor- and sequence-parallel regions.

Each function is a collective in forward and its adjoint in backward, over a tensor-parallel
`collectives.Group`. Activations are batch-first `[b, s, h]`: the sequence is dim 1, the hidden (or
vocabulary) features the last dim.

| function                                   | forward                 | backward                |
|--------------------------------------------|-------------------------|-------------------------|
| copy_to_tensor_parallel_region             | identity                | all-reduce              |
| reduce_from_tensor_parallel_region         | all-reduce              | identity                |
| gather_from_tensor_parallel_region         | all-gather last dim     | split last dim          |
| scatter_to_sequence_parallel_region        | split dim 1             | all-gather dim 1        |
| gather_from_sequence_parallel_region       | all-gather dim 1        | reduce-scatter dim 1    |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter dim 1    | all-gather dim 1        |

`reduce_scatter_add_to_sequence_parallel_region(x, addend)` is the last one plus a replicated addend's
chunk (the position embeddings), whose gradient is the whole all-gathered one on every rank.

On a group of size 1 every function returns its input unchanged (no autograd node), so the
single-process model computes exactly what it computes without them.

Copies. `reduce_from_tensor_parallel_region` sums in place: its input is a fresh partial product (a
row-parallel GEMM's output, the vocabulary-parallel lookup) that nothing else reads, and the autograd
node bumps its version counter, so a caller that did keep it for backward would get autograd's
in-place error, not a wrong gradient (a leaf that requires grad, or a non-contiguous input, is copied
first). The backward all-reduce of `copy_to_tensor_parallel_region` works on a copy: the gradient
handed to `backward` may be the very tensor autograd also passes to another input (an addition's
backward gives both operands the same tensor), so reducing it in place could corrupt a gradient
elsewhere. The column-parallel layers and the vocabulary-parallel loss
(`megatron.parallel.layers.column_parallel_linear`, `megatron.model.loss`) enter their region without
these functions: their input gradient is a GEMM output of their own, so they reduce it in place
(`start_input_grad_reduction`), and under sequence parallelism they keep only the sequence chunk for
backward and gather it again there (`start_input_gather`).
"""

from __future__ import annotations

import torch

from megatron.parallel import collectives
from megatron.parallel.collectives import Group

SEQUENCE_DIM = 1


def eager_apply(function: type[torch.autograd.Function]):
    """`function.apply` for an autograd Function that communicates, run eagerly while torch.compile
    traces a caller (`--torch-compile`): a graph break, since dynamo cannot trace the process-group
    calls nor the byte accounting around them. Without compilation it is `function.apply`."""
    return torch.compiler.disable(function.apply)


def start_input_gather(x: torch.Tensor, group: Group, sequence_parallel: bool) -> collectives.Pending:
    """Start rebuilding a TP region's input from what a layer kept: under sequence parallelism the
    all-gather of the chunk [b, s / tp, h] -> [b, s, h] along the sequence, else `x` itself (it is whole)."""
    if sequence_parallel:
        return collectives.all_gather_async(x, group, dim=SEQUENCE_DIM)
    return collectives.Pending(None, lambda: x)


def start_input_grad_reduction(
    grad: torch.Tensor, group: Group, sequence_parallel: bool
) -> collectives.Pending:
    """Start summing a TP region's input gradient [b, s, h] over `group`: under sequence parallelism
    reduce-scatter it to this rank's chunk [b, s / tp, h], else all-reduce it in place (`grad` must be
    the caller's own fresh tensor: a GEMM output nothing else holds)."""
    if sequence_parallel:
        return collectives.reduce_scatter_async(grad, group, dim=SEQUENCE_DIM)
    return collectives.Pending(collectives.all_reduce_async(grad, group), lambda: grad)


def check_sequence_split(seq_length: int, group: Group) -> None:
    """Raise ValueError unless a sequence of `seq_length` tokens splits evenly over `group`."""
    if seq_length % group.size:
        raise ValueError(
            f"sequence length {seq_length} is not divisible by tensor_model_parallel_size={group.size}: "
            "sequence parallelism splits the sequence evenly over the tensor-parallel ranks; use a "
            f"--seq-length that is a multiple of {group.size} or disable --sequence-parallel"
        )


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):  # a copy: `grad` may be shared with another input's gradient
        return collectives.all_reduce(grad.contiguous().clone(), ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        if not x.is_contiguous() or (x.is_leaf and x.requires_grad):
            return collectives.all_reduce(x.contiguous().clone(), group)
        collectives.all_reduce(x, group)  # in place (see the module docstring)
        # what mark_dirty would record (it cannot be used: x is a view a custom GEMM returned), so a
        # saved reference to x fails autograd's version check instead of computing with the sum
        torch.autograd.graph.increment_version(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return collectives.all_gather(x, group, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return collectives.split(grad, ctx.group, dim=-1), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return collectives.split(x, group, dim=SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return collectives.all_gather(grad, ctx.group, dim=SEQUENCE_DIM), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return collectives.all_gather(x, group, dim=SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return collectives.reduce_scatter(grad, ctx.group, dim=SEQUENCE_DIM), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return collectives.reduce_scatter(x, group, dim=SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return collectives.all_gather(grad, ctx.group, dim=SEQUENCE_DIM), None


class _ReduceScatterAddToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, addend, group):
        ctx.group, ctx.addend_shape = group, addend.shape
        chunk = x.shape[SEQUENCE_DIM] // group.size
        total = collectives.reduce_scatter(x, group, dim=SEQUENCE_DIM)  # [b, s/tp, h]
        return total + addend.narrow(-2, group.rank * chunk, chunk)

    @staticmethod
    def backward(ctx, grad):
        whole = collectives.all_gather(grad, ctx.group, dim=SEQUENCE_DIM)  # [b, s, h]
        return whole, whole.sum_to_size(ctx.addend_shape), None


_APPLY = {
    function: eager_apply(function)
    for function in (
        _CopyToTensorParallelRegion,
        _ReduceFromTensorParallelRegion,
        _GatherFromTensorParallelRegion,
        _ScatterToSequenceParallelRegion,
        _GatherFromSequenceParallelRegion,
        _ReduceScatterToSequenceParallelRegion,
        _ReduceScatterAddToSequenceParallelRegion,
    )
}


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward; backward sums the gradient over TP."""
    return x if group.is_trivial else _APPLY[_CopyToTensorParallelRegion](x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region by summing the partial outputs of every rank; backward passes the gradient on."""
    return x if group.is_trivial else _APPLY[_ReduceFromTensorParallelRegion](x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., n / tp] -> [..., n]: concatenate every rank's last-dim shard; backward keeps this rank's."""
    return x if group.is_trivial else _APPLY[_GatherFromTensorParallelRegion](x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, h] -> [b, s / tp, h]: keep this rank's sequence chunk; backward all-gathers the gradient."""
    if group.is_trivial:
        return x
    check_sequence_split(x.shape[SEQUENCE_DIM], group)
    return _APPLY[_ScatterToSequenceParallelRegion](x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s / tp, h] -> [b, s, h]: all-gather the sequence; backward reduce-scatters the gradient (each
    rank's gradient covers the whole sequence and is a partial sum)."""
    return x if group.is_trivial else _APPLY[_GatherFromSequenceParallelRegion](x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s / tp, h] of the total: sum over TP and keep this rank's sequence
    chunk; backward all-gathers the gradient."""
    if group.is_trivial:
        return x
    check_sequence_split(x.shape[SEQUENCE_DIM], group)
    return _APPLY[_ReduceScatterToSequenceParallelRegion](x, group)


def reduce_scatter_add_to_sequence_parallel_region(
    x: torch.Tensor, addend: torch.Tensor, group: Group
) -> torch.Tensor:
    """This rank's sequence chunk [b, s / tp, h] of `sum over TP of x + addend`: `x` [b, s, h] partial
    sums, `addend` [b, s, h] or [s, h] whole and identical on every rank (the position embeddings).

    One reduce-scatter (half the bytes of the all-reduce and split it replaces) then the addend's chunk.
    Backward all-gathers the gradient, which is `x`'s and, summed over broadcast dimensions, the addend's
    whole gradient on every rank: what it receives when `x` is all-reduced, the addend added and the
    sum split, so a replicated addend's gradient stays whole and identical without a reduction."""
    if group.is_trivial:
        return x + addend
    check_sequence_split(x.shape[SEQUENCE_DIM], group)
    return _APPLY[_ReduceScatterAddToSequenceParallelRegion](x, addend, group)
