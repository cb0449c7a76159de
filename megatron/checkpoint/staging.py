"""Saving, first phase: what a sharded checkpoint holds, gathered on the CPU at the `save` call (the model,
the optimizer state: per-parameter tensors, or under the distributed optimizer only this rank's own
fragments, the generator states, the saving layout), so the write phase can run while training changes
the model. See docs/checkpoints.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.checkpoint.dcp_io import CheckpointGroup, TensorLayout
from megatron.checkpoint.files import MOMENTS, rng_key
from megatron.checkpoint.fragments import CHECKPOINT_BYTES, LogicalChunks, fragment_boxes, logical_chunks
from megatron.checkpoint.single_file import plain
from megatron.parallel.state import ParallelState


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
    DTensors when there are several ranks; under the distributed optimizer, the optimizer state is this
    rank's own fragments as `LogicalChunks`. Adds what it staged to `CHECKPOINT_BYTES.staged`."""
    params = _saved_params(model)
    state = {f"model/{name}": layout.wrap(_to_cpu(param, copy), param) for name, param in params}
    if optimizer is not None:
        if optimizer.sharded_over_data_parallel:
            state.update(_stage_fragments(optimizer, params, parallel_state, copy))
        else:
            by_name = dict(params)
            for key, tensor in _stage_optimizer(optimizer, params, copy).items():
                state[key] = layout.wrap(tensor, by_name[key.split("/", 2)[2]])
        state["optimizer/step"] = torch.tensor(_adam_step(optimizer, group), dtype=torch.float32)
    for key, value in state.items():
        CHECKPOINT_BYTES.add("staged", key, _staged_bytes(value))
    return state


def _staged_bytes(value) -> int:
    if isinstance(value, LogicalChunks):
        return value.nbytes
    local = value.to_local() if hasattr(value, "to_local") else value  # DTensor: this rank's part
    return local.numel() * local.element_size()


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
def _stage_optimizer(optimizer, params, copy: bool) -> dict[str, torch.Tensor]:
    """`optimizer/<kind>/<name>` -> this rank's tensor-parallel-local fp32 tensor on the CPU (whole
    parameters: no distributed optimizer)."""
    pieces = _pieces_by_param(optimizer)
    out = {}
    for name, param in params:
        [(_, main)] = pieces[id(param)]  # whole parameters: one piece each
        for kind in _optimizer_kinds(param):
            source = _piece_source(optimizer, main, kind)
            out[f"optimizer/{kind}/{name}"] = (
                torch.zeros(param.shape, dtype=torch.float32) if source is None else _to_cpu(source, copy)
            )
    return out


@torch.no_grad()
def _stage_fragments(
    optimizer, params, parallel_state: ParallelState, copy: bool
) -> dict[str, LogicalChunks]:
    """Distributed optimizer: `optimizer/<kind>/<name>` -> this rank's own fragments of that logical
    tensor, copied to the CPU box by box (a copied box is a tensor of its own, which the writer need not
    copy again; nothing else is staged, nothing is communicated). The DP ranks' fragments tile each
    tensor-parallel block. A parameter replicated over tensor-parallel ranks (identical replicas,
    identical fragments) is saved by tensor-parallel rank 0's ranks only."""
    pieces = _pieces_by_param(optimizer)
    tp_rank = parallel_state.tensor_model_parallel_rank
    out = {}
    for name, param in params:
        if tp_rank != 0 and not getattr(param, "tensor_model_parallel", False):
            continue
        for kind in _optimizer_kinds(param):
            chunks = out[f"optimizer/{kind}/{name}"] = logical_chunks(param)
            for offset, main in pieces.get(id(param), []):
                source = _piece_source(optimizer, main, kind)
                flat = None if source is None else source.detach().view(-1)
                for start, offsets, sizes in fragment_boxes(param, tp_rank, offset, main.numel()):
                    if flat is None:  # a moment AdamW has not created yet: zeros
                        box = torch.zeros(sizes, dtype=torch.float32)
                    else:
                        box = _to_cpu(flat[start : start + math.prod(sizes)].view(sizes), copy)
                    chunks.boxes.append((offsets, box))
    return out


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
