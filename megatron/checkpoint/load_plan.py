"""Loading, per rank: which DCP keys this rank reads at which logical shapes and where to (CPU parameters
and live Adam moments in place, else CPU buffers), the checks that run before anything is written into
the model, and copying the loaded buffers into the model, the optimizer (exact AdamW state) and the
random generators. See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from megatron.checkpoint.dcp_io import CheckpointGroup, TensorLayout, dcp_load, logical_shape
from megatron.checkpoint.files import MOMENTS, rng_json_name, rng_key
from megatron.checkpoint.fragments import fragment_chunks
from megatron.checkpoint.mismatch import mismatch_message
from megatron.checkpoint.replicated import ReplicatedRead
from megatron.log import get_logger
from megatron.parallel.state import ParallelState

logger = get_logger(__name__)


def load_object_state(obj, state) -> None:
    if obj is not None and state is not None:
        obj.load_state_dict(state)


class LoadPlan:
    """What one rank loads: keys, their expected logical shapes, the CPU buffers DCP fills."""

    def __init__(self, model, optimizer, parallel_state: ParallelState, restore_rng: bool) -> None:
        self.parallel_state = parallel_state
        self.params = list(model.named_parameters())
        self.optimizer = optimizer
        self.restore_rng = restore_rng
        self.entries: dict[str, tuple[torch.nn.Parameter | None, tuple[int, ...], torch.dtype]] = {}
        self.metadata = None  # the checkpoint's DCP metadata, once `check` read it
        self._mains: dict | None = None  # id(param) -> its fp32 parameter AdamW updates (`_destination`)
        for name, param in self.params:
            self.entries[f"model/{name}"] = (param, logical_shape(param), param.dtype)

    def check(self, directory: Path, metadata, group: CheckpointGroup) -> None:
        """Add the optimizer and RNG keys the checkpoint holds; ValueError on every rank (before anything
        is written) when a key is missing, a shape differs or the checkpoint has parameters the model
        lacks."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.metadata = metadata
        saved = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._add_optional_keys(saved)
        sizes = {key: tuple(meta.size) for key, meta in saved.items()}
        source = f"checkpoint {directory}"
        # the model's parameters over every rank (pipeline stages hold different ones), so that the
        # checkpoint's parameters no stage has are reported too
        model_expected: dict[str, tuple[int, ...]] = {}
        local = {key: shape for key, (_, shape, _) in self.entries.items() if key.startswith("model/")}
        for part in group.all_gather(local):
            model_expected.update(part)
        model_found = {key: size for key, size in sizes.items() if key.startswith("model/")}
        message = mismatch_message(source, dict(sorted(model_expected.items())), model_found)
        if message is None:  # optimizer state and generators: this rank's own keys
            rest = {key: shape for key, (_, shape, _) in self.entries.items() if not key.startswith("model/")}
            found = {key: sizes[key] for key in rest if key in sizes}
            messages = [m for m in group.all_gather(mismatch_message(source, rest, found)) if m]
            message = messages[0] if messages else None
        if message is not None:
            raise ValueError(message)

    def _add_optional_keys(self, saved: dict) -> None:
        if self.optimizer is not None and "optimizer/step" not in saved:
            logger.info(
                "NOTE: the checkpoint holds no optimizer state: fresh AdamW moments, masters from the weights"
            )
            self.optimizer = None
        if self.optimizer is not None:
            self.entries["optimizer/step"] = (None, (), torch.float32)
            for name, param in self.params:
                for kind in MOMENTS + ("master",):
                    key = f"optimizer/{kind}/{name}"
                    if kind in MOMENTS or (param.dtype != torch.float32 and key in saved):
                        self.entries[key] = (param, logical_shape(param), torch.float32)
        if self.restore_rng:
            for what in ("torch", "cuda", "tracker_cpu", "tracker_cuda"):
                key = rng_key(self.parallel_state.rank, what)
                if key in saved:
                    self.entries[key] = (None, tuple(saved[key].size), saved[key].properties.dtype)

    def load(self, directory: Path, layout: TensorLayout, pg) -> dict:
        """Read every planned key (this rank's local part) into its `_destination`: key -> tensor, or for
        the distributed optimizer's state, key -> {offset: flat fragment} of this rank's fragments only
        (read as their boxes of the logical tensor, whatever the saving layout). With several DP ranks the
        DP-replicated tensors are read once per DP group and exchanged over it (`replicated`)."""
        fragments = self._fragments()
        tp_rank = self.parallel_state.tensor_model_parallel_rank
        local, state = {}, {}
        shared = self._replicated(fragments)
        for key, (param, shape, dtype) in self.entries.items():
            if param is None:
                local[key] = state[key] = torch.empty(shape, dtype=dtype)
            elif fragments is not None and key.startswith("optimizer/"):
                local[key] = {
                    offset: torch.empty(n, dtype=dtype) for offset, n in fragments.get(id(param), [])
                }
                state[key] = fragment_chunks(param, tp_rank, list(local[key].items()))
            elif shared is not None:  # this rank's part; the rest from its DP peers
                local[key] = shared.tensors[key]
                if key in shared.requests:
                    state[key] = shared.requests[key]
            else:
                local[key] = self._destination(key, param, dtype)
                state[key] = layout.wrap(local[key], param)
        dcp_load(state, directory, pg)
        if shared is not None:
            shared.exchange()
        return local

    def _replicated(self, fragments) -> ReplicatedRead | None:
        """The read of the whole TP-local tensors (the same on every DP rank) split over the DP group;
        None with one DP rank."""
        if self.parallel_state.data_parallel_size == 1:
            return None
        entries = {
            key: (param, dtype)
            for key, (param, _, dtype) in self.entries.items()
            if param is not None and (fragments is None or not key.startswith("optimizer/"))
        }
        return ReplicatedRead(entries, self.metadata, self.parallel_state)

    def _fragments(self) -> dict[int, list[tuple[int, int]]] | None:
        """id(param) -> [(offset, numel)] of this rank's distributed-optimizer fragments; None without
        the distributed optimizer (whole tensor-parallel-local tensors are read)."""
        if self.optimizer is None or not self.optimizer.sharded_over_data_parallel:
            return None
        fragments: dict[int, list[tuple[int, int]]] = {}
        for param, offset, main in self.optimizer.main_param_pieces():
            fragments.setdefault(id(param), []).append((offset, main.numel()))
        return fragments

    def _destination(self, key: str, param: torch.nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
        """Where `key` (a whole tensor-parallel-local tensor) is read to: the model's parameter itself, or
        its Adam moment when the optimizer already has one, where that lives on the CPU laid out as read
        (the data files' bytes land there with no copy after the load, `dcp_streams`); else a new CPU
        buffer. So a load whose data turns out corrupt may leave part of it in these tensors: the load
        then falls back to an older checkpoint, which overwrites every one of them, or fails."""
        existing = param if key.startswith("model/") else None
        kind = key.split("/")[1] if key.startswith("optimizer/") else None
        if kind in MOMENTS and self.optimizer is not None:
            if self._mains is None:  # whole parameters' fp32 counterparts (the distributed optimizer's
                pieces = self.optimizer.main_param_pieces()  # fragments never reach this line)
                self._mains = {id(p): main for p, offset, main in pieces if offset == 0}
            main = self._mains.get(id(param))
            existing = self.optimizer.optimizer.state.get(main, {}).get(kind) if main is not None else None
        if (
            isinstance(existing, torch.Tensor)
            and existing.device.type == "cpu"
            and existing.dtype == dtype
            and existing.shape == param.shape
            and existing.is_contiguous()
        ):
            return existing.detach()
        return torch.empty(param.shape, dtype=dtype)

    @torch.no_grad()
    def apply_model(self, model, loaded: dict) -> None:
        """The loaded weights into the model (nothing to copy where they were read into the parameter)."""
        for name, param in self.params:
            source = loaded[f"model/{name}"]
            if source.data_ptr() != param.data_ptr() or source.dtype != param.dtype:
                param.copy_(source)

    @torch.no_grad()
    def apply_optimizer(self, optimizer, loaded: dict) -> None:
        """Exact AdamW state: the masters (or from the model's weights where none were saved), both
        moments and the step of every parameter this rank steps on."""
        if self.optimizer is None:  # the checkpoint had no optimizer state: fresh moments
            optimizer.optimizer.state.clear()  # (also none a corrupt checkpoint tried first left behind)
            optimizer.reload_model_params()
            return
        optimizer.reload_model_params()  # masters of fp32 parameters and any not saved
        names = {id(param): name for name, param in self.params}
        groups = {id(main): group for group in optimizer.param_groups for main in group["params"]}
        step = float(loaded["optimizer/step"])
        for param, offset, main in optimizer.main_param_pieces():
            name, end = names[id(param)], offset + main.numel()
            state = optimizer.optimizer.state[main]
            if not state:
                state.update(_fresh_adam_state(groups[id(main)], main))
            state["step"] = torch.full_like(state["step"], step)
            for kind in MOMENTS:
                state[kind].view(-1).copy_(_piece(loaded[f"optimizer/{kind}/{name}"], offset, end))
            master = loaded.get(f"optimizer/master/{name}")
            if master is not None:
                main.view(-1).copy_(_piece(master, offset, end))


def _piece(loaded, offset: int, end: int) -> torch.Tensor:
    """Elements [offset, end) of a loaded flattened tensor-parallel-local tensor, or the fragment read
    for exactly that range."""
    if isinstance(loaded, dict):
        return loaded[offset]
    return loaded.view(-1)[offset:end]


def _fresh_adam_state(group: dict, main: torch.nn.Parameter) -> dict:
    """The state AdamW creates at its first step for `main` of param group `group` (same dtypes and
    devices, so the run continues as if it had never stopped)."""
    on_device = group.get("fused") or group.get("capturable")
    dtype = (
        torch.float32 if group.get("fused") or torch.get_default_dtype() != torch.float64 else torch.float64
    )
    step = torch.zeros((), dtype=dtype, device=main.device if on_device else "cpu")
    zeros = {kind: torch.zeros_like(main, memory_format=torch.preserve_format) for kind in MOMENTS}
    return {"step": step, **zeros}


def restore_generators(parallel_state: ParallelState, directory: Path, loaded: dict) -> None:
    """Python, numpy, torch (CPU and CUDA) and the tensor-parallel tracker of this rank."""
    rank = parallel_state.rank
    path = directory / rng_json_name(rank)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable random state ({exc})") from None
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(loaded[rng_key(rank, "torch")])
    cuda = loaded.get(rng_key(rank, "cuda"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    states = {"cpu": loaded[rng_key(rank, "tracker_cpu")]} if rng_key(rank, "tracker_cpu") in loaded else {}
    tracker_cuda = loaded.get(rng_key(rank, "tracker_cuda"))
    if tracker_cuda is not None and torch.cuda.is_available():
        states["cuda"] = tracker_cuda
    if states:
        parallel_state.rng.load_state_dict({"seed_value": record["tracker_seed"], "states": states})
