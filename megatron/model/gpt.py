"""GPT-2 decoder with multi-query attention (StarCoder): embedding -> pre-LN blocks -> LN -> tied head.

Parameter names and their Hugging Face GPTBigCode (`GPTBigCodeForCausalLM`) counterparts:

| ours                                             | GPTBigCode                                      |
|--------------------------------------------------|-------------------------------------------------|
| embedding.word_embeddings.weight [V, h]          | transformer.wte.weight (lm_head.weight is tied) |
| embedding.position_embeddings.weight [P, h]      | transformer.wpe.weight                          |
| layers.{i}.input_layernorm.{weight,bias}         | transformer.h.{i}.ln_1.{weight,bias}            |
| layers.{i}.attention.query.{weight,bias} [h, h]  | transformer.h.{i}.attn.c_attn rows [0, h)       |
| layers.{i}.attention.key_value.{weight,bias}     | transformer.h.{i}.attn.c_attn rows [h, h + 2d)  |
|   (multiquery: [2d, h], K rows then V rows)      |   (c_attn = cat([query, key_value]))            |
| layers.{i}.attention.query_key_value (multihead) | transformer.h.{i}.attn.c_attn (same head-major  |
|   [3h, h] as [heads, (q, k, v), d] rows          |   layout)                                       |
| layers.{i}.attention.dense.{weight,bias}         | transformer.h.{i}.attn.c_proj.{weight,bias}     |
| layers.{i}.post_attention_layernorm.{w,b}        | transformer.h.{i}.ln_2.{weight,bias}            |
| layers.{i}.mlp.dense_h_to_4h.{weight,bias}       | transformer.h.{i}.mlp.c_fc.{weight,bias}        |
| layers.{i}.mlp.dense_4h_to_h.{weight,bias}       | transformer.h.{i}.mlp.c_proj.{weight,bias}      |
| final_layernorm.{weight,bias}                    | transformer.ln_f.{weight,bias}                  |
| output_layer.weight (only when untied)           | lm_head.weight                                  |

(d = kv_channels. HF's config: n_embd=h, n_layer, n_head, n_inner=ffn_hidden_size, n_positions=P,
multi_query, activation_function "gelu_pytorch_tanh" for gelu_tanh or "gelu" for gelu, layer_norm_epsilon.)

Tensor and sequence parallelism (a `parallel_state` with tensor_model_parallel_size > 1) live in the leaf
layers (`megatron.model.layers`) and at the two ends of the model:
- embedding: vocabulary-parallel word lookup (all-reduced) + positions, whole on every TP rank; under
  sequence parallelism split along the sequence, each rank keeping [b, s / tp, h].
- blocks: the residual stream is replicated on every TP rank, or under sequence parallelism this rank's
  sequence chunk; attention and MLP enter their TP region through column-parallel layers and leave it
  through row-parallel ones.
- output: the final LayerNorm's output enters the TP region (sequence all-gathered under sequence
  parallelism) and feeds the vocabulary-parallel fused loss; the logits path gathers the vocabulary.
Dropout on activations every TP rank holds whole draws from torch's default stream (the same on every
TP rank); dropout on split activations (attention probabilities of this rank's heads, the residual
stream's sequence chunk) from the per-rank stream `parallel_state.rng`.
Parameter names are the logical ones at every layout; each parameter's `full_shape`, `partition_dim`
and `tensor_model_parallel` say how this rank's tensor sits in the full one.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model import layers
from megatron.model.attention import SelfAttention
from megatron.model.loss import linear_cross_entropy
from megatron.parallel import mappings
from megatron.parallel.collectives import TRIVIAL
from megatron.parallel.cross_entropy import vocab_parallel_linear_cross_entropy


def _split_activation_rng(parallel_state):
    """The per-rank random stream for dropout on the sequence-parallel chunk, None without sequence
    parallelism (then every TP rank holds the activations whole and uses the default stream)."""
    return parallel_state.rng if layers.sequence_parallel(parallel_state) else None


def _fork(rng, device):
    return nullcontext() if rng is None else rng.fork(device)


class Embedding(nn.Module):
    """Word + learned absolute position embeddings, then dropout (Megatron's embedding dropout)."""

    def __init__(self, config, vocab_size: int, parallel_state=None, device=None, dtype=None) -> None:
        super().__init__()
        h, std = config.hidden_size, config.init_method_std
        positions = config.max_position_embeddings or config.seq_length
        self.word_embeddings = layers.vocab_embedding(
            vocab_size, h, init_std=std, parallel_state=parallel_state, device=device, dtype=dtype
        )
        self.position_embeddings = layers.position_embedding(
            positions, h, init_std=std, device=device, dtype=dtype
        )
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.tp_group = TRIVIAL if parallel_state is None else parallel_state.tp_group
        self.sequence_parallel = layers.sequence_parallel(parallel_state)
        self.rng = _split_activation_rng(parallel_state)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> [b, s, h], or this rank's sequence chunk [b, s / tp, h] under sequence
        parallelism."""
        s = tokens.shape[1]
        if s > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        if self.sequence_parallel:
            mappings.check_sequence_split(s, self.tp_group)
        words = self.word_embeddings(tokens)  # [b, s, h] (whole on every TP rank)
        if position_ids is None:  # 0..s-1: a slice, cheaper than a lookup forward and backward
            positions = self.position_embeddings.weight[:s]  # [s, h]
        else:
            positions = self.position_embeddings(position_ids)  # [b, s, h]
        x = words + positions  # [b, s, h]
        if not self.sequence_parallel:
            return self.dropout(x)  # the default stream: the same mask on every TP rank
        x = mappings.scatter_to_sequence_parallel_region(x, self.tp_group)  # [b, s/tp, h]
        with _fork(self.rng if self.training and self.dropout.p > 0 else None, x.device):
            return self.dropout(x)


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel)."""

    def __init__(self, config, parallel_state=None, device=None, dtype=None) -> None:
        super().__init__()
        h, std = config.hidden_size, config.init_method_std
        ffn = config.ffn_hidden_size or 4 * h
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.dense_h_to_4h = layers.column_linear(h, ffn, init_std=std, **kw)
        self.dense_4h_to_h = layers.row_linear(
            ffn, h, init_std=std / math.sqrt(2.0 * config.num_layers), **kw
        )
        activation = getattr(config, "activation", "gelu_tanh")
        if activation not in ("gelu_tanh", "gelu"):
            raise ValueError(f"activation={activation!r} is not supported; use 'gelu_tanh' or 'gelu'")
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, h] -> [b, s, ffn] -> [b, s, h]."""
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + dropout(attention(LN(x))), then x + dropout(mlp(LN(x)))."""

    def __init__(self, config, layer_number: int, parallel_state=None, device=None, dtype=None) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.input_layernorm = layers.layer_norm(h, eps=eps, **kw)
        self.attention = SelfAttention(config, layer_number, parallel_state, device=device, dtype=dtype)
        self.post_attention_layernorm = layers.layer_norm(h, eps=eps, **kw)
        self.mlp = MLP(config, parallel_state, device=device, dtype=dtype)
        self.hidden_dropout = config.hidden_dropout
        self.rng = _split_activation_rng(parallel_state)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, h] -> [b, s, h] (this rank's chunk [b, s/tp, h] under sequence parallelism)."""
        x = x + self._dropout(self.attention(self.input_layernorm(x), attention_mask))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.hidden_dropout if self.training else 0.0
        with _fork(self.rng if p > 0 else None, x.device):
            return F.dropout(x, p, self.training)


class GPTModel(nn.Module):
    """StarCoder-style GPT: see the module docstring for the parameter names.

    `GPTModel(config, vocab_size, parallel_state=None, *, device=None, dtype=None)`: `config` is a
    `ModelConfig` (attribute names as in the contract), `vocab_size` the padded vocabulary. Build with
    `device="meta"` to count parameters without allocating. Construction leaves PyTorch's default init;
    call `init_weights(seed)` for the model's own (layout-invariant) initialisation.
    """

    def __init__(self, config, vocab_size: int, parallel_state=None, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.tp_group = TRIVIAL if parallel_state is None else parallel_state.tp_group
        self.sequence_parallel = layers.sequence_parallel(parallel_state)
        self.tensor_model_parallel_rank = (
            0 if parallel_state is None else parallel_state.tensor_model_parallel_rank
        )
        kw = dict(device=device, dtype=dtype)
        self.embedding = Embedding(config, vocab_size, parallel_state, **kw)
        self.layers = nn.ModuleList(
            TransformerLayer(config, i + 1, parallel_state, **kw) for i in range(config.num_layers)
        )
        self.final_layernorm = layers.layer_norm(
            config.hidden_size, eps=config.layernorm_epsilon, parallel_state=parallel_state, **kw
        )
        self.output_layer = None
        if config.untie_embeddings_and_output_weights:
            self.output_layer = layers.vocab_embedding(
                vocab_size,
                config.hidden_size,
                init_std=config.init_method_std,
                parallel_state=parallel_state,
                **kw,
            )

    @property
    def output_weight(self) -> nn.Parameter:
        """The [V, h] output projection ([V / tp, h] shard under TP): the word embedding itself unless
        untied."""
        return (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None) -> torch.Tensor:
        """tokens int64 [b, s] -> logits [b, s, V] (model dtype), or with labels [b, s] the per-token
        cross-entropy float32 [b, s]. attention_mask: None = causal, else bool [b, 1, s, s] with
        True = masked out. Under TP every rank passes the same inputs and gets the same whole result."""
        b, s = tokens.shape
        x = self.embedding(tokens, position_ids)  # [b, s, h] ([b, s/tp, h] under sequence parallelism)
        for layer in self.layers:
            x = layer(x, attention_mask)  # [b, s, h] ([b, s/tp, h])
        x = self.final_layernorm(x)  # [b, s, h] ([b, s/tp, h])
        if not self.tp_group.is_trivial:
            return self._tensor_parallel_output(x, labels)
        if labels is None:
            return F.linear(x, self.output_weight)  # [b, s, V]
        loss = linear_cross_entropy(x.reshape(b * s, -1), self.output_weight, labels.reshape(b * s))  # [b*s]
        return loss.view(b, s)

    def _tensor_parallel_output(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The output layer on this rank's vocabulary shard: enter the TP region (backward: sum the hidden
        gradient over TP), then the vocabulary-parallel loss, or the logits gathered over TP."""
        if self.sequence_parallel:
            x = mappings.gather_from_sequence_parallel_region(x, self.tp_group)  # [b, s, h]
        else:
            x = mappings.copy_to_tensor_parallel_region(x, self.tp_group)  # [b, s, h]
        b, s = x.shape[:2]
        if labels is None:
            logits = F.linear(x, self.output_weight)  # [b, s, V/tp]
            return mappings.gather_from_tensor_parallel_region(logits, self.tp_group)  # [b, s, V]
        loss = vocab_parallel_linear_cross_entropy(
            x.reshape(b * s, -1), self.output_weight, labels.reshape(b * s), self.tp_group
        )  # [b*s], the same on every TP rank
        return loss.view(b, s)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Draw every parameter from its own generator seeded by (seed, parameter name).

        Normal(0, init_std) for weights (init_method_std; attention.dense and mlp.dense_4h_to_h use
        init_method_std / sqrt(2 * num_layers)), zeros for biases, ones for LayerNorm weights. The full
        (logical, `full_shape`) tensor is drawn on the CPU in fp32 and this rank's tensor-parallel slice
        copied in, so the result does not depend on build order, device, dtype, the global RNG or the
        parallel layout: gathered over TP it is the TP 1 model's weight, bit for bit.
        """
        for name, param in self.named_parameters():
            init_parameter(param, seed, name, tensor_model_parallel_rank=self.tensor_model_parallel_rank)


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed that depends only on (seed, parameter name)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_parameter(param: nn.Parameter, seed: int, name: str, *, tensor_model_parallel_rank: int = 0) -> None:
    """Initialise one parameter per its `init_method`/`init_std` attributes (set in layers.py): draw the
    full tensor and keep the slice of tensor-parallel rank `tensor_model_parallel_rank`."""
    method = getattr(param, "init_method", None)
    if method == "zeros":
        param.zero_()
    elif method == "ones":
        param.fill_(1.0)
    elif method == "normal":
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
        shape = getattr(param, "full_shape", tuple(param.shape))
        full = torch.empty(shape, dtype=torch.float32).normal_(0.0, param.init_std, generator=generator)
        param.copy_(local_shard(full, param, tensor_model_parallel_rank))
    else:
        raise AssertionError(f"parameter {name} has no init_method attribute")


def local_shard(full: torch.Tensor, param: nn.Parameter, tensor_model_parallel_rank: int) -> torch.Tensor:
    """The slice of the full tensor `full` that tensor-parallel rank `tensor_model_parallel_rank` holds as
    `param` (contiguous chunks along `partition_dim`, rank order); `full` itself when not split."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    return full.narrow(dim, tensor_model_parallel_rank * size, size)
