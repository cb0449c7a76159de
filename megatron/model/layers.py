"""Leaf layers of the model: the one place where tensor parallelism plugs in.

Every linear, embedding and LayerNorm of `GPTModel` is built by a factory here. At tensor-parallel size 1
(or without a `parallel_state`) they return plain `Linear` / `nn.Embedding` / `nn.LayerNorm`, exactly the
single-process model; at TP > 1 the column- and row-parallel linears and the vocabulary-parallel
embedding of `megatron.parallel.layers`, which hold this rank's shard and compute with the same kernels
(`linear`, `matmul_nt` below).

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
- `init_method` (str) and `init_std` (float): how `GPTModel.init_weights` draws it ("normal" with std,
  "zeros" or "ones"); the full tensor is drawn and this rank's slice kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.parallel import layers as parallel_layers


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


_ONEDNN_LINEAR = _has_onednn_linear()


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b.T (+ bias)` for 2-D a, b; fp32 on the CPU (outside autocast) through oneDNN's GEMM.

    The default CPU matmul calls MKL, which on the benchmark machine (AMD, AVX-512) measured 10-25%
    slower than oneDNN's fp32 GEMM at every forward and input-gradient shape of bench/train_step.py
    (b contiguous, or the transpose of a contiguous matrix for `a @ W` = `matmul_nt(a, W.t())`). Both
    are ieee fp32; only the summation order differs. For the weight gradients (`grad.T @ x`) MKL was
    the faster one, so those stay `@`.
    """
    onednn = _ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
    if onednn and not torch.is_autocast_enabled("cpu"):
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


class _CPULinear(torch.autograd.Function):
    """x @ W^T + b whose backward reduces the bias gradient with a GEMV (ones @ grad).

    On the CPU `grad.sum(0)` over [tokens, features] runs at a small fraction of memory bandwidth for
    most shapes (measured 7 ms vs 0.2-0.7 ms for [1024, 768..3072]); the forward and the two
    gradient matmuls are what `F.linear`'s autograd does (the forward and input-gradient GEMMs through
    `matmul_nt`)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        x2d = x.reshape(-1, x.shape[-1])
        return matmul_nt(x2d, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad_2d, weight.t()).view(x.shape)  # grad @ W
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.mv(grad_2d.t(), torch.ones(grad_2d.shape[0], dtype=grad_2d.dtype))
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, with the faster bias gradient on the CPU outside autocast."""
    if x.device.type == "cpu" and x.dtype == weight.dtype and not torch.is_autocast_enabled("cpu"):
        return _CPULinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class _ConcatLinear(torch.autograd.Function):
    """x @ [W1; W2]^T + [b1; b2] as one GEMM that saves x, W1 and W2 for backward, not the concatenated
    weight: `linear(x, torch.cat(...))` would keep a weight-sized copy alive per layer and per micro-batch
    in flight. The concatenation is rebuilt for the input-gradient GEMM and freed right after. The
    forward and gradient GEMMs are the ones `linear` runs on the concatenated weight."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        ctx.save_for_backward(x, w1, w2)
        weight = torch.cat([w1, w2])
        bias = torch.cat([b1, b2])
        return matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, w1, w2 = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # [N, out1 + out2]
        sizes = [w1.shape[0], w2.shape[0]]
        grad_x = grad_w1 = grad_b1 = grad_w2 = grad_b2 = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad_2d, torch.cat([w1, w2]).t()).view(x.shape)  # grad @ W
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_w1, grad_w2 = (grad_2d.t() @ x.reshape(-1, x.shape[-1])).split(sizes)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            ones = torch.ones(grad_2d.shape[0], dtype=grad_2d.dtype, device=grad_2d.device)
            grad_b1, grad_b2 = torch.mv(grad_2d.t(), ones).split(sizes)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def concat_linear(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """`linear(x, cat([w1, w2]), cat([b1, b2]))` in one GEMM without saving the concatenated weight (see
    `_ConcatLinear`). Under autocast (which a custom Function would bypass) it is that expression."""
    if torch.is_autocast_enabled(x.device.type) or not x.dtype == w1.dtype == w2.dtype:
        return linear(x, torch.cat([w1, w2]), torch.cat([b1, b2]))
    return _ConcatLinear.apply(x, w1, b1, w2, b2)


class Linear(nn.Linear):
    """`nn.Linear` (with bias) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
    missing sum here was the defect of the original implementation, see specs/starcoder.md.
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
