"""`ParallelState`: this process's place in the (tensor, data, pipeline) layout and its process groups.

Rank order is Megatron's: tensor-parallel ranks are adjacent (fastest varying, so a TP group sits on one
node's fast links), then data-parallel, then pipeline stages:

    global rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank

Groups (each a `collectives.Group`; size-1 groups hold no process group and make every collective the
identity):
- tp: the ranks that split one layer's weights (same dp, pp).
- dp: the ranks that hold the same weights and see different data (same tp, pp).
- pp: the stages of one model replica (same dp, tp).
- model_parallel: all tp x pp ranks of one replica (same dp): gradient norms and overflow checks.
- embedding: the first and last pipeline stage of one pp group (they hold the tied word embedding).
- world: every rank.

Built once, by `ParallelState.initialize` (which creates the process groups; every rank must call it) or
`ParallelState.single` (one process, no torch.distributed), and passed explicitly to everything that
communicates. Nothing reads a global.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from megatron.launch import apply_launch, rendezvous_error
from megatron.parallel import strict_backend
from megatron.parallel.collectives import TRIVIAL, Group, all_reduce
from megatron.parallel.random import RNGTracker


def rank_layout(world_size: int, tensor_parallel: int, pipeline_parallel: int) -> dict[str, list[list[int]]]:
    """Every group of each kind as lists of global ranks (a pure function of the sizes).

    Returns {"tp": [...], "dp": [...], "pp": [...], "model_parallel": [...], "embedding": [...]}.
    Raises ValueError when the world size is not a multiple of tensor x pipeline parallel sizes.
    """
    tp, pp = tensor_parallel, pipeline_parallel
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor ({tp}) and pipeline ({pp}) parallel sizes must be at least 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * pp}"
        )
    dp = world_size // (tp * pp)

    def rank(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    pp_groups = [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return {
        "tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": pp_groups,
        "model_parallel": [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
        "embedding": [sorted({group[0], group[-1]}) for group in pp_groups],
    }


@dataclass(frozen=True)
class ParallelState:
    """Ranks and sizes of this process in the (tensor, pipeline, data) parallel layout, and its groups."""

    device: torch.device
    world_size: int = 1
    rank: int = 0
    tensor_model_parallel_size: int = 1
    tensor_model_parallel_rank: int = 0
    pipeline_model_parallel_size: int = 1
    pipeline_model_parallel_rank: int = 0
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    sequence_parallel: bool = False  # activations outside TP regions split along the sequence over tp
    tp_group: Group = TRIVIAL
    dp_group: Group = TRIVIAL
    pp_group: Group = TRIVIAL
    model_parallel_group: Group = TRIVIAL
    embedding_group: Group = TRIVIAL
    world_group: Group = TRIVIAL
    backend: str | None = None
    rng: RNGTracker = field(default_factory=RNGTracker, repr=False, compare=False)  # per-rank stream
    _owns_process_group: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelState:
        """One process: CUDA device 0 when available, else the CPU (or the device given)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(device=torch.device(device))

    @classmethod
    def initialize(
        cls,
        tensor_model_parallel_size: int = 1,
        pipeline_model_parallel_size: int = 1,
        *,
        sequence_parallel: bool = False,
        backend: str | None = None,
        timeout_minutes: float = 10,
        device: torch.device | str | None = None,
        collective_timeout_minutes: float | None = None,
    ) -> ParallelState:
        """Join (or create) the default process group from the launcher's environment (torchrun's
        variables; `megatron.launch.apply_launch` derives them under srun) and build every group.

        Every rank must call this, with the same sizes. backend: None picks nccl when CUDA is available,
        else gloo; "strict" is gloo with NCCL's rules checked (`strict_backend`, for CI), also chosen in
        place of gloo when MEGATRON_STRICT_COLLECTIVES=1. The device is cuda:LOCAL_RANK under nccl, else
        the CPU (unless given). At WORLD_SIZE 1 without an initialised process group, returns
        `single(device)` with no torch.distributed at all.
        Raises ValueError when a launcher variable is missing, RendezvousError when the ranks do not all
        meet within `timeout_minutes`. `collective_timeout_minutes` (default `timeout_minutes`): the
        timeout of collectives once every rank has joined (the default group's and every subgroup's).
        """
        import torch.distributed as dist

        launch = None
        if not dist.is_initialized():
            # ValueError naming the rank, host and missing variable; sets RANK/WORLD_SIZE/... under srun
            launch = apply_launch()
        if launch is not None and launch.world_size == 1:
            rank_layout(1, tensor_model_parallel_size, pipeline_model_parallel_size)  # sizes must be 1
            return cls.single(device)  # sequence parallelism needs TP > 1: nothing to split
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "gloo" and strict_backend.strict_requested():
            backend = strict_backend.BACKEND  # gloo with NCCL's rules checked (MEGATRON_STRICT_COLLECTIVES=1)
        if backend == strict_backend.BACKEND:
            strict_backend.register()
        if device is None:
            device = torch.device("cpu")
            if backend == "nccl":
                # srun may give each task only its own GPU (CUDA_VISIBLE_DEVICES): wrap to what is visible
                local_rank = int(os.environ.get("LOCAL_RANK", "0"))
                device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        owns = False
        if launch is not None:
            try:
                dist.init_process_group(
                    backend=backend,
                    timeout=timedelta(minutes=timeout_minutes),
                    rank=launch.rank,
                    world_size=launch.world_size,
                    store=restart_store(launch, timedelta(minutes=timeout_minutes)),
                )
            except (RuntimeError, TimeoutError, OSError) as error:  # DistError is a RuntimeError
                raise RendezvousError(rendezvous_error(launch, timeout_minutes, error)) from error
            owns = True
        collective = timedelta(minutes=collective_timeout_minutes or timeout_minutes)
        set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # private, torch >= 2.3
        if owns and collective != timedelta(minutes=timeout_minutes) and set_timeout is not None:
            set_timeout(collective)  # the default group's collectives; the rendezvous used timeout_minutes
        return cls._build(
            dist.get_world_size(),
            dist.get_rank(),
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            sequence_parallel=sequence_parallel,
            device=device,
            backend=dist.get_backend(),
            timeout=collective,
            owns=owns,
        )

    @classmethod
    def _build(cls, world_size, rank, tp, pp, *, sequence_parallel, device, backend, timeout, owns):
        import torch.distributed as dist

        layout = rank_layout(world_size, tp, pp)
        groups: dict[str, Group] = {}
        for kind in ("tp", "dp", "pp", "model_parallel", "embedding"):
            for ranks in layout[kind]:
                # new_group is collective over the world: every rank creates every group, in one order
                pg = dist.new_group(ranks, timeout=timeout) if 1 < len(ranks) < world_size else None
                if len(ranks) == world_size and world_size > 1:
                    pg = dist.group.WORLD
                if rank in ranks:
                    groups[kind] = Group(tuple(ranks), ranks.index(rank), pg, kind)
        groups.setdefault("embedding", TRIVIAL)  # a middle pipeline stage is in no embedding group
        world = Group(tuple(range(world_size)), rank, dist.group.WORLD if world_size > 1 else None, "world")
        dp = world_size // (tp * pp)
        return cls(
            device=device,
            world_size=world_size,
            rank=rank,
            tensor_model_parallel_size=tp,
            tensor_model_parallel_rank=groups["tp"].rank,
            pipeline_model_parallel_size=pp,
            pipeline_model_parallel_rank=groups["pp"].rank,
            data_parallel_size=dp,
            data_parallel_rank=groups["dp"].rank,
            sequence_parallel=bool(sequence_parallel and tp > 1),
            tp_group=groups["tp"],
            dp_group=groups["dp"],
            pp_group=groups["pp"],
            model_parallel_group=groups["model_parallel"],
            embedding_group=groups["embedding"],
            world_group=world,
            backend=backend,
            _owns_process_group=owns,
        )

    @property
    def is_main_rank(self) -> bool:
        """True on the rank that prints logs and writes metrics (global rank 0)."""
        return self.rank == 0

    @property
    def is_first_pipeline_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == 0

    @property
    def is_last_pipeline_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.pipeline_model_parallel_size - 1

    def seed(self, seed: int) -> None:
        """Seed python, numpy and torch's default stream (seed + 100 * pipeline rank, the same on every
        tensor- and data-parallel rank) and this rank's model-parallel stream `rng`."""
        import random

        import numpy as np

        base = seed + 100 * self.pipeline_model_parallel_rank
        random.seed(base)
        np.random.seed(base % 2**32)
        torch.manual_seed(base)
        self.rng.seed(
            seed,
            tensor_parallel_rank=self.tensor_model_parallel_rank,
            pipeline_parallel_rank=self.pipeline_model_parallel_rank,
        )

    def all_reduce_model_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the tensor- and pipeline-parallel ranks of this replica."""
        return all_reduce(tensor, self.model_parallel_group)

    def all_reduce_data_parallel(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over the data-parallel ranks."""
        return all_reduce(tensor, self.dp_group)

    def all_reduce_world(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` in place over every rank."""
        return all_reduce(tensor, self.world_group)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def destroy(self) -> None:
        """Tear down the default process group if `initialize` created it."""
        if self._owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            # free the process groups (and gloo's threads) now, not during interpreter shutdown, where
            # destroying them aborted about one two-rank run in four ("terminate called without an
            # active exception", exit -6) after a successful run
            gc.collect()

    def describe(self) -> str:
        """One line for the start-of-run log."""
        return (
            f"world {self.world_size} = TP {self.tensor_model_parallel_size} x PP "
            f"{self.pipeline_model_parallel_size} x DP {self.data_parallel_size}"
            f"{' with sequence parallelism' if self.sequence_parallel else ''}; backend {self.backend or 'none'}, "
            f"device {self.device}"
        )


def restart_store(launch, timeout: timedelta, environ=None):
    """The key-value store of this attempt under torchrun's agent store, else None (env:// makes its own).

    torchrun (torch.distributed.elastic) serves one store for the whole job and keeps it across restarts
    of the worker group; gloo publishes each rank's address in it under fixed keys, so a restarted round
    would read the dead round's addresses and fail to connect (pytorch/pytorch#167288). Prefixing every
    key with the restart count (TORCHELASTIC_RESTART_COUNT) gives each round a clean namespace.
    """
    import torch.distributed as dist

    environ = os.environ if environ is None else environ
    if environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    store = dist.TCPStore(
        launch.master_addr,
        launch.master_port,
        world_size=launch.world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"megatron/restart_{attempt}/", store)


class RendezvousError(RuntimeError):
    """The default process group could not be formed (a rank missing, an unreachable MASTER_ADDR) within
    the timeout; the message names this rank, its host and the rendezvous address."""
