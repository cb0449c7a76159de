"""CPU GEMM kernels of the linear layers, with their autograd: one home for model/ and parallel/.

Torch only (imports nothing from megatron): the plain layers of the model at tensor-parallel size 1 and
the tensor-parallel shards in `megatron.parallel.layers` compute with the same kernels, so a shard's
numbers are those of the whole layer.

- `matmul_nt(a, b, bias)`: `a @ b.T (+ bias)` through oneDNN for fp32 on the CPU (faster than MKL there).
- `linear(x, weight, bias)`: `F.linear` whose bias gradient is a GEMV on the CPU.
- `concat_linear(x, w1, b1, w2, b2)`: two linears sharing an input as one GEMM, without keeping the
  concatenated weight for backward (the fused multi-query Q + K/V projection).
- `add_bias(x, bias)`: `x + bias` with the GEMV bias gradient (row-parallel layers add their bias after the
  tensor-parallel sum).
- `Linear`: `nn.Linear` whose forward is `linear`.

Without grad mode (evaluation, generation) `linear` runs its forward GEMM directly, skipping the autograd
function: the numbers are the same and a decoding step makes one such call per projection per layer.
Elsewhere (CUDA, autocast, mixed dtypes) every function is the plain torch expression, and so it is
while `torch.compile` traces it (`--torch-compile`): the compiler brings its own GEMM kernels and cannot
trace the oneDNN call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the torch build
        return False


_ONEDNN_LINEAR = _has_onednn_linear()


_compiling = torch.compiler.is_compiling  # True while torch.compile traces (torch >= 2.3)


def matmul_nt(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b.T (+ bias)` for 2-D a, b; fp32 on the CPU (outside autocast) through oneDNN's GEMM.

    The default CPU matmul calls MKL, which on the benchmark machine (AMD, AVX-512) measured 10-25%
    slower than oneDNN's fp32 GEMM at every forward and input-gradient shape of bench/train_step.py
    (b contiguous, or the transpose of a contiguous matrix for `a @ W` = `matmul_nt(a, W.t())`). Both
    are ieee fp32; only the summation order differs. For the weight gradients (`grad.T @ x`) MKL was
    the faster one, so those stay `@`.
    """
    onednn = _ONEDNN_LINEAR and a.device.type == "cpu" and a.dtype == b.dtype == torch.float32
    if onednn and not torch.is_autocast_enabled("cpu") and not _compiling():
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


def _cpu_kernels(x: torch.Tensor, other: torch.Tensor) -> bool:
    """The CPU kernels apply: x on the CPU, outside autocast, `other` (weight or bias) in x's dtype."""
    cpu = x.device.type == "cpu" and other.dtype == x.dtype and not torch.is_autocast_enabled("cpu")
    return cpu and not _compiling()


def bias_grad(grad_2d: torch.Tensor) -> torch.Tensor:
    """sum over rows of grad [N, out] as a GEMV (ones @ grad): on the CPU `grad.sum(0)` runs at a small
    fraction of memory bandwidth for most shapes (measured 7 ms vs 0.2-0.7 ms for [1024, 768..3072])."""
    ones = torch.ones(grad_2d.shape[0], dtype=grad_2d.dtype, device=grad_2d.device)
    return torch.mv(grad_2d.t(), ones)


class _CPULinear(torch.autograd.Function):
    """x @ W^T + b: the forward and input-gradient GEMMs through `matmul_nt`, the weight gradient with
    MKL (`@`), the bias gradient as a GEMV; otherwise what `F.linear`'s autograd does."""

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
            grad_bias = bias_grad(grad_2d)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`: x [..., in], weight [out, in], bias [out] or None -> [..., out]."""
    if not _cpu_kernels(x, weight):
        return F.linear(x, weight, bias)
    if not torch.is_grad_enabled():  # no autograd node to build: the forward GEMM alone
        return matmul_nt(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return _CPULinear.apply(x, weight, bias)


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
            grad_b1, grad_b2 = bias_grad(grad_2d).split(sizes)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def concat_linear(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> torch.Tensor:
    """`linear(x, cat([w1, w2]), cat([b1, b2]))` in one GEMM without saving the concatenated weight (see
    `_ConcatLinear`). Under autocast (which a custom Function would bypass) it is that expression."""
    if torch.is_autocast_enabled(x.device.type) or not x.dtype == w1.dtype == w2.dtype or _compiling():
        return linear(x, torch.cat([w1, w2]), torch.cat([b1, b2]))
    return _ConcatLinear.apply(x, w1, b1, w2, b2)


class _AddBias(torch.autograd.Function):
    """x + bias whose bias gradient is a GEMV (ones @ grad), as in `_CPULinear`."""

    @staticmethod
    def forward(ctx, x, bias):
        return x + bias

    @staticmethod
    def backward(ctx, grad):
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = bias_grad(grad.reshape(-1, grad.shape[-1]))
        return grad, grad_bias


def add_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`x + bias` (bias in x's dtype, as `F.linear` under autocast), with the GEMV bias gradient on the
    CPU outside autocast."""
    if _cpu_kernels(x, bias):
        return _AddBias.apply(x, bias)
    return x + bias.to(x.dtype)


class Linear(nn.Linear):
    """`nn.Linear` (with bias) whose forward is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
