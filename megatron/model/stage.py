"""Pipeline stages: this rank's part of `GPTModel` under pipeline parallelism, and `build_model`.

`build_model(config, vocab_size, parallel_state, parallel_config)` returns the whole `GPTModel` at pipeline
parallel size 1, else a `GPTStage`: the decoder layers this pipeline rank holds (one range per model chunk,
`partition.pipeline_layer_ranges`; several chunks with an interleaved schedule), plus the embedding on the
first stage and the final LayerNorm and output layer on the last. Each stage builds only its part, from
the same blocks as `GPTModel` and under the same logical parameter names (`layers.5.attention.query.weight`
on whichever stage holds layer 5), so `init_weights` gives a stage the one-process model's same-named
weights and checkpoints are layout-free.

Tied embeddings: a last stage that is not also the first holds its own copy of the word embedding under
the same name (`embedding.word_embeddings.weight`, identical init) with the attribute
`pipeline_duplicate = True`; both copies carry `embedding_group_reduce = True`: their gradients are summed
over `parallel_state.embedding_group` after backward so they stay identical.

The pipeline schedules (`megatron.parallel.pipeline`) run a stage chunk by chunk through `forward_chunk`:
tokens -> hidden on the first chunk, hidden -> hidden in the middle, hidden -> loss (or logits) on the last.
"""

from __future__ import annotations

import torch
from torch import nn

from megatron.config import ModelConfig
from megatron.model import init, layers, partition
from megatron.model.fp8 import convert_to_fp8
from megatron.model.gpt import (
    Embedding,
    GPTModel,
    LayerDict,
    TransformerLayer,
    final_layer_norm,
    language_model_head,
    output_embedding,
    run_layers,
)


def build_model(
    config: ModelConfig,
    vocab_size: int,
    parallel_state=None,
    parallel_config=None,
    *,
    device=None,
    dtype=None,
) -> nn.Module:
    """This rank's model: `GPTModel` without pipeline parallelism, else its `GPTStage` for the layout flags
    of `parallel_config` (a `ParallelConfig`; None: an even split, not interleaved); with
    `config.fp8_format`, its layers' linears converted to FP8 training (`megatron.model.fp8`)."""
    if parallel_state is None or parallel_state.pipeline_model_parallel_size == 1:
        model = GPTModel(config, vocab_size, parallel_state, device=device, dtype=dtype)
    else:
        model = GPTStage(config, vocab_size, parallel_state, parallel_config, device=device, dtype=dtype)
    if config.fp8_format is not None:  # FP8 GEMMs in the layers' linears (megatron.model.fp8)
        convert_to_fp8(model, config.fp8_format)
    return model


class OutputEmbedding(nn.Module):
    """The last pipeline stage's copy of the tied word embedding, used as the output weight: the same
    logical name (`embedding.word_embeddings.weight`) and init as the first stage's."""

    def __init__(self, config: ModelConfig, vocab_size: int, parallel_state, device=None, dtype=None) -> None:
        super().__init__()
        self.word_embeddings = output_embedding(config, vocab_size, parallel_state, device, dtype)


class GPTStage(nn.Module):
    """The part of `GPTModel` one pipeline rank holds (see the module docstring), run by the pipeline
    schedules through `num_chunks`, `chunk_is_first`, `chunk_is_last`, `forward_chunk` and
    `pipeline_hidden_shape`."""

    def __init__(
        self,
        config: ModelConfig,
        vocab_size: int,
        parallel_state,
        parallel_config=None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.tp_group = parallel_state.tp_group
        self.sequence_parallel = layers.sequence_parallel(parallel_state)
        self.rng = parallel_state.rng  # replayed by recomputation
        pp, pp_rank = parallel_state.pipeline_model_parallel_size, parallel_state.pipeline_model_parallel_rank
        layout = partition.pipeline_layout(parallel_config)
        self.chunk_ranges = tuple(partition.pipeline_layer_ranges(config.num_layers, pp, pp_rank, **layout))
        self.is_first_stage, self.is_last_stage = pp_rank == 0, pp_rank == pp - 1
        tied = not config.untie_embeddings_and_output_weights
        kw = dict(parallel_state=parallel_state, device=device, dtype=dtype)
        self.embedding = self.final_layernorm = self.output_layer = None
        if self.is_first_stage:
            self.embedding = Embedding(config, vocab_size, **kw)
        elif self.is_last_stage and tied:
            self.embedding = OutputEmbedding(config, vocab_size, **kw)
        self.layers = LayerDict(
            {
                str(i): TransformerLayer(config, i + 1, **kw)
                for start, end in self.chunk_ranges
                for i in range(start, end)
            }
        )
        if self.is_last_stage:
            self.final_layernorm = final_layer_norm(config, **kw)
            if not tied:
                self.output_layer = output_embedding(config, vocab_size, **kw)
        if tied and self.embedding is not None:  # first and last stage: keep both copies equal
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
        """The [V, h] output projection ([V / tp, h] shard under TP); only on the last pipeline stage."""
        if not self.is_last_stage:
            raise AttributeError("output_weight: only the last pipeline stage holds the output layer")
        return (
            self.embedding.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        )

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"a pipeline stage has no whole-model forward: this one holds layers {self.chunk_ranges} only; "
            "run its chunks with forward_chunk (megatron.parallel.pipeline schedules them)"
        )

    def forward_chunk(
        self, chunk: int, *, tokens=None, hidden=None, position_ids=None, attention_mask=None, labels=None
    ) -> torch.Tensor:
        """Run model chunk `chunk` (its layers `chunk_ranges[chunk]`).

        Input: `tokens` int64 [b, s] (and `position_ids`) when `chunk_is_first(chunk)`, else `hidden`, the
        previous stage's output [b, s, h] ([b, s/tp, h] under sequence parallelism). `attention_mask` as
        in `GPTModel.forward`, on every chunk. Output: on the last chunk the per-token loss float32 [b, s]
        when `labels` are given, else the logits [b, s, V] (vocabulary gathered); otherwise the hidden
        states for the next stage [b, s(/tp), h].
        """
        first = self.chunk_is_first(chunk)
        if (tokens is None) == first or (hidden is None) != first:
            wanted = "tokens (it holds the embedding)" if first else "hidden (the previous stage's output)"
            raise ValueError(f"forward_chunk({chunk}) takes {wanted}")
        start, end = self.chunk_ranges[chunk]
        x = self.embedding(tokens, position_ids) if first else hidden  # [b, s(/tp), h]
        x = run_layers(self.layers, start, end, x, attention_mask, self.config, self.rng)
        if not self.chunk_is_last(chunk):
            return x
        return language_model_head(
            self.final_layernorm(x), self.output_weight, labels, self.tp_group, self.sequence_parallel
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

    def init_weights(self, seed: int) -> None:
        """The one-process model's same-named weights (`megatron.model.init`)."""
        init.init_weights(self, seed, self.tp_group.rank)
