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
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model import layers
from megatron.model.attention import SelfAttention
from megatron.model.loss import linear_cross_entropy


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

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> [b, s, h]."""
        s = tokens.shape[1]
        if s > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        words = self.word_embeddings(tokens)  # [b, s, h]
        if position_ids is None:  # 0..s-1: a slice, cheaper than a lookup forward and backward
            positions = self.position_embeddings.weight[:s]  # [s, h]
        else:
            positions = self.position_embeddings(position_ids)  # [b, s, h]
        return self.dropout(words + positions)


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
        self.input_layernorm = layers.layer_norm(h, eps=eps, device=device, dtype=dtype)
        self.attention = SelfAttention(config, layer_number, parallel_state, device=device, dtype=dtype)
        self.post_attention_layernorm = layers.layer_norm(h, eps=eps, device=device, dtype=dtype)
        self.mlp = MLP(config, parallel_state, device=device, dtype=dtype)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[b, s, h] -> [b, s, h]."""
        p = self.hidden_dropout if self.training else 0.0
        x = x + F.dropout(self.attention(self.input_layernorm(x), attention_mask), p, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p, self.training)


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
        kw = dict(device=device, dtype=dtype)
        self.embedding = Embedding(config, vocab_size, parallel_state, **kw)
        self.layers = nn.ModuleList(
            TransformerLayer(config, i + 1, parallel_state, **kw) for i in range(config.num_layers)
        )
        self.final_layernorm = layers.layer_norm(config.hidden_size, eps=config.layernorm_epsilon, **kw)
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
        """The [V, h] output projection: the word embedding itself unless untied."""
        return (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None) -> torch.Tensor:
        """tokens int64 [b, s] -> logits [b, s, V] (model dtype), or with labels [b, s] the per-token
        cross-entropy float32 [b, s]. attention_mask: None = causal, else bool [b, 1, s, s] with
        True = masked out."""
        b, s = tokens.shape
        x = self.embedding(tokens, position_ids)  # [b, s, h]
        for layer in self.layers:
            x = layer(x, attention_mask)  # [b, s, h]
        x = self.final_layernorm(x)  # [b, s, h]
        if labels is None:
            return F.linear(x, self.output_weight)  # [b, s, V]
        loss = linear_cross_entropy(x.reshape(b * s, -1), self.output_weight, labels.reshape(b * s))  # [b*s]
        return loss.view(b, s)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Draw every parameter from its own generator seeded by (seed, parameter name).

        Normal(0, init_std) for weights (init_method_std; attention.dense and mlp.dense_4h_to_h use
        init_method_std / sqrt(2 * num_layers)), zeros for biases, ones for LayerNorm weights. The full
        tensor is drawn on the CPU in fp32 and copied in, so the result does not depend on build order,
        device, dtype or the global RNG; the tensor-parallel layers will slice this same full draw.
        """
        for name, param in self.named_parameters():
            init_parameter(param, seed, name)


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed that depends only on (seed, parameter name)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_parameter(param: nn.Parameter, seed: int, name: str) -> None:
    """Initialise one parameter per its `init_method`/`init_std` attributes (set in layers.py)."""
    method = getattr(param, "init_method", None)
    if method == "zeros":
        param.zero_()
    elif method == "ones":
        param.fill_(1.0)
    elif method == "normal":
        generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
        full = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, param.init_std, generator=generator)
        param.copy_(full)
    else:
        raise AssertionError(f"parameter {name} has no init_method attribute")
