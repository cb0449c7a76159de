"""Parameter count, training FLOPs per token and device peak FLOP/s (for TFLOP/s and MFU logging).

The GPU peak table itself lives in `megatron.config.gpus` (the planner reads it too).

FLOPs per token (forward + backward = 3x forward, one multiply-add = 2 FLOPs), `flops_per_token`:

    6 * N_matmul + 6 * L * s * h_attn        (h_attn = num_attention_heads * kv_channels)

- N_matmul: the weights used in matrix multiplies per token: per layer the query/key/value, dense and
  both MLP projections (biases, LayerNorms and position embeddings excluded, their work is elementwise),
  plus the logits matmul V * h (the tied embedding lookup itself is free).
- attention scores QK^T and the weighted sum PV: 2 * 2 * s * h_attn FLOPs per token per layer forward,
  x3 for training -> 12 * L * s * h_attn. This is the usual Megatron/PaLM convention that counts the full
  s x s product (causal masking is ignored), the same "6N + 12*L*h*s" the StarCoder paper's efficiency
  figure uses. Activation recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import functools
import time

import torch

from megatron import kernels
from megatron.config.gpus import gpu_peak_flops


def _non_embedding_matmul_params(config) -> int:
    h = config.hidden_size
    d = config.kv_channels or h // config.num_attention_heads
    attn = config.num_attention_heads * d
    kv = d if config.attention_head_type == "multiquery" else attn
    ffn = config.ffn_hidden_size or 4 * h
    per_layer = h * (attn + 2 * kv) + attn * h + 2 * h * ffn
    return config.num_layers * per_layer


def num_parameters(config, vocab_size: int) -> int:
    """Exact number of parameters of `GPTModel(config, vocab_size)` (tied weights counted once), from a
    model built on the meta device (no memory is allocated)."""
    from megatron.model.gpt import GPTModel  # flops is imported by megatron.model before gpt

    model = GPTModel(config, vocab_size, device="meta")
    return sum(p.numel() for p in model.parameters())


def flops_per_token(config, vocab_size: int) -> float:
    """Training (forward + backward) FLOPs per token; formula in the module docstring."""
    h = config.hidden_size
    attn = config.num_attention_heads * (config.kv_channels or h // config.num_attention_heads)
    n_matmul = _non_embedding_matmul_params(config) + vocab_size * h
    return float(6 * n_matmul + 6 * config.num_layers * config.seq_length * attn * 2)


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def device_peak_flops(device, dtype=torch.float32, *, peak_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, description) for `device` computing in `dtype`: the reference of the logged MFU.

    peak_tflops (--peak-tflops): the peak itself, per device; nothing is looked up or measured. Otherwise
    CUDA devices: the dense (non-sparse) datasheet peak looked up by `torch.cuda.get_device_name`; 0.0 with
    a description saying so when the device is unknown. CPU: the fp32 matmul rate measured now with the
    current thread count (the best of a few 2048-square matmuls through torch.mm and through the model's
    `kernels.matmul_nt`; cached per process and thread count). On a shared machine the measurement moves
    with the load (4x between runs has been seen), and the logged MFU with it: the description says so.
    """
    device = torch.device(device)
    if peak_tflops is not None:
        return peak_tflops * 1e12, f"--peak-tflops {peak_tflops:g} (given, not measured)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = _dtype_class(dtype)
        peak = gpu_peak_flops(name, kind)
        if peak is not None:
            return peak, f"{name} {kind} dense peak"
        return 0.0, f"{name}: not in the peak table (MFU not reported; --peak-tflops sets it)"
    threads = torch.get_num_threads()
    return _measured_cpu_peak(threads), (
        f"CPU fp32 matmul peak measured at start-up with {threads} threads (moves with the machine's load; "
        "--peak-tflops fixes it)"
    )


@functools.cache
def _measured_cpu_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    out = torch.empty(size, size)
    # the best of torch.mm (MKL) and the model's own GEMM (oneDNN where available, see kernels.matmul_nt)
    candidates = (lambda: torch.mm(a, b, out=out), lambda: kernels.matmul_nt(a, b))
    best = float("inf")
    for kernel in candidates:
        kernel()  # warm-up (thread pool, page faults)
        for _ in range(repeats):
            start = time.perf_counter()
            kernel()
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
