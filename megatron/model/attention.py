"""Self-attention: projections (multi-query or multi-head) and the attention cores.

Cores, chosen per call by `select_backend`:
- "flash": `flash_attn_func` from the flash-attn package (CUDA, fp16/bf16, `use_flash_attn`, no explicit
  mask). It takes the single shared K/V head of multi-query attention natively.
- "sdpa": `F.scaled_dot_product_attention`, the default. How multi-query K/V reach it is chosen by
  `sdpa_kv_layout`: on CUDA in half precision without an explicit mask (the causal training step),
  `enable_gqa=True` (torch >= 2.5) passes the single K/V head as it is, which the flash and cuDNN kernels
  take natively; a stride-0 `expand` of K/V to every query head can instead make them fall back to the
  memory-efficient or math kernel. Elsewhere (CPU, fp32, a mask, torch 2.4) K/V are broadcast with
  `expand` (a view, no copy): measured on CPU as fast as `enable_gqa=True` at one shape and clearly faster
  at the other.
- "mqa_matmul": multi-query attention on CPU as plain batched matmuls. With activations laid out
  [b, s, heads, d], all query heads of a block of positions form one [positions * heads, d] matrix
  against the one shared K/V head, so QK^T and PV are single large GEMMs, the output lands in the
  [b, s, h] layout the dense projection reads (no transposes), and blocks above the causal diagonal are
  skipped. Measured (forward + backward, bench/train_step.py shapes) about 2x faster than SDPA's CPU
  flash kernel with 1 thread and 1.0-1.3x with 2 threads on a loaded machine (each batched GEMM is one
  GEMM call per sequence, and every call is a thread rendezvous). It stores the attention probabilities
  (about 0.6 * s*s*heads floats per sequence), so it is used only for fp32 and while that stays under
  `_MQA_MATMUL_MAX_SCORES` per layer; longer sequences use SDPA.
Every core computes the softmax in fp32 (SDPA's and flash-attn's kernels accumulate it in fp32 for
fp16/bf16), which is what `attention_softmax_in_fp32` asks for.

Selective recomputation (`recompute_granularity="selective"`) runs the core (`SelfAttention.core`) under
`recompute.checkpoint`: only q, k, v are kept and the scores, probabilities and dropout mask are rebuilt
in backward, with the dropout draws replayed (the per-rank stream under TP included).

Inference with a KV cache (`megatron.model.kv_cache`) is the same forward given a layer's cache: the new
positions' keys and values are appended to it and `cached_attention` attends over every cached position.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron import kernels
from megatron.config import ModelConfig
from megatron.model import layers, recompute
from megatron.model.kv_cache import LayerKVCache

try:  # optional accelerator
    from flash_attn import flash_attn_func
except ImportError:  # pragma: no cover - depends on the installation
    flash_attn_func = None

_MQA_MATMUL_MAX_SCORES = 16 * 2**20  # about the probabilities stored per layer (64 MiB in fp32)
# Query blocks along the sequence: more skip more of the causal upper triangle (4 blocks compute 62.5% of
# the s x s scores, 8 compute 56%) but cost more ops; 4 measured best at the benchmark shapes.
_MQA_MATMUL_BLOCKS = 4


# F.scaled_dot_product_attention takes `enable_gqa` from torch 2.5 on
SDPA_HAS_ENABLE_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def sdpa_kv_layout(
    device_type: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, has_mask: bool
) -> str:
    """How `sdpa_attention` hands K/V with `num_kv_heads` heads to SDPA for `num_heads` query heads:
    "same" (one K/V head per query head), "gqa" (`enable_gqa=True`, K/V not expanded: the flash and
    cuDNN kernels take them natively) or "expand" (stride-0 broadcast to every query head); see the
    module docstring."""
    if num_kv_heads == num_heads:
        return "same"
    half = dtype in (torch.float16, torch.bfloat16)
    if SDPA_HAS_ENABLE_GQA and device_type == "cuda" and half and not has_mask:
        return "gqa"
    return "expand"


def select_backend(q: torch.Tensor, num_kv_heads: int, attention_mask, use_flash_attn: bool) -> str:
    """Pick the attention core for these inputs (see the module docstring). While torch.compile traces
    (`--torch-compile`) the CPU core is SDPA: the compiler cannot trace the blocked matmul core."""
    flash_dtype = q.dtype in (torch.float16, torch.bfloat16)
    if (
        use_flash_attn
        and flash_attn_func is not None
        and q.is_cuda
        and flash_dtype
        and attention_mask is None
    ):
        return "flash"
    b, s, num_heads, _ = q.shape
    small = b * num_heads * s * s // 2 <= _MQA_MATMUL_MAX_SCORES
    cpu_fp32 = q.device.type == "cpu" and q.dtype == torch.float32
    if cpu_fp32 and num_kv_heads == 1 and small and not torch.compiler.is_compiling():
        return "mqa_matmul"
    return "sdpa"


def sdpa_attention(q, k, v, attention_mask, dropout_p: float, kv_layout: str | None = None) -> torch.Tensor:
    """q [b, s, nh, d], k/v [b, s, nkv, d] -> [b, s, nh, d] with F.scaled_dot_product_attention.

    Its fused kernels (CPU flash, CUDA flash/cuDNN/efficient) accumulate the softmax in fp32 for fp16/bf16.
    `kv_layout`: as `sdpa_kv_layout` returns (None: its choice for these inputs).
    """
    b, s, num_heads, d = q.shape
    if kv_layout is None:
        kv_layout = sdpa_kv_layout(q.device.type, q.dtype, num_heads, k.shape[2], attention_mask is not None)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
    if kv_layout == "expand":  # multi-query: broadcast the shared head without a copy
        k, v = k.expand(b, num_heads, s, d), v.expand(b, num_heads, s, d)
    gqa = {"enable_gqa": True} if kv_layout == "gqa" else {}  # k/v [b, nkv, s, d] as they are
    mask = None if attention_mask is None else ~attention_mask  # SDPA: True = takes part
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, **gqa
    )
    return out.transpose(1, 2)  # [b, s, nh, d]


def flash_attention(q, k, v, dropout_p: float) -> torch.Tensor:
    """q [b, s, nh, d], k/v [b, s, nkv, d] -> [b, s, nh, d] with flash-attn (causal)."""
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=q.shape[-1] ** -0.5, causal=True)


class _MultiQueryMatmul(torch.autograd.Function):
    """Blocked multi-query attention with a hand-written backward that writes or accumulates each
    gradient block in place (GEMMs with `out=` / `baddbmm_`), so no block costs a full-size zero tensor
    or an extra copy, and each block is a handful of large ops (few parallel regions: under CPU
    contention every extra op costs a thread rendezvous)."""

    @staticmethod
    def forward(ctx, q, k, v, biases, blocks, dropout_p):
        # q [b, s, nh, d] contiguous; k, v [b, s, d]; per block: bias [*, c*nh, end] (0 / -inf)
        b, s, num_heads, d = q.shape
        out = torch.empty_like(q)
        saved = []
        for (start, end), bias in zip(blocks, biases):
            rows = q[:, start:end].reshape(b, -1, d)  # [b, c*nh, d], a view
            scores = torch.baddbmm(bias, rows, k[:, :end].transpose(1, 2), alpha=d**-0.5)  # [b, c*nh, end]
            probs = torch.softmax(scores, dim=-1)
            keep = None
            if dropout_p > 0:
                keep = torch.empty_like(probs, dtype=torch.bool).bernoulli_(1.0 - dropout_p)
                dropped = probs * keep * (1.0 / (1.0 - dropout_p))
            else:
                dropped = probs
            torch.bmm(dropped, v[:, :end], out=out[:, start:end].view(b, -1, d))  # [b, c*nh, d]
            saved += [probs] if keep is None else [probs, keep]
        # save_for_backward (not ctx attributes), so saved-tensor hooks see the probabilities: activation
        # recomputation drops them and the activation counter counts them
        ctx.save_for_backward(q, k, v, *saved)
        ctx.blocks, ctx.dropout_p = blocks, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *saved = ctx.saved_tensors
        per_block = 1 if ctx.dropout_p == 0 else 2
        saved = [(blk[0], blk[1] if per_block == 2 else None) for blk in _chunks(saved, per_block)]
        b, s, num_heads, d = q.shape
        scale, keep_scale = d**-0.5, 1.0 / (1.0 - ctx.dropout_p)
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        for (start, end), (probs, keep) in zip(ctx.blocks, saved, strict=True):
            rows = q[:, start:end].reshape(b, -1, d)  # [b, c*nh, d]
            grad_rows = grad_out[:, start:end].reshape(b, -1, d)  # [b, c*nh, d]
            dropped = probs if keep is None else probs * keep * keep_scale
            grad_v[:, :end].baddbmm_(dropped.transpose(1, 2), grad_rows)  # [b, end, d]
            grad_probs = torch.bmm(grad_rows, v[:, :end].transpose(1, 2))  # [b, c*nh, end]
            if keep is not None:
                grad_probs.mul_(keep).mul_(keep_scale)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q_rows = grad_q[:, start:end].view(b, -1, d)
            torch.baddbmm(grad_q_rows, grad_scores, k[:, :end], beta=0.0, alpha=scale, out=grad_q_rows)
            grad_k[:, :end].baddbmm_(grad_scores.transpose(1, 2), rows, alpha=scale)  # [b, end, d]
        return grad_q, grad_k, grad_v, None, None, None


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class MultiQueryMatmulAttention(nn.Module):
    """Blocked multi-query attention as batched GEMMs (see the module docstring); CPU, fp32. Holds no
    parameters, only a cache of additive causal masks."""

    def __init__(self) -> None:
        super().__init__()
        self._mask_cache: dict = {}

    def forward(self, q, k, v, attention_mask, dropout_p: float) -> torch.Tensor:
        """q [b, s, nh, d], k/v [b, s, 1, d] -> [b, s, nh, d]."""
        b, s, num_heads, d = q.shape
        positions = -(-s // _MQA_MATMUL_BLOCKS)
        blocks = tuple((start, min(s, start + positions)) for start in range(0, s, positions))
        biases = [self._block_bias(b, start, end, num_heads, attention_mask, q) for start, end in blocks]
        return _MultiQueryMatmul.apply(q.contiguous(), k.squeeze(2), v.squeeze(2), biases, blocks, dropout_p)

    def _block_bias(self, b, start, end, num_heads, attention_mask, like) -> torch.Tensor:
        """Additive mask (0 or -inf) for query positions [start, end) against keys [0, end)."""
        if attention_mask is None:
            key = (start, end, num_heads, like.dtype, like.device)
            if key not in self._mask_cache:
                if len(self._mask_cache) > 256:
                    self._mask_cache.clear()
                causal = torch.ones(end - start, end, dtype=torch.bool, device=like.device).triu(start + 1)
                self._mask_cache[key] = self._expand_bias(causal.unsqueeze(0), num_heads, like)[0]
            return self._mask_cache[key]
        return self._expand_bias(attention_mask[:, 0, start:end, :end], num_heads, like)

    @staticmethod
    def _expand_bias(masked: torch.Tensor, num_heads: int, like: torch.Tensor) -> torch.Tensor:
        """bool [b, c, keys] (True = masked) -> additive [b, c*nh, keys] in `like`'s dtype."""
        b, c, keys = masked.shape
        bias = torch.zeros(b, c, keys, dtype=like.dtype, device=like.device).masked_fill_(masked, -math.inf)
        return bias.unsqueeze(2).expand(b, c, num_heads, keys).reshape(b, c * num_heads, keys)


class SelfAttention(nn.Module):
    """Causal self-attention. Multi-query: `query` [h, h] (split over TP by heads) and `key_value`
    [2*kv_channels, h] (K rows then V rows; replicated over TP). Multi-head: one `query_key_value`
    [3*h, h] laid out head-major ([heads, (q, k, v), kv_channels] rows, as Megatron and HF GPTBigCode),
    so a TP slice of rows is whole heads. Then `dense` [h, h] (row-parallel).

    Under tensor parallelism each rank runs num_attention_heads / TP heads; under sequence parallelism
    it takes and returns this rank's sequence chunk [b, s / TP, h] (the projections gather the sequence,
    the row-parallel `dense` reduce-scatters it back)."""

    def __init__(
        self, config: ModelConfig, layer_number: int, parallel_state=None, device=None, dtype=None
    ) -> None:
        super().__init__()
        h, std = config.hidden_size, config.init_method_std
        tp = 1 if parallel_state is None else parallel_state.tensor_model_parallel_size
        if config.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads={config.num_attention_heads} is not divisible by "
                f"tensor_model_parallel_size={tp}: tensor parallelism splits the attention heads"
            )
        self.num_heads = config.num_attention_heads // tp  # this rank's query heads
        self.head_dim = config.kv_channels or h // config.num_attention_heads
        self.multi_query = config.attention_head_type == "multiquery"
        self.num_kv_heads = 1 if self.multi_query else self.num_heads
        self.dropout_p = config.attention_dropout
        self.use_flash_attn = config.use_flash_attn
        # the attention probabilities of this rank's heads are split across TP: their dropout masks
        # must differ per rank, so they come from the per-rank stream
        self.rng = parallel_state.rng if tp > 1 else None
        proj = config.num_attention_heads * self.head_dim
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        if self.multi_query:
            self.query = layers.column_linear(h, proj, init_std=std, **kw)
            self.key_value = layers.replicated_linear(h, 2 * self.head_dim, init_std=std, **kw)
        else:
            self.query_key_value = layers.column_linear(h, 3 * proj, init_std=std, **kw)
        output_std = std / math.sqrt(2.0 * config.num_layers)
        self.dense = layers.row_linear(proj, h, init_std=output_std, **kw)
        self.mqa_matmul = MultiQueryMatmulAttention()
        self.recompute_core = config.recompute_granularity == "selective"

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """x [b, s, h] -> [b, s, h] ([b, s/tp, h] under sequence parallelism). attention_mask: None
        (causal) or bool [b, 1, s, s] over the whole sequence, True = masked. With `kv_cache` (inference,
        TP 1): x holds the positions after the cached ones, whose keys and values are appended; the
        cache's own mask (causal, padding keys masked) applies and `attention_mask` must be None."""
        q, k, v = self._project(x, kv_cache)  # q [b, s, nh, d], k/v [b, s, nkv, d] (whole sequence)
        b, s = q.shape[:2]
        if kv_cache is not None:
            keys, values = kv_cache.append(k, v)  # [b, L, nkv, d]: every position so far
            out = cached_attention(q, keys, values, kv_cache.bias)
        elif self.recompute_core:  # selective recomputation: keep q, k, v; rerun the core in backward
            out = recompute.checkpoint(self.core, q, k, v, attention_mask, rng_tracker=self.rng)
        else:
            out = self.core(q, k, v, attention_mask)
        return self.dense(out.reshape(b, s, -1))  # [b, s, nh*d] -> [b, s, h]

    def core(self, q, k, v, attention_mask) -> torch.Tensor:
        """The attention core: scores, softmax, dropout, weighted sum. q [b, s, nh, d], k/v
        [b, s, nkv, d] -> [b, s, nh, d]."""
        dropout_p = self.dropout_p if self.training else 0.0
        backend = select_backend(q, self.num_kv_heads, attention_mask, self.use_flash_attn)
        with self.rng.fork(q.device) if self.rng is not None and dropout_p > 0 else nullcontext():
            if backend == "flash":
                return flash_attention(q, k, v, dropout_p)
            if backend == "mqa_matmul":
                return self.mqa_matmul(q, k, v, attention_mask, dropout_p)
            return sdpa_attention(q, k, v, attention_mask, dropout_p)

    def _project(self, x: torch.Tensor, kv_cache: LayerKVCache | None):
        if self.multi_query:
            return self._project_multi_query(x, kv_cache)
        qkv = self.query_key_value(x)  # [b, s, nh * 3d]: head-major, this rank's heads
        b, s = qkv.shape[:2]
        return qkv.view(b, s, self.num_heads, 3 * self.head_dim).split(self.head_dim, dim=-1)

    def _project_multi_query(self, x: torch.Tensor, kv_cache: LayerKVCache | None):
        # One GEMM for query and key/value: the [h -> 2d] projection alone is a thin, slow GEMM, and one
        # output gradient saves a GEMM and an add in backward (the weight concat is a cheap copy, rebuilt
        # in backward rather than kept; a KV cache keeps it for the whole generation instead).
        #
        # Under TP the fused GEMM runs on the TP region's input (`ColumnParallelLinear.forward_fused`: the
        # replicated input, whose gradient backward all-reduces, or under sequence parallelism the
        # all-gathered sequence chunk, whose gradient backward reduce-scatters; only the chunk is kept).
        # Each rank's K/V output gradient then holds only its own query heads' contribution. The input
        # gradient of the fused GEMM is summed over TP anyway, which adds the K/V contributions of
        # all ranks exactly once; what is left is the K/V weight and bias gradient, a partial sum on each
        # rank: those parameters carry `tp_grad_reduce` and are all-reduced over TP after backward (with
        # and without sequence parallelism). Equivalent to summing the K/V output gradient over TP before
        # the GEMM's backward, without a second collective and while keeping the one fused GEMM.
        d = self.head_dim
        forward_fused = getattr(self.query, "forward_fused", None)  # only the tensor-parallel layer has one
        if kv_cache is not None:  # one process
            qkv = kernels.linear(x, *kv_cache.fused_projection(self.query, self.key_value))
        elif forward_fused is not None:
            qkv = forward_fused(x, self.key_value.weight, self.key_value.bias)  # [b, s, nh*d + 2d]
        else:
            # [b, s, nh*d + 2d] from the weight [nh*d + 2d, h], whose concatenation is not kept for backward
            qkv = kernels.concat_linear(
                x, self.query.weight, self.query.bias, self.key_value.weight, self.key_value.bias
            )
        b, s = qkv.shape[:2]
        q, k, v = qkv.split([self.num_heads * d, d, d], dim=-1)
        return q.view(b, s, self.num_heads, d), k.view(b, s, 1, d), v.view(b, s, 1, d)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Inference core: q [b, t, nh, d] (the new positions) against the cached k/v [b, L, nkv, d]; bias
    additive [b, t, L] or [b, 1, L], or None (nothing to mask) -> [b, t, nh, d]. No dropout."""
    b, t, num_heads, d = q.shape
    L = k.shape[1]
    if k.shape[2] == 1:  # multi-query: every query head of every new position is one row against one head
        rows = q.reshape(b, t * num_heads, d)  # [b, t*nh, d]
        keys, values = k[:, :, 0], v[:, :, 0]  # [b, L, d] (strided views of the cache)
        scale = d**-0.5
        if bias is None:
            scores = torch.bmm(rows, keys.transpose(1, 2)).mul_(scale)  # [b, t*nh, L]
        else:
            full_bias = bias[:, :, None, :].expand(b, t, num_heads, L).reshape(b, t * num_heads, L)
            scores = torch.baddbmm(full_bias, rows, keys.transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1)
        return torch.bmm(probs, values).view(b, t, num_heads, d)
    mask = None if bias is None else bias[:, None]  # [b, 1, t, L]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)  # [b, t, nh, d]
