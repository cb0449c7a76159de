"""GPT-2 decoder with multi-query attention (StarCoder): embedding -> pre-LN blocks -> LN -> tied head.

    x = embedding(tokens)                      # word + position embeddings, dropout: [b, s, h]
    for layer in layers:                       # TransformerLayer (pre-LN)
        x = x + dropout(attention(LN(x)))      #   attention.py: causal multi-query or multi-head
        x = x + dropout(mlp(LN(x)))            #   h -> 4h -> GELU -> h
    loss or logits = head(final_layernorm(x))  # x @ word_embeddings.T, fused with the cross-entropy

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
layers (`megatron.model.layers`; at TP 1 they are plain `Linear` / `nn.Embedding` / `nn.LayerNorm`) and in
the few calls of `megatron.parallel.mappings` below, each of which returns its input at TP 1:
- embedding: vocabulary-parallel word lookup (all-reduced) + positions, whole on every TP rank; under
  sequence parallelism the lookup is reduce-scattered along the sequence instead (half the bytes) and
  each rank adds its chunk's positions, keeping [b, s / tp, h].
- blocks: the residual stream is replicated on every TP rank, or under sequence parallelism this rank's
  sequence chunk; attention and MLP enter their TP region through column-parallel layers and leave it
  through row-parallel ones.
- head: the final LayerNorm's output enters the TP region (sequence all-gathered under sequence
  parallelism, only the chunk kept for backward) and feeds the vocabulary-parallel fused loss; the
  logits path gathers the vocabulary.
Dropout on activations every TP rank holds whole draws from torch's default stream (the same on every
TP rank); dropout on split activations (attention probabilities of this rank's heads, the residual
stream's sequence chunk) from the per-rank stream `parallel_state.rng`. docs/parallelism.md has the
whole design.

Pipeline parallelism: `megatron.model.stage.build_model` gives each pipeline rank a `GPTStage` holding its
part of this model under the same parameter names, built from the blocks below.

Activation recomputation (`config.recompute_granularity`, `megatron.model.recompute`): "full" reruns
groups of layers in backward, "selective" only the attention core; dropout draws are replayed, so the
gradients are bit-identical to no recomputation.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import ModelConfig
from megatron.model import init, layers, recompute
from megatron.model.attention import SelfAttention
from megatron.model.kv_cache import KVCache, LayerKVCache
from megatron.model.loss import linear_cross_entropy
from megatron.parallel import layers as parallel_layers
from megatron.parallel import mappings
from megatron.parallel.collectives import TRIVIAL, Group


def _split_activation_rng(parallel_state):
    """The per-rank random stream for dropout on the sequence-parallel chunk, None without sequence
    parallelism (then every TP rank holds the activations whole and uses the default stream)."""
    return parallel_state.rng if layers.sequence_parallel(parallel_state) else None


def _fork(rng, device):
    return nullcontext() if rng is None else rng.fork(device)


class Embedding(nn.Module):
    """Word + learned absolute position embeddings, then dropout (Megatron's embedding dropout)."""

    def __init__(
        self, config: ModelConfig, vocab_size: int, parallel_state=None, device=None, dtype=None
    ) -> None:
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

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, start: int = 0):
        """tokens [b, s] -> [b, s, h], or this rank's sequence chunk [b, s / tp, h] under sequence
        parallelism. Positions are `position_ids` [b, s], default start..start+s-1."""
        s = tokens.shape[1]
        if start + s > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"sequence length {start + s} exceeds "
                f"max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        if self.sequence_parallel:
            mappings.check_sequence_split(s, self.tp_group)
        if position_ids is None:  # consecutive: a slice, cheaper than a lookup forward and backward
            positions = self.position_embeddings.weight[start : start + s]  # [s, h]
        else:
            positions = self.position_embeddings(position_ids)  # [b, s, h]
        if not self.sequence_parallel:  # the default stream: the same mask on every TP rank
            x = self.word_embeddings(tokens) + positions  # [b, s, h] (whole on every TP rank)
            return self.dropout(x) if self.training else x
        # this rank's vocabulary rows, summed over TP by one reduce-scatter, plus this chunk's positions
        words = self.word_embeddings.partial(tokens)  # [b, s, h], zeros for rows other ranks hold
        x = mappings.reduce_scatter_add_to_sequence_parallel_region(words, positions, self.tp_group)
        with _fork(self.rng if self.training and self.dropout.p > 0 else None, x.device):
            return self.dropout(x)


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel)."""

    def __init__(self, config: ModelConfig, parallel_state=None, device=None, dtype=None) -> None:
        super().__init__()
        h, std = config.hidden_size, config.init_method_std
        ffn = config.ffn_hidden_size or 4 * h
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.dense_h_to_4h = layers.column_linear(h, ffn, init_std=std, **kw)
        self.dense_4h_to_h = layers.row_linear(
            ffn, h, init_std=std / math.sqrt(2.0 * config.num_layers), **kw
        )
        if config.activation not in ("gelu_tanh", "gelu"):
            raise ValueError(f"activation={config.activation!r} is not supported; use 'gelu_tanh' or 'gelu'")
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s, h] -> [b, s, ffn] -> [b, s, h]."""
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class TransformerLayer(nn.Module):
    """Pre-LN block: x + dropout(attention(LN(x))), then x + dropout(mlp(LN(x)))."""

    def __init__(
        self, config: ModelConfig, layer_number: int, parallel_state=None, device=None, dtype=None
    ) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.layernorm_epsilon
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.input_layernorm = layers.layer_norm(h, eps=eps, **kw)
        self.attention = SelfAttention(config, layer_number, parallel_state, device=device, dtype=dtype)
        self.post_attention_layernorm = layers.layer_norm(h, eps=eps, **kw)
        self.mlp = MLP(config, parallel_state, device=device, dtype=dtype)
        self.hidden_dropout = config.hidden_dropout
        self.rng = _split_activation_rng(parallel_state)
        self.torch_compile = config.torch_compile

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        """[b, s, h] -> [b, s, h] (this rank's chunk [b, s/tp, h] under sequence parallelism). With
        `config.torch_compile`, in training mode, it runs compiled (`compiled_layer_forward`); evaluation
        and inference stay eager (one compiled graph, and no compiler needed to use a checkpoint)."""
        if self.torch_compile and self.training:
            return compiled_layer_forward(COMPILE_BACKEND)(self, x, attention_mask)
        return _layer_forward(self, x, attention_mask, kv_cache)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.hidden_dropout == 0:  # the identity (and no call per decoded token)
            return x
        with _fork(self.rng, x.device):
            return F.dropout(x, self.hidden_dropout, True)


# torch.compile's backend for --torch-compile; tests of the graph structure (graph breaks at collectives,
# recomputation) use "aot_eager", which traces the same graphs without generating code
COMPILE_BACKEND = "inductor"


@functools.cache
def compiled_layer_forward(backend: str = "inductor"):
    """`TransformerLayer.forward` without a KV cache under `torch.compile` (`--torch-compile`): one
    compiled function for every layer (the layer is an argument, its parameters graph inputs), built on
    first use. Inductor fuses each LayerNorm, the bias + GELU, dropout and the residual adds into a few
    kernels; collectives and the random-stream swaps are graph breaks that run eagerly."""
    return torch.compile(_layer_forward, backend=backend, dynamic=False)


def _layer_forward(layer: TransformerLayer, x: torch.Tensor, attention_mask, kv_cache=None) -> torch.Tensor:
    """The pre-LN block: x + dropout(attention(LN(x))), then x + dropout(mlp(LN(x)))."""
    x = x + layer._dropout(layer.attention(layer.input_layernorm(x), attention_mask, kv_cache))
    return x + layer._dropout(layer.mlp(layer.post_attention_layernorm(x)))


class LayerDict(nn.ModuleDict):
    """Decoder layers keyed by their global (logical) index, so that parameter names are `layers.{i}.*`
    at every pipeline layout; `layers[i]` takes that index as an int too."""

    def __getitem__(self, key) -> nn.Module:
        return super().__getitem__(str(key))

    def __contains__(self, key) -> bool:
        return super().__contains__(str(key))


def run_layers(
    layer_dict: LayerDict, start: int, end: int, x: torch.Tensor, attention_mask, config: ModelConfig, rng
) -> torch.Tensor:
    """Layers [start, end) in order. Under full recomputation their groups (`recompute.layer_groups`) keep
    only their input and rerun in backward, replaying the per-rank stream `rng` (None: default only)."""

    def run(group_start: int, group_end: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(group_start, group_end):
            x = layer_dict[i](x, attention_mask)  # [b, s, h] ([b, s/tp, h])
        return x

    groups = recompute.layer_groups(
        start, end, config.recompute_granularity, config.recompute_method, config.recompute_num_layers
    )
    for group_start, group_end, checkpointed in groups:
        if checkpointed:
            x = recompute.checkpoint(run, group_start, group_end, x, rng_tracker=rng)
        else:
            x = run(group_start, group_end, x)
    return x


def language_model_head(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None, tp_group: Group, sequence_parallel
) -> torch.Tensor:
    """The final LayerNorm's output [b, s(/tp), h] -> logits [b, s, V] (model dtype), or with labels [b, s]
    the per-token cross-entropy float32 [b, s]. `weight` [V(/tp), h] is the output projection (this
    rank's vocabulary rows under TP)."""
    # x enters the TP region inside the GEMMs, which keep only the sequence chunk for backward under
    # sequence parallelism and sum the hidden gradient over TP
    if labels is None:
        logits = parallel_layers.column_parallel_linear(
            x, [weight], [None], tp_group, sequence_parallel=sequence_parallel
        )  # [b, s, V/tp]
        return mappings.gather_from_tensor_parallel_region(logits, tp_group)  # [b, s, V]
    b, s = labels.shape
    hidden = x if sequence_parallel else x.reshape(b * s, x.shape[-1])  # [b, s/tp, h] or [b*s, h]
    loss = linear_cross_entropy(
        hidden,
        weight,
        labels.reshape(b * s),
        tp_group,
        input_mapping="gather" if sequence_parallel else "copy",
    )  # [b*s]
    return loss.view(b, s)  # the same on every TP rank


class GPTModel(nn.Module):
    """StarCoder-style GPT, the whole model (every layer; any tensor-parallel size): see the module
    docstring for the parameter names.

    `config` is the run's `ModelConfig`, `vocab_size` the padded vocabulary. Build with `device="meta"` to
    count parameters without allocating. Construction leaves PyTorch's default init; call
    `init_weights(seed)` for the model's own layout-invariant initialisation (`megatron.model.init`).
    """

    def __init__(
        self, config: ModelConfig, vocab_size: int, parallel_state=None, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.tp_group = TRIVIAL if parallel_state is None else parallel_state.tp_group
        self.sequence_parallel = layers.sequence_parallel(parallel_state)
        self.rng = None if parallel_state is None else parallel_state.rng  # replayed by recomputation
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.embedding = Embedding(config, vocab_size, **kw)
        self.layers = LayerDict(
            {str(i): TransformerLayer(config, i + 1, **kw) for i in range(config.num_layers)}
        )
        self.final_layernorm = final_layer_norm(config, **kw)
        self.output_layer = None
        if config.untie_embeddings_and_output_weights:
            self.output_layer = output_embedding(config, vocab_size, **kw)

    @property
    def output_weight(self) -> nn.Parameter:
        """The [V, h] output projection ([V / tp, h] shard under TP): the word embedding unless untied."""
        return (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens int64 [b, s] -> logits [b, s, V] (model dtype), or with labels [b, s] the per-token
        cross-entropy float32 [b, s]. attention_mask: None = causal, else bool [b, 1, s, s] with
        True = masked out. Under TP every rank passes the same inputs and gets the same whole result.

        Inference: with `kv_cache` (from `new_kv_cache`; eval mode, TP 1) the tokens continue the
        positions the cache holds, whose keys and values they attend to and extend; left padding is
        marked with `kv_cache.mark_padding` beforehand. `last_only`: logits of the last position only.
        """
        start = 0 if kv_cache is None else self._begin_cached(kv_cache, tokens, attention_mask)
        x = self.embedding(tokens, position_ids, start)  # [b, s, h] ([b, s/tp, h] under SP)
        if kv_cache is None:
            x = run_layers(self.layers, 0, len(self.layers), x, attention_mask, self.config, self.rng)
        else:  # each layer attends over, and appends to, its part of the cache
            for i, layer in enumerate(self.layers.values()):
                x = layer(x, kv_cache=kv_cache.layers[i])
            kv_cache.end()
        if last_only:
            x = x[:, -1:]  # [b, 1, h]
        return language_model_head(
            self.final_layernorm(x), self.output_weight, labels, self.tp_group, self.sequence_parallel
        )

    def new_kv_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty `KVCache` for `batch_size` sequences of `max_length` positions (default and at most
        max_position_embeddings), in the model's dtype and device."""
        if not self.tp_group.is_trivial:
            raise RuntimeError(
                "the KV cache runs at tensor parallel size 1: load the checkpoint into one process "
                "(megatron.inference.generate.load_model_from_checkpoint)"
            )
        positions = self.embedding.position_embeddings.num_embeddings
        max_length = positions if max_length is None else max_length
        if not 0 < max_length <= positions:
            raise ValueError(
                f"KV cache max_length={max_length}: must be in 1..max_position_embeddings={positions}"
            )
        attention = self.layers[0].attention
        weight = self.embedding.word_embeddings.weight
        return KVCache(
            len(self.layers),
            batch_size,
            max_length,
            attention.num_kv_heads,
            attention.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    def _begin_cached(self, kv_cache: KVCache, tokens: torch.Tensor, attention_mask) -> int:
        if self.training:
            raise RuntimeError("the KV cache is for inference: call model.eval() first")
        if attention_mask is not None:
            raise ValueError("with a KV cache, mark padding with kv_cache.mark_padding, not attention_mask")
        return kv_cache.begin(tokens.shape[1])

    def init_weights(self, seed: int) -> None:
        """Initialise every parameter as a function of (seed, parameter name, element position), this
        rank's shard only; see `megatron.model.init`."""
        init.init_weights(self, seed, self.tp_group.rank)


def final_layer_norm(config: ModelConfig, parallel_state=None, device=None, dtype=None) -> nn.LayerNorm:
    """The LayerNorm after the last block (`final_layernorm`)."""
    return layers.layer_norm(
        config.hidden_size,
        eps=config.layernorm_epsilon,
        parallel_state=parallel_state,
        device=device,
        dtype=dtype,
    )


def output_embedding(config: ModelConfig, vocab_size: int, parallel_state=None, device=None, dtype=None):
    """A [V, h] matrix laid out as the word embedding (vocabulary rows split over TP): the untied output
    layer, or a pipeline stage's copy of the tied word embedding."""
    return layers.vocab_embedding(
        vocab_size,
        config.hidden_size,
        init_std=config.init_method_std,
        parallel_state=parallel_state,
        device=device,
        dtype=dtype,
    )
