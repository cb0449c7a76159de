"""Saving, first phase: what a sharded checkpoint holds, gathered on the CPU at the `save` call (the model,
the optimizer state assembled into per-parameter tensors, the generator states, the saving layout), so
the write phase can run while training changes the model. See docs/checkpoints.md.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.checkpoint.dcp_io import CheckpointGroup, TensorLayout
from megatron.checkpoint.files import MOMENTS, rng_key
from megatron.checkpoint.single_file import plain
from megatron.parallel import collectives
from megatron.parallel.state import ParallelState

_ASSEMBLY_CHUNK_ELEMENTS = 1 << 26  # distributed-optimizer assembly: at most 256 MiB of fp32 at a time


def plain_json(value):
    """A config/extra value as JSON-able Python (dataclasses and `to_dict()` objects as dicts)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    return plain(value)


def stage_tensors(
    model,
    optimizer,
    parallel_state: ParallelState,
    layout: TensorLayout,
    group: CheckpointGroup,
    *,
    copy: bool,
) -> dict:
    """The DCP state dict of the model and optimizer: CPU tensors (copies when `copy`), wrapped as
    DTensors when there are several ranks."""
    params = _saved_params(model)
    state = {f"model/{name}": layout.wrap(_to_cpu(param, copy), param) for name, param in params}
    if optimizer is not None:
        by_name = dict(params)
        for key, tensor in _stage_optimizer(optimizer, params, parallel_state, copy).items():
            state[key] = layout.wrap(tensor, by_name[key.split("/", 2)[2]])
        state["optimizer/step"] = torch.tensor(_adam_step(optimizer, group), dtype=torch.float32)
    return state


def _saved_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """What `model/<name>` holds: every parameter but the last stage's tied-embedding copy."""
    return [(n, p) for n, p in model.named_parameters() if not getattr(p, "pipeline_duplicate", False)]


def _pieces_by_param(optimizer) -> dict[int, list[tuple[int, torch.nn.Parameter]]]:
    pieces: dict[int, list[tuple[int, torch.nn.Parameter]]] = {}
    for param, offset, main in optimizer.main_param_pieces():
        pieces.setdefault(id(param), []).append((offset, main))
    return pieces


def _piece_source(optimizer, main: torch.nn.Parameter, kind: str) -> torch.Tensor | None:
    """The fp32 tensor of `kind` ("master", "exp_avg", "exp_avg_sq") for one main parameter; None for a
    moment AdamW has not created yet (no step taken: zeros)."""
    if kind == "master":
        return main.detach()
    return optimizer.optimizer.state.get(main, {}).get(kind)


def _optimizer_kinds(param: torch.nn.Parameter) -> tuple[str, ...]:
    return MOMENTS + (("master",) if param.dtype != torch.float32 else ())


@torch.no_grad()
def _stage_optimizer(optimizer, params, parallel_state: ParallelState, copy: bool) -> dict[str, torch.Tensor]:
    """`optimizer/<kind>/<name>` -> this rank's tensor-parallel-local fp32 tensor on the CPU."""
    pieces = _pieces_by_param(optimizer)
    if not optimizer.sharded_over_data_parallel:
        out = {}
        for name, param in params:
            [(_, main)] = pieces[id(param)]  # whole parameters: one piece each
            for kind in _optimizer_kinds(param):
                source = _piece_source(optimizer, main, kind)
                out[f"optimizer/{kind}/{name}"] = (
                    torch.zeros(param.shape, dtype=torch.float32) if source is None else _to_cpu(source, copy)
                )
        return out
    jobs = [
        (f"optimizer/{kind}/{name}", param, kind)
        for name, param in params
        for kind in _optimizer_kinds(param)
    ]
    out = {key: torch.empty(param.shape, dtype=torch.float32) for key, param, _ in jobs}
    for chunk in _chunks(jobs):
        _assemble_chunk(chunk, out, pieces, optimizer, parallel_state)
    return out


def _chunks(jobs: list) -> Iterator[list]:
    """Consecutive jobs of at most `_ASSEMBLY_CHUNK_ELEMENTS` elements (a larger tensor alone)."""
    chunk, size = [], 0
    for job in jobs:
        if chunk and size + job[1].numel() > _ASSEMBLY_CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append(job)
        size += job[1].numel()
    if chunk:
        yield chunk


def _assemble_chunk(chunk, out, pieces, optimizer, parallel_state: ParallelState) -> None:
    """Distributed optimizer: every DP rank writes the fragments it owns into a zero buffer, the buffer's
    bit patterns are summed over DP as int32 (each element has exactly one nonzero contributor, so the
    sum is the fp32 value bit for bit, -0.0 included), and the result lands in `out` on the CPU."""
    total = sum(param.numel() for _, param, _ in chunk)
    buffer = torch.zeros(total, dtype=torch.float32, device=parallel_state.device)
    base = 0
    for _, param, kind in chunk:
        for offset, main in pieces.get(id(param), []):
            source = _piece_source(optimizer, main, kind)
            if source is not None:
                buffer[base + offset : base + offset + main.numel()].copy_(source.reshape(-1))
        base += param.numel()
    collectives.all_reduce(buffer.view(torch.int32), parallel_state.dp_group)
    base = 0
    for key, param, _ in chunk:
        out[key].view(-1).copy_(buffer[base : base + param.numel()])
        base += param.numel()


def _to_cpu(tensor: torch.Tensor, copy) -> torch.Tensor:
    """`copy`: False (the tensor itself on the CPU), True (a copy now), or an async save's
    `Snapshot.take` (the CPU buffer it fills after the save call returns)."""
    tensor = tensor.detach()
    if callable(copy):
        return copy(tensor)
    return tensor.to("cpu", copy=True) if copy else tensor.cpu()


def _adam_step(optimizer, group: CheckpointGroup) -> float:
    """AdamW's step count (the same for every parameter; a rank owning no fragment asks the others)."""
    local = next(
        (float(state["step"]) for state in optimizer.optimizer.state.values() if "step" in state), None
    )
    known = [value for value in group.all_gather(local) if value is not None]
    return max(known, default=0.0)


def capture_rng(parallel_state: ParallelState) -> tuple[dict, dict[str, torch.Tensor]]:
    """This rank's generator states now: (JSON part: python, numpy, tracker seed; DCP tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tracker = parallel_state.rng.state_dict()
    record = {
        "rank": parallel_state.rank,
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "tracker_seed": tracker["seed_value"],
    }
    rank = parallel_state.rank
    tensors = {rng_key(rank, "torch"): torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[rng_key(rank, "cuda")] = torch.cuda.get_rng_state()
    for device, state in tracker["states"].items():
        tensors[rng_key(rank, f"tracker_{device}")] = state.detach().cpu().clone()
    return record, tensors


def saving_layout(parallel_state: ParallelState, optimizer) -> dict:
    s = parallel_state
    return {
        "world": s.world_size,
        "tp": s.tensor_model_parallel_size,
        "pp": s.pipeline_model_parallel_size,
        "dp": s.data_parallel_size,
        "sequence_parallel": s.sequence_parallel,
        "distributed_optimizer": bool(optimizer is not None and optimizer.sharded_over_data_parallel),
    }


@dataclass
class SaveJob:
    """Everything the write phase needs, captured at the `save` call (tensors on the CPU)."""

    root: Path
    final: Path
    tmp: Path
    iteration: int
    state: dict
    rng_record: dict
    common: dict
