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

Pipeline parallelism (`parallel_state.pipeline_model_parallel_size` > 1): each stage builds only its
part, so every name stays logical and `init_weights` gives a stage the one-process model's same-named
weights. The decoder layers a rank holds (one range per model chunk, `partition.pipeline_layer_ranges`)
sit in `layers` under their global index (`layers.5.attention.query.weight`). The first stage holds the
embedding, the last the final LayerNorm and the output layer. With tied embeddings a last stage that is
not also the first holds its own copy of the word embedding under the same name
(`embedding.word_embeddings.weight`, identical init) with the attribute `pipeline_duplicate = True`;
both copies carry `embedding_group_reduce = True`: their gradients are summed over
`parallel_state.embedding_group` after backward so they stay identical (neither attribute exists at
PP 1). `forward_chunk` runs one chunk: tokens -> hidden on the first, hidden -> hidden in the middle,
hidden -> loss (or logits) on the last.

Activation recomputation (`config.recompute_granularity`, `megatron.model.recompute`): "full" reruns
groups of layers in backward, "selective" only the attention core; dropout draws are replayed, so the
gradients are bit-identical to no recomputation.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron.model import layers, partition, recompute
from megatron.model.attention import KVCache, SelfAttention, attention_with_cache
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


class LayerDict(nn.ModuleDict):
    """The decoder layers a model holds, keyed by their global (logical) index, so that parameter names
    are `layers.{i}.*` at every pipeline layout; `layers[i]` takes that index as an int too."""

    def __getitem__(self, key) -> nn.Module:
        return super().__getitem__(str(key))

    def __contains__(self, key) -> bool:
        return super().__contains__(str(key))


class OutputEmbedding(nn.Module):
    """The last pipeline stage's copy of the tied word embedding, used as the output weight: the same
    logical name (`embedding.word_embeddings.weight`) and init as the first stage's, marked
    `pipeline_duplicate` (see the module docstring)."""

    def __init__(self, config, vocab_size: int, parallel_state=None, device=None, dtype=None) -> None:
        super().__init__()
        self.word_embeddings = layers.vocab_embedding(
            vocab_size,
            config.hidden_size,
            init_std=config.init_method_std,
            parallel_state=parallel_state,
            device=device,
            dtype=dtype,
        )


class GPTModel(nn.Module):
    """StarCoder-style GPT: see the module docstring for the parameter names.

    `GPTModel(config, vocab_size, parallel_state=None, *, device=None, dtype=None, parallel_config=None)`:
    `config` is a `ModelConfig` (attribute names as in the contract), `vocab_size` the padded vocabulary.
    Under pipeline parallelism the model holds only this rank's part: the layer ranges of
    `partition.pipeline_layer_ranges` for `parallel_state`'s pipeline rank and the layout flags of
    `parallel_config` (a `ParallelConfig`; None: an even split, not interleaved), run chunk by chunk with
    `forward_chunk`. Build with `device="meta"` to count parameters without allocating. Construction
    leaves PyTorch's default init; call `init_weights(seed)` for the model's own (layout-invariant)
    initialisation.
    """

    def __init__(
        self, config, vocab_size: int, parallel_state=None, *, device=None, dtype=None, parallel_config=None
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.tp_group = TRIVIAL if parallel_state is None else parallel_state.tp_group
        self.sequence_parallel = layers.sequence_parallel(parallel_state)
        self.tensor_model_parallel_rank = (
            0 if parallel_state is None else parallel_state.tensor_model_parallel_rank
        )
        self.rng = None if parallel_state is None else parallel_state.rng  # replayed by recomputation
        pp, pp_rank = _pipeline_position(parallel_state)
        self.chunk_ranges = tuple(
            partition.pipeline_layer_ranges(
                config.num_layers, pp, pp_rank, **partition.pipeline_layout(parallel_config)
            )
        )
        self.is_first_stage, self.is_last_stage = pp_rank == 0, pp_rank == pp - 1
        tied = not config.untie_embeddings_and_output_weights
        kw = dict(device=device, dtype=dtype)
        self.embedding = self.final_layernorm = self.output_layer = None
        if self.is_first_stage:
            self.embedding = Embedding(config, vocab_size, parallel_state, **kw)
        elif self.is_last_stage and tied:
            self.embedding = OutputEmbedding(config, vocab_size, parallel_state, **kw)
        self.layers = LayerDict(
            {
                str(i): TransformerLayer(config, i + 1, parallel_state, **kw)
                for start, end in self.chunk_ranges
                for i in range(start, end)
            }
        )
        if self.is_last_stage:
            self.final_layernorm = layers.layer_norm(
                config.hidden_size, eps=config.layernorm_epsilon, parallel_state=parallel_state, **kw
            )
            if not tied:
                self.output_layer = layers.vocab_embedding(
                    vocab_size,
                    config.hidden_size,
                    init_std=config.init_method_std,
                    parallel_state=parallel_state,
                    **kw,
                )
        if pp > 1 and tied and self.embedding is not None:  # first and last stage: keep both copies equal
            self.embedding.word_embeddings.weight.embedding_group_reduce = True
            if not self.is_first_stage:
                self.embedding.word_embeddings.weight.pipeline_duplicate = True

    @property
    def num_chunks(self) -> int:
        """Model chunks this rank holds (virtual pipeline stages; 1 unless interleaved)."""
        return len(self.chunk_ranges)

    def chunk_is_first(self, chunk: int) -> bool:
        """Chunk `chunk` holds the embedding (takes tokens): the first pipeline stage's chunk 0."""
        return self.is_first_stage and chunk == 0

    def chunk_is_last(self, chunk: int) -> bool:
        """Chunk `chunk` holds the final LayerNorm and the output layer (returns the loss or logits):
        the last pipeline stage's last chunk."""
        return self.is_last_stage and chunk == self.num_chunks - 1

    def pipeline_hidden_shape(self, micro_batch_size: int, seq_length: int) -> tuple[int, int, int]:
        """The shape of the hidden states passed between stages: [b, s, h], [b, s / tp, h] under
        sequence parallelism."""
        s = seq_length // self.tp_group.size if self.sequence_parallel else seq_length
        return (micro_batch_size, s, self.config.hidden_size)

    @property
    def output_weight(self) -> nn.Parameter:
        """The [V, h] output projection ([V / tp, h] shard under TP): the word embedding itself unless
        untied. Only on the last pipeline stage."""
        if self.output_layer is not None:
            return self.output_layer.weight
        if not self.is_last_stage:
            raise AttributeError("output_weight: only the last pipeline stage holds the output layer")
        return self.embedding.word_embeddings.weight

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None) -> torch.Tensor:
        """tokens int64 [b, s] -> logits [b, s, V] (model dtype), or with labels [b, s] the per-token
        cross-entropy float32 [b, s]. attention_mask: None = causal, else bool [b, 1, s, s] with
        True = masked out. Under TP every rank passes the same inputs and gets the same whole result.
        Only for a model that holds every layer (pipeline parallel size 1): see `forward_chunk`."""
        if not (self.num_chunks == 1 and self.chunk_is_first(0) and self.chunk_is_last(0)):
            raise RuntimeError(
                "GPTModel.forward runs the whole model, but this pipeline stage holds layers "
                f"{self.chunk_ranges} only; run its chunks with forward_chunk (megatron.parallel.pipeline)"
            )
        return self.forward_chunk(
            0, tokens=tokens, position_ids=position_ids, attention_mask=attention_mask, labels=labels
        )

    def forward_chunk(
        self, chunk: int, *, tokens=None, hidden=None, position_ids=None, attention_mask=None, labels=None
    ) -> torch.Tensor:
        """Run model chunk `chunk` (its layers `chunk_ranges[chunk]`).

        Input: `tokens` int64 [b, s] (and `position_ids`) when `chunk_is_first(chunk)`, else `hidden`, the
        previous stage's output [b, s, h] ([b, s/tp, h] under sequence parallelism). `attention_mask` as
        in `forward`, on every chunk. Output: on the last chunk the per-token loss float32 [b, s] when
        `labels` are given, else the logits [b, s, V] (vocabulary gathered); otherwise the hidden states
        for the next stage [b, s(/tp), h].
        """
        first = self.chunk_is_first(chunk)
        if (tokens is None) == first or (hidden is None) != first:
            wanted = "tokens (it holds the embedding)" if first else "hidden (the previous stage's output)"
            raise ValueError(f"forward_chunk({chunk}) takes {wanted}")
        start, end = self.chunk_ranges[chunk]
        # [b, s, h] ([b, s/tp, h] under sequence parallelism) from here on
        x = self.embedding(tokens, position_ids) if first else hidden
        for group_start, group_end, checkpointed in recompute.layer_groups(
            start,
            end,
            getattr(self.config, "recompute_granularity", None),
            getattr(self.config, "recompute_method", None),
            getattr(self.config, "recompute_num_layers", None),
        ):
            if checkpointed:
                x = recompute.checkpoint(
                    self._run_layers, group_start, group_end, x, attention_mask, rng_tracker=self.rng
                )
            else:
                x = self._run_layers(group_start, group_end, x, attention_mask)
        if not self.chunk_is_last(chunk):
            return x
        return self._output(self.final_layernorm(x), labels)

    def _run_layers(self, start: int, end: int, x: torch.Tensor, attention_mask) -> torch.Tensor:
        for i in range(start, end):
            x = self.layers[i](x, attention_mask)  # [b, s, h] ([b, s/tp, h])
        return x

    def _output(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The final LayerNorm's output [b, s(/tp), h] -> logits or per-token loss."""
        if not self.tp_group.is_trivial:
            return self._tensor_parallel_output(x, labels)
        b, s = x.shape[:2]
        if labels is None:
            return F.linear(x, self.output_weight)  # [b, s, V]
        loss = linear_cross_entropy(x.reshape(b * s, -1), self.output_weight, labels.reshape(b * s))  # [b*s]
        return loss.view(b, s)

    def new_kv_cache(self, batch_size: int, max_length: int | None = None) -> KVCache:
        """An empty `KVCache` for `forward_with_cache`: `max_length` positions (default and at most
        max_position_embeddings) for `batch_size` sequences, in the model's dtype and device."""
        self._check_whole_model("forward_with_cache")
        positions = self.embedding.position_embeddings.num_embeddings
        max_length = positions if max_length is None else max_length
        if not 0 < max_length <= positions:
            raise ValueError(
                f"KV cache max_length={max_length}: must be in 1..max_position_embeddings={positions}"
            )
        attention = self.layers[self.chunk_ranges[0][0]].attention
        weight = self.embedding.word_embeddings.weight
        return KVCache(
            self.config.num_layers,
            batch_size,
            max_length,
            attention.num_kv_heads,
            attention.head_dim,
            dtype=weight.dtype,
            device=weight.device,
        )

    @torch.no_grad()
    def forward_with_cache(
        self, tokens: torch.Tensor, cache: KVCache, *, positions=None, attention_mask=None, last_only=False
    ) -> torch.Tensor:
        """Incremental inference: tokens int64 [b, t] continue the `cache.length` positions `cache` holds
        (their keys and values are appended) -> logits [b, t, V] ([b, 1, V] with `last_only`).

        `positions` int64 [b, t] are the position-embedding indices (default cache.length + 0..t-1);
        `attention_mask` bool [b, t], True = a real token, marks left padding (its keys are masked for
        every later query). Eval only, TP 1 and PP 1: checkpoints of any layout load into one process.
        """
        self._check_whole_model("forward_with_cache")
        if self.training:
            raise RuntimeError("forward_with_cache is for inference: call model.eval() first")
        b, t = tokens.shape
        start = cache.length
        if start + t > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} positions; {start} used + {t} new exceed it")
        if attention_mask is not None:
            cache.mark_padding(start, attention_mask)
        if positions is None:
            x = (
                self.embedding.word_embeddings(tokens)
                + self.embedding.position_embeddings.weight[start : start + t]
            )
        else:
            x = self.embedding.word_embeddings(tokens) + self.embedding.position_embeddings(
                positions
            )  # [b, t, h]
        bias = cache.attention_bias(start, t)  # None, [b, 1, L] or [b, t, L]
        for i in range(self.config.num_layers):
            layer = self.layers[i]
            x = x + attention_with_cache(layer.attention, layer.input_layernorm(x), cache, i, bias)
            x = x + _mlp_inference(layer.mlp, layer.post_attention_layernorm(x))  # [b, t, h]
        cache.length = start + t
        if last_only:
            x = x[:, -1:]
        x = self.final_layernorm(x)
        return layers.matmul_nt(x.reshape(-1, x.shape[-1]), self.output_weight).view(b, x.shape[1], -1)

    def _check_whole_model(self, what: str) -> None:
        if not (self.num_chunks == 1 and self.chunk_is_first(0) and self.chunk_is_last(0)):
            raise RuntimeError(f"{what} needs the whole model in one process (pipeline parallel size 1)")
        if not self.tp_group.is_trivial:
            raise RuntimeError(
                f"{what} runs at tensor parallel size 1: load the checkpoint into one process "
                "(megatron.inference.generate.load_model_from_checkpoint)"
            )

    def chunk_named_parameters(self, chunk: int) -> list[tuple[str, nn.Parameter]]:
        """(logical name, parameter) of the parameters chunk `chunk` uses, in model order; the chunks'
        lists partition `named_parameters()`."""
        start, end = self.chunk_ranges[chunk]
        prefixes = tuple(f"layers.{i}." for i in range(start, end))
        if self.chunk_is_first(chunk) or self.chunk_is_last(chunk):
            prefixes += ("embedding.",)
        if self.chunk_is_last(chunk):
            prefixes += ("final_layernorm.", "output_layer.")
        return [(name, param) for name, param in self.named_parameters() if name.startswith(prefixes)]

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


def _mlp_inference(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """`mlp(x)` without the autograd wrapper of the training linears (the same GEMMs and GELU)."""
    b, t, h = x.shape
    up, down = mlp.dense_h_to_4h, mlp.dense_4h_to_h
    hidden = F.gelu(layers.matmul_nt(x.reshape(b * t, h), up.weight, up.bias), approximate=mlp.approximate)
    return layers.matmul_nt(hidden, down.weight, down.bias).view(b, t, h)


def _pipeline_position(parallel_state) -> tuple[int, int]:
    """(pipeline parallel size, this rank's pipeline rank); (1, 0) for one process."""
    if parallel_state is None:
        return 1, 0
    return parallel_state.pipeline_model_parallel_size, parallel_state.pipeline_model_parallel_rank


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
