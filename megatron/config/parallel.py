"""Parallel layout (`cfg.parallel`)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_choice, require_positive

DISTRIBUTED_BACKENDS = ("nccl", "gloo")


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
    distributed_timeout_minutes: int = arg(10, "Timeout of collective operations, in minutes.")
    distributed_backend: str | None = arg(
        None, "torch.distributed backend (default: nccl on GPUs, gloo on CPUs).", choices=DISTRIBUTED_BACKENDS
    )
    num_layers_per_virtual_pipeline_stage: int | None = arg(
        None, "Layers per virtual pipeline stage (interleaved 1F1B schedule); default: not interleaved."
    )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP * PP."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags and what would be valid."""
        require_positive(self, "tensor_model_parallel_size", "pipeline_model_parallel_size")
        require_positive(self, "distributed_timeout_minutes")
        require_positive(self, "num_layers_per_virtual_pipeline_stage", "ddp_bucket_size", allow_none=True)
        if self.check_replicas_interval < 0:
            raise ConfigError(
                f"--check-replicas-interval {self.check_replicas_interval} must be >= 0 (0 turns it off)"
            )
        if self.distributed_backend is not None:
            require_choice(self, "distributed_backend", DISTRIBUTED_BACKENDS)
        if self.num_layers_per_virtual_pipeline_stage is not None and self.pipeline_model_parallel_size < 2:
            raise ConfigError(
                "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2, got "
                f"{self.pipeline_model_parallel_size}; drop the flag or raise the pipeline size"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """world_size / (TP * PP); ConfigError if it does not divide."""
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} (WORLD_SIZE) is not divisible by --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} = {self.model_parallel_size}; launch a multiple of "
                f"{self.model_parallel_size} processes or change the parallel sizes"
            )
        return world_size // self.model_parallel_size
