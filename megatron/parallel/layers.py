"""Tensor-parallel leaf layers: column-, row- and vocabulary-parallel, each holding this rank's shard.

- `ColumnParallelLinear(in, out)`: weight [out / tp, in] and bias [out / tp] (output features split).
  Its input enters the TP region inside its own GEMM (`column_parallel_linear`): the replicated
  activations (backward all-reduces the input gradient), or under sequence parallelism this rank's
  sequence chunk, all-gathered for the GEMM (backward reduce-scatters the input gradient). The output
  stays split: [b, s, out / tp].
- `column_parallel_linear(x, weights, biases, group, sequence_parallel=...)`: that GEMM as a function,
  for the fused multi-query projection (the query and the replicated K/V weights read one input) and
  the output embedding. Under sequence parallelism it keeps only the chunk [b, s / tp, in] for backward,
  not the gathered [b, s, in] (tp times less: at 15B, TP 4, bf16, s 8192, micro-batch 1 that is 25 MB
  instead of 101 MB per column-parallel input, two per layer: 151 MB less per layer). Backward, as Megatron's
  LinearWithGradAccumulationAndAsyncCommunication: start re-gathering the chunk, compute the input
  gradient meanwhile, start reducing it (reduce-scatter under sequence parallelism, else an in-place
  all-reduce), compute the weight gradients meanwhile, wait. The GEMMs are the ones `kernels.linear` /
  `kernels.concat_linear` run on the gathered input, so the gradients are the same numbers.
- `RowParallelLinear(in, out)`: weight [out, in / tp] (input features split) and a whole bias [out].
  The partial products are summed over TP by an all-reduce, or under sequence parallelism by a
  reduce-scatter to this rank's sequence chunk, and the bias is added after the sum (once, not tp times).
- `VocabParallelEmbedding(V, h)`: rows [V / tp, h] of the vocabulary; ids outside this rank's range
  look up zeros and the all-reduce fills them in from the rank that holds them.

Every parameter carries the sharding facts the optimizer, gradient norm, checkpoint and debug code read
(see `set_sharding_attributes`); `megatron.model.layers` adds the init and weight-decay facts.

The local GEMMs use the CPU kernels of `megatron.kernels` (oneDNN forward, GEMV bias gradient), as the
plain layers at TP 1 do, so a shard computes with the same kernels as the whole layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron import kernels
from megatron.parallel import collectives, mappings
from megatron.parallel.collectives import TRIVIAL, Group


def set_sharding_attributes(
    param: nn.Parameter,
    *,
    partition_dim: int,
    full_shape: tuple[int, ...],
    tensor_model_parallel: bool,
    tp_grad_reduce: bool = False,
) -> None:
    """The sharding facts of one parameter.

    - `tensor_model_parallel`: split across the TP ranks along `partition_dim` (-1: held whole).
    - `full_shape`: the logical (TP 1) shape; `param.shape` for tensors held whole.
    - `tp_grad_reduce`: this rank's gradient is a partial sum that must be summed over the TP group after
      backward (the multi-query K/V projection at TP > 1; LayerNorms and row-parallel biases under
      sequence parallelism).
    """
    param.tensor_model_parallel = tensor_model_parallel
    param.partition_dim = partition_dim
    param.full_shape = tuple(full_shape)
    param.tp_grad_reduce = tp_grad_reduce


def _tensor_parallel_size(parallel_state) -> int:
    return 1 if parallel_state is None else parallel_state.tensor_model_parallel_size


def _shard(size: int, parallel_state, what: str) -> int:
    tp = _tensor_parallel_size(parallel_state)
    if size % tp:
        raise ValueError(f"{what}={size} is not divisible by tensor_model_parallel_size={tp}")
    return size // tp


def _uniform_(weight: torch.Tensor, bias: torch.Tensor | None, fan_in: int) -> None:
    # PyTorch's default nn.Linear init (kaiming-uniform with a=sqrt(5) = U(+-1/sqrt(fan_in))) over the
    # full fan-in; GPTModel.init_weights replaces it with the layout-invariant init.
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        if bias is not None:
            bias.uniform_(-bound, bound)


class ColumnParallelLinear(nn.Module):
    """Linear with its output features split across TP ranks: [b, s(/tp), in] -> [b, s, out / tp]."""

    def __init__(self, in_features: int, out_features: int, parallel_state, *, device=None, dtype=None):
        super().__init__()
        local = _shard(out_features, parallel_state, "output features")
        self.in_features, self.out_features = in_features, out_features
        self.group: Group = parallel_state.tp_group
        self.sequence_parallel = parallel_state.sequence_parallel
        self.weight = nn.Parameter(torch.empty(local, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(local, device=device, dtype=dtype))
        split = parallel_state.tensor_model_parallel_size > 1
        set_sharding_attributes(
            self.weight, partition_dim=0, full_shape=(out_features, in_features), tensor_model_parallel=split
        )
        set_sharding_attributes(
            self.bias, partition_dim=0, full_shape=(out_features,), tensor_model_parallel=split
        )
        _uniform_(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(
            x, [self.weight], [self.bias], self.group, sequence_parallel=self.sequence_parallel
        )

    def forward_fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """This layer's GEMM fused with another linear reading the same TP-region input (the replicated
        multi-query K/V projection): [b, s(/tp), in] -> [b, s, out / tp + weight rows]."""
        return column_parallel_linear(
            x, [self.weight, weight], [self.bias, bias], self.group, sequence_parallel=self.sequence_parallel
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp={self.group.size}"


def _gemm(x: torch.Tensor, weights, biases) -> torch.Tensor:
    """x [..., in] @ cat(weights).T + cat(biases) (biases may be None), as `kernels.linear` computes it."""
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    bias = None if biases[0] is None else biases[0] if len(biases) == 1 else torch.cat(biases)
    out = kernels.matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class _ColumnParallelLinear(torch.autograd.Function):
    """`column_parallel_linear` (see the module docstring). Inputs: x, group, sequence_parallel, then
    weight and bias of each fused linear (biases all None or all tensors)."""

    @staticmethod
    def forward(ctx, x, group, sequence_parallel, *params):
        weights, biases = params[0::2], params[1::2]
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.sizes = [weight.shape[0] for weight in weights]
        ctx.save_for_backward(x, *weights)  # x as given: the sequence chunk under sequence parallelism
        whole = mappings.start_input_gather(x, group, sequence_parallel).wait()  # [b, s, in]
        return _gemm(whole, weights, biases)

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        gathering = mappings.start_input_gather(x, ctx.group, ctx.sequence_parallel)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        reducing = None
        if ctx.needs_input_grad[0]:  # grad @ W while the input is gathered
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            grad_x = kernels.matmul_nt(grad_2d, weight.t()).view(*grad_out.shape[:-1], weight.shape[1])
            reducing = mappings.start_input_grad_reduction(grad_x, ctx.group, ctx.sequence_parallel)
        whole = gathering.wait()
        needs = ctx.needs_input_grad[3:]
        weight_grads = bias_grads = [None] * len(weights)
        if any(needs[0::2]):  # the weight gradients while the input gradient is reduced
            weight_grads = (grad_2d.t() @ whole.reshape(-1, whole.shape[-1])).split(ctx.sizes)
        if any(needs[1::2]):
            bias_grads = kernels.bias_grad(grad_2d).split(ctx.sizes)
        grad_x = None if reducing is None else reducing.wait()
        params = [grad for pair in zip(weight_grads, bias_grads) for grad in pair]
        return grad_x, None, None, *params


_column_parallel_linear_apply = mappings.eager_apply(_ColumnParallelLinear)


def column_parallel_linear(
    x: torch.Tensor, weights: list, biases: list, group: Group, *, sequence_parallel: bool
) -> torch.Tensor:
    """x @ cat(weights).T + cat(biases) on the tensor-parallel region's input: x [b, s / tp, in] under
    sequence parallelism (this rank's chunk), else [b, s, in] whole on every rank -> [b, s, sum of rows].
    `biases` lists one bias (or None) per weight. See the module docstring for what it saves and how
    backward overlaps its collectives. On a trivial group it is `kernels.linear` / `concat_linear`."""
    if group.is_trivial or torch.is_autocast_enabled(x.device.type) or x.dtype != weights[0].dtype:
        # one process; or autocast / mixed dtypes, which the kernels leave to torch: the mapping, then the
        # GEMM (which keeps the gathered input under sequence parallelism)
        enter = (
            mappings.gather_from_sequence_parallel_region
            if sequence_parallel
            else mappings.copy_to_tensor_parallel_region
        )
        region = enter(x, group)  # x itself on a trivial group
        if len(weights) == 2:
            return kernels.concat_linear(region, weights[0], biases[0], weights[1], biases[1])
        return kernels.linear(region, weights[0], biases[0])
    params = [tensor for pair in zip(weights, biases) for tensor in pair]
    return _column_parallel_linear_apply(x, group, sequence_parallel, *params)


class RowParallelLinear(nn.Module):
    """Linear with its input features split across TP ranks: [b, s, in / tp] -> [b, s(/tp), out]."""

    def __init__(self, in_features: int, out_features: int, parallel_state, *, device=None, dtype=None):
        super().__init__()
        local = _shard(in_features, parallel_state, "input features")
        self.in_features, self.out_features = in_features, out_features
        self.group: Group = parallel_state.tp_group
        self.sequence_parallel = parallel_state.sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, local, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        split = parallel_state.tensor_model_parallel_size > 1
        set_sharding_attributes(
            self.weight, partition_dim=1, full_shape=(out_features, in_features), tensor_model_parallel=split
        )
        # under sequence parallelism the bias is added to this rank's sequence chunk only: its gradient
        # is this chunk's share of the sum over tokens
        set_sharding_attributes(
            self.bias,
            partition_dim=-1,
            full_shape=(out_features,),
            tensor_model_parallel=False,
            tp_grad_reduce=self.sequence_parallel,
        )
        _uniform_(self.weight, self.bias, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = kernels.linear(x, self.weight, None)  # [b, s, out], this rank's share of the sum
        if self.sequence_parallel:
            total = mappings.reduce_scatter_to_sequence_parallel_region(partial, self.group)  # [b, s/tp, out]
        else:
            total = mappings.reduce_from_tensor_parallel_region(partial, self.group)  # [b, s, out]
        return kernels.add_bias(total, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tp={self.group.size}"


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocabulary rows are split across TP ranks: tokens [b, s] -> [b, s, h] (whole,
    identical on every TP rank). Rank r holds rows [r * V / tp, (r + 1) * V / tp)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, parallel_state, *, device=None, dtype=None):
        super().__init__()
        tp = _tensor_parallel_size(parallel_state)
        if num_embeddings % tp:
            raise ValueError(
                f"vocabulary size {num_embeddings} is not divisible by tensor_model_parallel_size={tp}; "
                "pad it with --make-vocab-size-divisible-by (the padded size is a multiple of that times the "
                "tensor-parallel size) or pass a --vocab-size divisible by it"
            )
        local = num_embeddings // tp
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.group: Group = parallel_state.tp_group
        self.vocab_start = parallel_state.tensor_model_parallel_rank * local
        self.vocab_end = self.vocab_start + local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, device=device, dtype=dtype))
        set_sharding_attributes(
            self.weight,
            partition_dim=0,
            full_shape=(num_embeddings, embedding_dim),
            tensor_model_parallel=tp > 1,
        )
        with torch.no_grad():
            self.weight.normal_()  # nn.Embedding's default; init_weights replaces it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.group.is_trivial:
            return F.embedding(tokens, self.weight)
        return mappings.reduce_from_tensor_parallel_region(self.partial(tokens), self.group)

    def partial(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> [b, s, h]: the rows this rank holds, zeros for the others. Summed over the
        group it is the lookup (one rank holds each row, so the sum is exact in any order); under
        sequence parallelism the embedding reduce-scatters it instead of all-reducing."""
        if self.group.is_trivial:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)  # [b, s]
        local_ids = (tokens - self.vocab_start).masked_fill(outside, 0)
        return F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [b, s, h]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end})"


def gather_tensor(tensor: torch.Tensor, like: nn.Parameter, group: Group) -> torch.Tensor:
    """The full (logical) tensor of which `tensor` is this rank's shard laid out as parameter `like`
    (a parameter or its gradient): all-gathered over `group` along `like.partition_dim` when `like` is
    split, else `tensor` itself. Collective over `group` for split parameters."""
    if getattr(like, "tensor_model_parallel", False) and not group.is_trivial:
        tensor = collectives.all_gather(tensor, group, dim=like.partition_dim)
    return tensor


def full_state_dict(model: nn.Module, parallel_state=None) -> dict[str, torch.Tensor]:
    """Logical parameter name -> the full tensor, on the CPU, identical on every rank: gathered over the
    tensor-parallel group and, under pipeline parallelism, over the pipeline group (each stage adds the
    names it holds; the last stage's `pipeline_duplicate` copy of the tied word embedding is skipped, so
    every name appears once). Ordered as the one-process model's `state_dict`.

    Collective over the tensor- and pipeline-parallel groups: every rank of the replica must call it.
    """
    tp_group = TRIVIAL if parallel_state is None else parallel_state.tp_group
    pp_group = TRIVIAL if parallel_state is None else parallel_state.pp_group
    result = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if getattr(tensor, "pipeline_duplicate", False):
            continue
        full = gather_tensor(tensor.detach(), tensor, tp_group)
        expected = getattr(tensor, "full_shape", tuple(full.shape))
        assert tuple(full.shape) == tuple(expected), (
            f"{name}: gathered {tuple(full.shape)}, expected {expected}"
        )
        result[name] = full.to("cpu", copy=True)
    if pp_group.is_trivial:
        return result
    merged = {}
    for stage, stage_result in enumerate(collectives.all_gather_object(result, pp_group)):
        repeated = merged.keys() & stage_result.keys()
        assert not repeated, f"pipeline stage {stage} holds {sorted(repeated)} as well as an earlier stage"
        merged.update(stage_result)
    return {name: merged[name] for name in sorted(merged, key=_logical_order)}


def _logical_order(name: str) -> tuple[int, int]:
    """Sort key of the one-process model's order: embedding, layers by index, then the output end
    (sorting is stable, so names within a layer keep their order)."""
    if name.startswith("embedding."):
        return (0, 0)
    if name.startswith("layers."):
        return (1, int(name.split(".")[1]))
    return (2, 0)
