"""Random streams under tensor parallelism: the default stream and the per-rank "model-parallel" stream.

Two kinds of dropout exist under TP:
- on activations every TP rank holds whole (the residual stream without sequence parallelism): the mask
  must be the same on every TP rank, or the replicas diverge. It draws from torch's default generator,
  seeded identically on every TP rank (seed + 100 * pipeline rank, as Megatron).
- on activations split across TP ranks (attention probabilities of this rank's heads, and the residual
  stream's sequence shard under sequence parallelism): each rank must draw a different mask, else the
  shards are correlated. It draws from the tracker's stream, seeded with
  seed + 2718 + tensor rank + 100 * pipeline rank, entered with `with tracker.fork(): ...`.

`fork()` swaps the generator state of the device in and out (the CPU generator, or the current CUDA
device's), so the default stream continues as if the forked draws never happened. Both streams are
reproducible from the seed and the layout, and `state_dict()` captures the tracker for checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

MODEL_PARALLEL_SEED_OFFSET = 2718


class RNGTracker:
    """The model-parallel random stream of this rank (see the module docstring)."""

    def __init__(self) -> None:
        self._states: dict[str, torch.Tensor] = {}
        self.seed_value: int | None = None

    def seed(self, seed: int, *, tensor_parallel_rank: int = 0, pipeline_parallel_rank: int = 0) -> None:
        """(Re)start the stream from `seed` for this rank, for the CPU and, if present, the CUDA device."""
        value = seed + MODEL_PARALLEL_SEED_OFFSET + tensor_parallel_rank + 100 * pipeline_parallel_rank
        self.seed_value = value
        self._reset(value)

    def _reset(self, value: int) -> None:
        generator = torch.Generator(device="cpu").manual_seed(value)
        self._states = {"cpu": generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
                torch.cuda.manual_seed(value)
                self._states["cuda"] = torch.cuda.get_rng_state()

    @contextmanager
    def fork(self, device: torch.device | str = "cpu"):
        """Draw from this rank's stream inside the block; the default stream is untouched."""
        kind = torch.device(device).type
        if kind not in ("cpu", "cuda"):
            yield
            return
        if kind not in self._states:
            if self.seed_value is None:
                raise RuntimeError(
                    "RNGTracker.fork() before seed(): seed the tracker when building the model"
                )
            self._reset(self.seed_value)  # CUDA was initialised after seeding
            if kind not in self._states:
                raise RuntimeError(f"RNGTracker has no state for device type {kind!r}")
        get = torch.get_rng_state if kind == "cpu" else torch.cuda.get_rng_state
        put = torch.set_rng_state if kind == "cpu" else torch.cuda.set_rng_state
        outer = get()
        put(self._states[kind])
        try:
            yield
        finally:
            self._states[kind] = get()
            put(outer)

    def state_dict(self) -> dict:
        return {"seed_value": self.seed_value, "states": {k: v.clone() for k, v in self._states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.seed_value = state["seed_value"]
        self._states = {k: v.clone() for k, v in state["states"].items()}
