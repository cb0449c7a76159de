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

On a group of size 1 every function returns its input unchanged (no autograd node), so the
single-process model computes exactly what it computes without them.

The all-reduces work on a copy: a gradient handed to `backward` may be the very tensor autograd also
passes to another input (an addition's backward gives both operands the same tensor), so reducing it
in place could corrupt a gradient elsewhere. The copy costs one pass over `[b, s, h]`, small next to
the collective.
"""

from __future__ import annotations

import torch

from megatron.parallel import collectives
from megatron.parallel.collectives import Group

SEQUENCE_DIM = 1


def _all_reduce(tensor: torch.Tensor, group: Group) -> torch.Tensor:
    return collectives.all_reduce(tensor.contiguous().clone(), group)


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
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

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


def copy_to_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward; backward sums the gradient over TP."""
    return x if group.is_trivial else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Leave a TP region by summing the partial outputs of every rank; backward passes the gradient on."""
    return x if group.is_trivial else _ReduceFromTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., n / tp] -> [..., n]: concatenate every rank's last-dim shard; backward keeps this rank's."""
    return x if group.is_trivial else _GatherFromTensorParallelRegion.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, h] -> [b, s / tp, h]: keep this rank's sequence chunk; backward all-gathers the gradient."""
    if group.is_trivial:
        return x
    check_sequence_split(x.shape[SEQUENCE_DIM], group)
    return _ScatterToSequenceParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s / tp, h] -> [b, s, h]: all-gather the sequence; backward reduce-scatters the gradient (each
    rank's gradient covers the whole sequence and is a partial sum)."""
    return x if group.is_trivial else _GatherFromSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[b, s, h] partial sums -> [b, s / tp, h] of the total: sum over TP and keep this rank's sequence
    chunk; backward all-gathers the gradient."""
    if group.is_trivial:
        return x
    check_sequence_split(x.shape[SEQUENCE_DIM], group)
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)
