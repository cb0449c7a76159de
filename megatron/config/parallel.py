"""Parallel layout (`cfg.parallel`)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_choice, require_positive

# strict: gloo that checks NCCL's rules (megatron/parallel/strict_backend.py)
DISTRIBUTED_BACKENDS = ("nccl", "gloo", "strict")


@dataclass
class ParallelConfig:
    """Tensor/pipeline/data parallel degrees; data-parallel size = world size / (TP * PP)."""

    tensor_model_parallel_size: int = arg(1, "Tensor model parallel degree (splits heads and MLP columns).")
    pipeline_model_parallel_size: int = arg(
        1, "Pipeline model parallel degree (splits the layers into stages)."
    )
    sequence_parallel: bool = arg(
        False, "Shard LayerNorm/dropout activations along the sequence over the tensor-parallel group."
    )
    use_distributed_optimizer: bool = arg(
        False, "Shard optimizer state over the data-parallel group (ZeRO-1)."
    )
    overlap_grad_reduce: bool = arg(
        False, "Overlap the data-parallel gradient reduction with the backward pass."
    )
    overlap_param_gather: bool = arg(
        False,
        "Overlap the distributed optimizer's all-gather of updated parameters with the next forward pass "
        "(each module waits for its own parameters); needs --use-distributed-optimizer.",
    )
    ddp_bucket_size: int | None = arg(
        None,
        "Elements per data-parallel gradient bucket (default max(40M, 1M x data-parallel size)); smaller "
        "buckets start their reduction earlier under --overlap-grad-reduce.",
    )
    check_replicas_interval: int = arg(
        0,
        "Debug: every N iterations check that tensor-parallel replicated parameters (multi-query K/V, "
        "LayerNorms, row-parallel biases) and data-parallel replicas are bit-identical, naming the first "
        "that is not (0 = off).",
    )
    data_parallel_size: int | None = arg(
        None,
        "Data-parallel degree, to check the launch: the world size must equal TP x PP x this (default: "
        "derived, world size / (TP x PP)). Under --dry-run without WORLD_SIZE it sets the planned world "
        "size, so a 512-GPU plan runs on a laptop (without it a dry run plans data-parallel size 1).",
    )
    distributed_timeout_minutes: float = arg(
        10.0,
        "Timeout of the rendezvous and of collective operations, in minutes (fractions allowed): a rank "
        "missing or unreachable at start-up fails within it. For collectives it is raised to "
        "--hang-timeout-minutes + 2 while the hang watchdog is on, so the watchdog reports a stuck "
        "collective first.",
    )
    distributed_backend: str | None = arg(
        None,
        "torch.distributed backend (default: nccl on GPUs, gloo on CPUs). strict: gloo that fails on what NCCL "
        "would not run (collectives issued in different orders or shapes across ranks, point-to-point messages "
        "only tags keep apart, non-contiguous tensors); CPU only, for tests.",
        choices=DISTRIBUTED_BACKENDS,
    )
    num_layers_per_virtual_pipeline_stage: int | None = arg(
        None,
        "Layers per virtual pipeline stage (interleaved 1F1B schedule): each stage holds --num-layers / "
        "(--pipeline-model-parallel-size x this) chunks, virtual stage v * PP + r being stage r's chunk v; "
        "default: not interleaved.",
    )
    decoder_first_pipeline_num_layers: int | None = arg(
        None,
        "Transformer layers on the first pipeline stage (uneven split; it also holds the embedding); the "
        "stages without an explicit count split the rest evenly. Default: an even split.",
    )
    decoder_last_pipeline_num_layers: int | None = arg(
        None,
        "Transformer layers on the last pipeline stage (uneven split; it also holds the final LayerNorm and "
        "the output layer); the stages without an explicit count split the rest evenly. Default: an even "
        "split.",
    )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP * PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def pipeline_layout(self) -> dict[str, int | None]:
        """The layout keywords of `pipeline_layer_ranges` (first/last stage layers, layers per virtual
        stage) from these flags."""
        return {
            "first_stage_layers": self.decoder_first_pipeline_num_layers,
            "last_stage_layers": self.decoder_last_pipeline_num_layers,
            "layers_per_virtual_stage": self.num_layers_per_virtual_pipeline_stage,
        }

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags and what would be valid."""
        require_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size")
        require_positive(self, "distributed_timeout_minutes")
        require_positive(
            self,
            "num_layers_per_virtual_pipeline_stage",
            "ddp_bucket_size",
            "data_parallel_size",
            allow_none=True,
        )
        require_positive(
            self, "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers", allow_none=True
        )
        if self.check_replicas_interval < 0:
            raise ConfigError(
                f"--check-replicas-interval {self.check_replicas_interval} must be >= 0 (0 turns it off)"
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ConfigError(
                "--overlap-param-gather needs --use-distributed-optimizer (only the distributed optimizer "
                "all-gathers parameters); add it or drop --overlap-param-gather"
            )
        if self.distributed_backend is not None:
            require_choice(self, "distributed_backend", DISTRIBUTED_BACKENDS)
        if self.num_layers_per_virtual_pipeline_stage is not None and self.pipeline_model_parallel_size < 2:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2, got "
                f"{self.pipeline_model_parallel_size}; drop the flag or raise the pipeline size"
            )

    def derived_data_parallel_size(self, world_size: int) -> int:
        """world_size / (TP * PP); ConfigError if it does not divide or differs from --data-parallel-size."""
        dp = self.data_parallel_size
        if dp is not None and world_size != self.model_parallel_size * dp:
            raise ConfigError(
                f"world size {world_size} (WORLD_SIZE, the number of processes launched) does not match "
                f"--tensor-model-parallel-size {self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} x --data-parallel-size {dp} = {self.model_parallel_size * dp}; "
                f"launch {self.model_parallel_size * dp} processes or change the parallel sizes"
            )
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} (WORLD_SIZE) is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {self.model_parallel_size}; launch a multiple of "
                f"{self.model_parallel_size} processes or change the parallel sizes"
            )
        return world_size // self.model_parallel_size


# ---------------------------------------------------------------------------- pipeline stage layout
# Pure functions, torch-free so that config validation (which must not import torch) runs them; the
# model imports them from `megatron.model.partition`.

_FIRST_FLAG = "--decoder-first-pipeline-num-layers"
_LAST_FLAG = "--decoder-last-pipeline-num-layers"
_VIRTUAL_FLAG = "--num-layers-per-virtual-pipeline-stage"


def pipeline_layer_ranges(
    num_layers: int,
    pp_size: int,
    pp_rank: int,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    layers_per_virtual_stage: int | None = None,
) -> list[tuple[int, int]]:
    """The global `[start, end)` decoder-layer ranges pipeline rank `pp_rank` of `pp_size` holds, one per
    model chunk, in chunk order.

    Even split by default; `first_stage_layers` / `last_stage_layers` (--decoder-first/last-pipeline-
    num-layers) fix the first / last stage's count and the other stages split the rest evenly. With
    `layers_per_virtual_stage` (interleaving) the layers form pp * v virtual stages of that size and
    virtual stage `v * pp_size + r` is rank r's chunk v (Megatron's order); it cannot be combined with an
    uneven split. A split that does not work raises ConfigError (a ValueError) naming the flags and
    numbers; no layer is ever dropped.
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ConfigError(f"pipeline rank {pp_rank} is not in [0, --pipeline-model-parallel-size {pp_size})")
    if num_layers < 1:
        raise ConfigError(f"--num-layers {num_layers} must be > 0")
    if layers_per_virtual_stage is not None:
        if first_stage_layers is not None or last_stage_layers is not None:
            raise ConfigError(
                f"{_FIRST_FLAG} / {_LAST_FLAG} cannot be combined with {_VIRTUAL_FLAG} "
                f"{layers_per_virtual_stage}: the interleaved schedule needs equal chunks; drop one of them"
            )
        size = layers_per_virtual_stage
        chunks = _virtual_chunks_per_stage(num_layers, pp_size, size)
        return [((c * pp_size + pp_rank) * size, (c * pp_size + pp_rank + 1) * size) for c in range(chunks)]
    counts = pipeline_stage_layer_counts(num_layers, pp_size, first_stage_layers, last_stage_layers)
    start = sum(counts[:pp_rank])
    return [(start, start + counts[pp_rank])]


def all_pipeline_layer_ranges(num_layers: int, pp_size: int, **layout) -> list[list[tuple[int, int]]]:
    """`pipeline_layer_ranges` of every pipeline rank (index = rank); each layer is held exactly once."""
    ranges = [pipeline_layer_ranges(num_layers, pp_size, rank, **layout) for rank in range(pp_size)]
    # the chunks tile 0..num_layers (checked per chunk, not per layer: --num-layers may be huge)
    chunks = sorted(chunk for rank_chunks in ranges for chunk in rank_chunks)
    ends = [0] + [end for _, end in chunks]
    tiled = all(start == ends[i] and start <= end for i, (start, end) in enumerate(chunks))
    assert tiled and ends[-1] == num_layers, f"layout {ranges} does not hold layers 0..{num_layers - 1} once"
    return ranges


def pipeline_stage_layer_counts(
    num_layers: int, pp_size: int, first_stage_layers: int | None = None, last_stage_layers: int | None = None
) -> list[int]:
    """Decoder layers on each pipeline stage (non-interleaved), index = pipeline rank."""
    fixed = {}
    if first_stage_layers is not None:
        fixed[0] = first_stage_layers
    if last_stage_layers is not None:
        fixed[pp_size - 1] = last_stage_layers
    if fixed and pp_size < 2:
        raise ConfigError(
            f"{_FIRST_FLAG} / {_LAST_FLAG} need --pipeline-model-parallel-size >= 2, got {pp_size}; drop them"
        )
    for rank, count in fixed.items():
        if count < 1:
            name = _FIRST_FLAG if rank == 0 else _LAST_FLAG
            raise ConfigError(f"{name} {count} must be >= 1: every pipeline stage holds at least one layer")
    others = pp_size - len(fixed)
    rest = num_layers - sum(fixed.values())
    if others == 0 and rest != 0:
        raise ConfigError(
            f"{_FIRST_FLAG} {first_stage_layers} + {_LAST_FLAG} {last_stage_layers} = "
            f"{num_layers - rest} layers, but --num-layers is {num_layers} and --pipeline-model-parallel-size "
            f"{pp_size} has no other stage to hold the difference; make them add up to {num_layers}"
        )
    if others and (rest < others or rest % others):
        raise ConfigError(_uneven_split_message(num_layers, pp_size, first_stage_layers, last_stage_layers))
    per_stage = rest // others if others else 0
    return [fixed.get(rank, per_stage) for rank in range(pp_size)]


def _virtual_chunks_per_stage(num_layers: int, pp_size: int, layers_per_virtual_stage: int) -> int:
    if pp_size < 2:
        raise ConfigError(
            f"{_VIRTUAL_FLAG} needs --pipeline-model-parallel-size >= 2, got {pp_size}; drop the flag"
        )
    if layers_per_virtual_stage < 1:
        raise ConfigError(f"{_VIRTUAL_FLAG} {layers_per_virtual_stage} must be > 0")
    virtual_stages = pp_size * layers_per_virtual_stage
    if num_layers % virtual_stages:
        hint = f"use a --num-layers that is a multiple of {virtual_stages}"
        if num_layers % pp_size == 0:
            per_stage = num_layers // pp_size
            valid = [d for d in range(1, per_stage + 1) if per_stage % d == 0]
            hint += f", or a {_VIRTUAL_FLAG} dividing the {per_stage} layers per stage: {_join(valid)}"
        raise ConfigError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp_size} x "
            f"{_VIRTUAL_FLAG} {layers_per_virtual_stage} = {virtual_stages}; {hint}"
        )
    return num_layers // virtual_stages


def _uneven_split_message(num_layers, pp_size, first, last) -> str:
    """Why `num_layers` does not split over the stages without an explicit count, and what would."""
    if first is None and last is None:
        lower = num_layers // pp_size * pp_size
        multiples = " or ".join(str(n) for n in (lower, lower + pp_size) if n >= pp_size)
        message = (
            f"--num-layers {num_layers} does not split evenly over --pipeline-model-parallel-size {pp_size} "
            f"({num_layers / pp_size:g} layers per stage); use a --num-layers that is a multiple of "
            f"{pp_size} (such as {multiples}), a --pipeline-model-parallel-size dividing {num_layers} "
            f"({_join([d for d in range(1, num_layers + 1) if num_layers % d == 0])})"
        )
        suggestion = _best_uneven_first(num_layers, pp_size)
        if suggestion is not None:
            first_count, per_stage = suggestion
            message += (
                f", or an uneven split such as {_FIRST_FLAG} {first_count} (then {per_stage} on each other "
                "stage)"
            )
        return message
    given = " and ".join(
        f"{name} {value}" for name, value in ((_FIRST_FLAG, first), (_LAST_FLAG, last)) if value is not None
    )
    others = pp_size - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    message = (
        f"--num-layers {num_layers} with {given} leaves {rest} layers for the {others} other pipeline "
        f"stage(s) of --pipeline-model-parallel-size {pp_size}, which cannot each get the same number (at "
        "least 1)"
    )
    name, fixed_other = (_FIRST_FLAG, last) if first is not None else (_LAST_FLAG, first)
    valid = [
        count
        for count in range(1, num_layers)
        if (rest_here := num_layers - count - (fixed_other or 0)) >= others and rest_here % others == 0
    ]
    if valid:
        message += f"; valid {name} values here: {_join(valid)}"
    return message


def _best_uneven_first(num_layers: int, pp_size: int) -> tuple[int, int] | None:
    """(first-stage layers, layers per other stage) of the most balanced split with only the first
    stage's count fixed, or None."""
    if pp_size < 2:
        return None
    options = [
        (max(first, (num_layers - first) // (pp_size - 1)), first, (num_layers - first) // (pp_size - 1))
        for first in range(1, num_layers)
        if (num_layers - first) % (pp_size - 1) == 0 and num_layers - first >= pp_size - 1
    ]
    if not options:
        return None
    _, first, per_stage = min(options)
    return first, per_stage


def _join(values: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")
