"""Minimal single-process `ParallelState`: the seam that the tensor/data/pipeline parallel issue replaces.

Everything that later needs a process group (gradient-norm reduction, data-parallel loss averaging, the
data loader's rank slice) takes a `ParallelState` argument today, so the parallel version can be dropped in
without changing the callers. At world size 1 every reduction is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelState:
    """Ranks and sizes of this process in the (tensor, pipeline, data) parallel layout."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    tensor_model_parallel_size: int = 1
    tensor_model_parallel_rank: int = 0
    pipeline_model_parallel_size: int = 1
    pipeline_model_parallel_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int = 0

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelState:
        """One process: CUDA device 0 when available, else the CPU (or the device given)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(device=torch.device(device))

    @property
    def is_main_rank(self) -> bool:
        """True on the rank that prints logs and writes metrics (global rank 0)."""
        return self.rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.pipeline_model_parallel_size - 1

    def all_reduce_model_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the tensor- and pipeline-parallel ranks (identity in one process)."""
        self._check_single()
        return tensor

    def all_reduce_data_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the data-parallel ranks (identity in one process)."""
        self._check_single()
        return tensor

    def _check_single(self) -> None:
        assert self.world_size == 1, "this ParallelState only implements one process"
