"""The single-file checkpoint format: one process, one torch file per iteration (superseded by the sharded
format, which still loads these at world size 1).

Layout under the `--save`/`--load` directory (see `directory` and docs/checkpoints.md):
```
latest_checkpointed_iteration.txt     # "1000" (or "release")
iter_0001000/mp_rank_00/model_optim_rng.pt
```
The file holds only tensors and plain containers (model/optimizer/scheduler state dicts, RNG states,
the config as a dict), so it is read back with `torch.load(weights_only=True)`: loading a checkpoint never
unpickles arbitrary objects. Writes are atomic: the iteration directory is written under a temporary name
and renamed, then the tracker file is replaced atomically, so a crash never leaves a tracker pointing at a
partial checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from megatron.checkpoint.directory import (
    TRACKER_FILENAME,
    LoadedCheckpoint,
    checkpoint_dir,
    fsync_dir,
    read_tracker,
    replace_directory,
    write_tracker,
)
from megatron.checkpoint.files import verify_torch_file
from megatron.checkpoint.mismatch import check_fits

MODEL_FILENAME = os.path.join("mp_rank_00", "model_optim_rng.pt")
CHECKPOINT_VERSION = 3.0


def plain(value):
    """A config value as plain Python (safe for `weights_only` loading and for JSON)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def get_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `get_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path,
    iteration: int,
    model,
    optimizer,
    scheduler,
    scaler,
    consumed_samples: int,
    config,
    *,
    extra: dict | None = None,
) -> Path:
    """Write `path/iter_XXXXXXX/` atomically, then point the tracker file at it; returns the directory.

    `optimizer`, `scheduler` and `scaler` may be None (they are then not saved). `extra` is a dict of
    plain values kept alongside (for example the count of skipped iterations).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, iteration)
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": int(iteration),
        "consumed_samples": int(consumed_samples),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng_state": get_rng_state(),
        "args": plain(config),
        "extra": plain(extra or {}),
    }
    file = tmp / MODEL_FILENAME
    file.parent.mkdir(parents=True)
    with open(file, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    replace_directory(tmp, final)
    fsync_dir(root)
    write_tracker(root, iteration)
    return final


def read_checkpoint(path) -> dict | None:
    """The raw contents of the latest checkpoint under `path` (None when there is none), plus "path".

    Everything is tensors and plain containers: `model` (state dict), `optimizer`, `opt_param_scheduler`,
    `grad_scaler`, `rng_state`, `args` (the run's config as `Config.to_dict()`), `iteration`,
    `consumed_samples`, `extra`. Tools use `args["model"]` to rebuild the model for inference.
    """
    iteration = read_tracker(path)
    if iteration is None:
        return None
    file = checkpoint_dir(path, iteration) / MODEL_FILENAME
    if not file.is_file():
        raise ValueError(f"{Path(path) / TRACKER_FILENAME} names iteration {iteration} but {file} is missing")
    verify_torch_file(file)  # every record's CRC32 (torch.load checks none)
    state = torch.load(file, map_location="cpu", weights_only=True)
    state["path"] = str(file)
    return state


def load_checkpoint(
    path,
    model,
    optimizer=None,
    scheduler=None,
    scaler=None,
    *,
    finetune: bool = False,
    load_optim: bool = True,
    load_rng: bool = True,
) -> LoadedCheckpoint | None:
    """Load the latest checkpoint under `path` into the given objects; None when `path` has none.

    `finetune` loads the model weights only and restarts at iteration 0 with 0 consumed samples.
    `load_optim=False` (`--no-load-optim`) keeps the fresh optimizer, scheduler and loss scale;
    `load_rng=False` (`--no-load-rng`) keeps the current random generators.
    """
    state = read_checkpoint(path)
    if state is None:
        return None
    file = Path(state["path"])
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    check_fits(f"checkpoint {file}", expected, found)  # before anything is written into the model
    model.load_state_dict(state["model"])
    if finetune:
        if optimizer is not None:
            optimizer.reload_model_params()
        return LoadedCheckpoint(0, 0, file.parent.parent, state.get("extra") or {})
    _load_training_state(state, optimizer, scheduler, scaler, load_optim=load_optim)
    if load_rng and state.get("rng_state") is not None:
        set_rng_state(state["rng_state"])
    return LoadedCheckpoint(
        iteration=int(state["iteration"]),
        consumed_samples=int(state.get("consumed_samples", 0)),
        directory=file.parent.parent,
        extra=state.get("extra") or {},
    )


def _load_training_state(state: dict, optimizer, scheduler, scaler, *, load_optim: bool) -> None:
    if optimizer is not None:
        if load_optim and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            optimizer.reload_model_params()
    if not load_optim:
        return
    if scheduler is not None and state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if scaler is not None and state.get("grad_scaler") is not None:
        scaler.load_state_dict(state["grad_scaler"])
