"""Leaf layers of the model: the one place where tensor parallelism plugs in.

Every linear, embedding and LayerNorm of `GPTModel` is built by a factory here. At tensor-parallel size 1
(or without a `parallel_state`) they return plain `Linear` / `nn.Embedding` / `nn.LayerNorm`, exactly the
single-process model; at TP > 1 the column- and row-parallel linears and the vocabulary-parallel
embedding of `megatron.parallel.layers`, which hold this rank's shard and compute with the same kernels
(`megatron.kernels`).

Each parameter carries the facts the optimizer, gradient-norm, checkpoint and parallel code read (nobody
re-derives them from names):
- `tensor_model_parallel` (bool): the tensor is split across tensor-parallel ranks (False at TP=1).
- `partition_dim` (int): the dimension tensor parallelism splits (0 for column-parallel weights/biases
  and the vocabulary embedding, 1 for row-parallel weights), -1 for tensors every rank holds whole
  (LayerNorm, row-parallel biases, position embeddings, the shared multi-query key/value projection).
- `full_shape` (tuple): the logical (TP=1) shape; `param.shape` for tensors held whole.
- `tp_grad_reduce` (bool): this rank's gradient is a partial sum to be summed over the TP group after
  backward: the multi-query key/value projection at TP > 1, and under sequence parallelism every
  LayerNorm weight/bias and row-parallel bias. Always False at TP=1.
- `no_weight_decay` (bool): True on biases and LayerNorm parameters.
- `init_method` (str) and `init_std` (float): how `megatron.model.init` draws it ("normal" with std,
  "zeros" or "ones"); the full tensor is drawn and this rank's slice kept.
"""

from __future__ import annotations

from torch import nn

from megatron.kernels import Linear
from megatron.parallel import layers as parallel_layers


def _tensor_parallel_size(parallel_state) -> int:
    return 1 if parallel_state is None else parallel_state.tensor_model_parallel_size


def sequence_parallel(parallel_state) -> bool:
    """True when activations outside the TP regions are split along the sequence (TP > 1 with sequence
    parallelism; `parallel_state` None is one process)."""
    return _tensor_parallel_size(parallel_state) > 1 and parallel_state.sequence_parallel


def set_init_attributes(
    param: nn.Parameter, *, init_method: str, init_std: float = 0.0, no_weight_decay: bool = False
) -> None:
    """Attach the init and weight-decay facts described in the module docstring."""
    param.no_weight_decay = no_weight_decay
    param.init_method = init_method
    param.init_std = init_std


def set_param_attributes(
    param: nn.Parameter,
    *,
    partition_dim: int,
    init_method: str,
    init_std: float = 0.0,
    no_weight_decay: bool = False,
    tensor_model_parallel: bool = False,
    tp_grad_reduce: bool = False,
) -> None:
    """Attach every fact described in the module docstring to a parameter held in full (its
    `full_shape` is its shape); the tensor-parallel layers set their own sharding facts."""
    parallel_layers.set_sharding_attributes(
        param,
        partition_dim=partition_dim,
        full_shape=tuple(param.shape),
        tensor_model_parallel=tensor_model_parallel,
        tp_grad_reduce=tp_grad_reduce,
    )
    set_init_attributes(param, init_method=init_method, init_std=init_std, no_weight_decay=no_weight_decay)


def _linear(
    in_features, out_features, *, init_std, weight_dim, bias_dim, device, dtype, tp_grad_reduce=False
) -> nn.Linear:
    layer = Linear(in_features, out_features, bias=True, device=device, dtype=dtype)
    set_param_attributes(
        layer.weight,
        partition_dim=weight_dim,
        init_method="normal",
        init_std=init_std,
        tp_grad_reduce=tp_grad_reduce,
    )
    set_param_attributes(
        layer.bias,
        partition_dim=bias_dim,
        init_method="zeros",
        no_weight_decay=True,
        tp_grad_reduce=tp_grad_reduce,
    )
    return layer


def _with_linear_init(layer: nn.Module, init_std: float) -> nn.Module:
    set_init_attributes(layer.weight, init_method="normal", init_std=init_std)
    set_init_attributes(layer.bias, init_method="zeros", no_weight_decay=True)
    return layer


def column_linear(in_features, out_features, *, init_std, parallel_state=None, device=None, dtype=None):
    """Linear whose output features are split across tensor-parallel ranks (weight [out, in], bias)."""
    if _tensor_parallel_size(parallel_state) == 1:
        return _linear(
            in_features, out_features, init_std=init_std, weight_dim=0, bias_dim=0, device=device, dtype=dtype
        )
    layer = parallel_layers.ColumnParallelLinear(
        in_features, out_features, parallel_state, device=device, dtype=dtype
    )
    return _with_linear_init(layer, init_std)


def row_linear(in_features, out_features, *, init_std, parallel_state=None, device=None, dtype=None):
    """Linear whose input features are split across tensor-parallel ranks (output summed over ranks)."""
    if _tensor_parallel_size(parallel_state) == 1:
        return _linear(
            in_features,
            out_features,
            init_std=init_std,
            weight_dim=1,
            bias_dim=-1,
            device=device,
            dtype=dtype,
        )
    layer = parallel_layers.RowParallelLinear(
        in_features, out_features, parallel_state, device=device, dtype=dtype
    )
    return _with_linear_init(layer, init_std)


def replicated_linear(in_features, out_features, *, init_std, parallel_state=None, device=None, dtype=None):
    """Linear held whole on every tensor-parallel rank, fed the TP region's input next to a
    column-parallel layer: the shared multi-query key/value projection.

    At TP > 1 each rank's output gradient only holds its own query heads' share, so the weight and bias
    gradients are partial sums (`tp_grad_reduce`; the reasoning is in `SelfAttention._project_multi_query`). A
    missing sum here was a defect of the original StarCoder training code (docs/parallelism.md).
    """
    return _linear(
        in_features,
        out_features,
        init_std=init_std,
        weight_dim=-1,
        bias_dim=-1,
        device=device,
        dtype=dtype,
        tp_grad_reduce=_tensor_parallel_size(parallel_state) > 1,
    )


def vocab_embedding(num_embeddings, embedding_dim, *, init_std, parallel_state=None, device=None, dtype=None):
    """Word embedding whose rows (the vocabulary) are split across tensor-parallel ranks."""
    if _tensor_parallel_size(parallel_state) == 1:
        embedding = nn.Embedding(num_embeddings, embedding_dim, device=device, dtype=dtype)
        set_param_attributes(embedding.weight, partition_dim=0, init_method="normal", init_std=init_std)
        return embedding
    embedding = parallel_layers.VocabParallelEmbedding(
        num_embeddings, embedding_dim, parallel_state, device=device, dtype=dtype
    )
    set_init_attributes(embedding.weight, init_method="normal", init_std=init_std)
    return embedding


def position_embedding(num_embeddings, embedding_dim, *, init_std, device=None, dtype=None):
    """Learned absolute position embedding (replicated on every tensor-parallel rank; it is added before
    the sequence is split, so its gradient is whole on every rank)."""
    embedding = nn.Embedding(num_embeddings, embedding_dim, device=device, dtype=dtype)
    set_param_attributes(embedding.weight, partition_dim=-1, init_method="normal", init_std=init_std)
    return embedding


def layer_norm(hidden_size, *, eps, parallel_state=None, device=None, dtype=None) -> nn.LayerNorm:
    """LayerNorm with weight and bias (replicated; no weight decay). Under sequence parallelism it
    normalises this rank's sequence chunk, so its gradients are partial sums (`tp_grad_reduce`)."""
    norm = nn.LayerNorm(hidden_size, eps=eps, device=device, dtype=dtype)
    reduce = sequence_parallel(parallel_state)
    set_param_attributes(
        norm.weight, partition_dim=-1, init_method="ones", no_weight_decay=True, tp_grad_reduce=reduce
    )
    set_param_attributes(
        norm.bias, partition_dim=-1, init_method="zeros", no_weight_decay=True, tp_grad_reduce=reduce
    )
    return norm
