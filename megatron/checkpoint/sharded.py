"""Sharded, atomic, reshardable checkpoints (format "megatron-starcoder-dcp/1") with exact resume.

Layout under the `--save`/`--load` directory:
```
latest_checkpointed_iteration.txt     "20": written atomically, only after iter_0000020/ is final
iter_0000020/                         written as .iter_0000020.tmp-<nonce>/, fsynced, then renamed
    .metadata, __<rank>_0.distcp      torch.distributed.checkpoint (DCP): every tensor
    common.json                       rank 0: format, iteration, consumed samples, extra, scheduler and
                                      grad-scaler states, the config, the saving layout
    rng/rank_00003.json               each rank: python and numpy generator states
    manifest.json                     written last: bytes and BLAKE2b hash of every other file
```
DCP keys are logical (the same at every layout), so any layout loads any checkpoint:
`model/<name>` (model dtype), `optimizer/exp_avg/<name>`, `optimizer/exp_avg_sq/<name>`,
`optimizer/master/<name>` (fp32; masters only for parameters not in fp32), `optimizer/step`, and per
global rank `rng/rank_00003/{torch,cuda,tracker_cpu,tracker_cuda}` (uint8 generator states). In one
process the tensors are plain full tensors; with several they are DTensors on this pipeline stage's
(dp, tp) device mesh (Replicate over dp, Shard(partition_dim) over tp for tensor-parallel parameters),
so DCP records each rank's chunk of the full logical shape. The last pipeline stage's copy of the tied
word embedding (`pipeline_duplicate`) is not saved; it loads from the first stage's key. Under the
distributed optimizer the moment and master fragments are first assembled into per-parameter tensors
(each DP rank fills the ranges it owns, summed over DP as int32 bit patterns, which is exact), and
each rank copies its own fragments back out at load.

Saving: DCP writes into the temporary directory over a gloo process group that belongs to the
checkpointer alone (created once, collectively, by `Checkpointer`), so a background save never shares
a process group with training. Each rank fsyncs and hashes the files it wrote; rank 0 merges the
hashes into manifest.json, fsyncs, renames the directory, fsyncs the parent and only then replaces the
tracker. With `async_save`, `save` copies every tensor to the CPU (so training may go on changing the
model) and the writing runs in a thread; `wait` (also called by the next save or load) finishes it and
raises `CheckpointError` if it failed. A crash at any point leaves the previous checkpoint intact.

Loading verifies the manifest (the files are split across ranks for hashing), falls back to the newest
complete checkpoint when the tracked one is incomplete or corrupt (saying so), checks every shape
before anything is written into the model, loads into CPU buffers and only then copies into the model,
the optimizer (exact AdamW state: moments, step, fp32 masters) and the random generators of every rank
(when the layout matches the saving layout). Nothing is unpickled beyond DCP's own metadata classes.

Fault injection for the kill tests: MEGATRON_CHECKPOINT_FAULT=before_rename|before_tracker makes rank 0
SIGKILL itself after the manifest is written and before the rename, or after the rename and before the
tracker update.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron.checkpoint import basic
from megatron.checkpoint.basic import TRACKER_FILENAME, LoadedCheckpoint, checkpoint_dir, read_tracker
from megatron.parallel import collectives
from megatron.parallel.state import ParallelState
from megatron.training.metrics import log

FORMAT = "megatron-starcoder-dcp/1"
COMMON_FILENAME = "common.json"
MANIFEST_FILENAME = "manifest.json"
METADATA_FILENAME = ".metadata"
RNG_DIRNAME = "rng"
FAULT_ENV = "MEGATRON_CHECKPOINT_FAULT"
FAULT_POINTS = ("before_rename", "before_tracker")
MOMENTS = ("exp_avg", "exp_avg_sq")
_HASH_CHUNK_BYTES = 8 << 20
_ASSEMBLY_CHUNK_ELEMENTS = 1 << 26  # distributed-optimizer assembly: at most 256 MiB of fp32 at a time
_ITERATION_DIR = re.compile(r"^iter_(\d+)$")
_LEFTOVER = re.compile(r"^\.(iter_\d+|release)\.(tmp|old|deleting)-[0-9a-f]+$")

# DCP warns on every call in one process that it runs without torch.distributed: that is the intent
# here. (A process-wide filter: warnings.catch_warnings is not thread-safe, and saves run in a thread.)
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)

# The public names are listed once, in megatron/checkpoint/__init__.py (which loads this module lazily).


class CheckpointError(RuntimeError):
    """A save failed (in the background with `async_save`); the message names the checkpoint and why."""


# --------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _write_tracker(root: Path, iteration: int | str) -> None:
    """Replace the tracker atomically (written beside it, fsynced, renamed, directory fsynced)."""
    tracker = root / TRACKER_FILENAME
    tmp = root / f".{TRACKER_FILENAME}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tracker)
    _fsync_dir(root)


def _file_entry(path: Path) -> dict:
    """{"bytes": size, "blake2b": hex digest} of one file."""
    digest = hashlib.blake2b()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "blake2b": digest.hexdigest()}


def _plain(value):
    """A config/extra value as JSON-able Python (dataclasses and `to_dict()` objects as dicts)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    return basic._plain(value)


def _relative_files(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())


def _rng_json_name(rank: int) -> str:
    return f"{RNG_DIRNAME}/rank_{rank:05d}.json"


def _rng_key(rank: int, what: str) -> str:
    return f"rng/rank_{rank:05d}/{what}"


def _fault(point: str) -> None:
    """MEGATRON_CHECKPOINT_FAULT: die here, as a crash would (kill tests)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- DCP plumbing


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` and nothing else: DCP's own classes, torch sizes/dtypes, paths."""

    def find_class(self, module: str, name: str):
        allowed = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout")}
        allowed |= {("copyreg", "_reconstructor"), ("builtins", "object")}
        if (module, name) in allowed or (module in ("pathlib", "pathlib._local") and name.endswith("Path")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), torch.dtype | torch.layout | torch.memory_format
        ):
            return getattr(torch, name)
        dcp_modules = (
            "torch.distributed.checkpoint.",
            "torch.distributed._shard.",
        )  # the latter: older torch
        if module.startswith(dcp_modules) and "." not in name:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__.startswith(dcp_modules):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        """DCP's file reader with `.metadata` read by `_SafeUnpickler` instead of plain pickle."""

        def __init__(self, path) -> None:
            super().__init__(path)
            self.directory = Path(path)

        def read_metadata(self, *args, **kwargs):
            return read_metadata(self.directory, load_id=getattr(self, "load_id", None))

    return SafeFileSystemReader


def read_metadata(directory, *, load_id=None):
    """DCP's `Metadata` of a checkpoint directory, unpickled with an allow-list (ValueError if unreadable)."""
    path = Path(directory) / METADATA_FILENAME
    try:
        with open(path, "rb") as handle:
            metadata = _SafeUnpickler(handle).load()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a complete DCP checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail in many ways; all mean the same
        raise ValueError(f"{path}: unreadable DCP metadata ({type(exc).__name__}: {exc})") from None
    storage_meta = getattr(metadata, "storage_meta", None)
    if storage_meta is not None and load_id is not None:
        storage_meta.load_id = load_id
    return metadata


def _dcp_save(state: dict, directory: Path, pg) -> None:
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(directory, single_file_per_rank=True, sync_files=True, thread_count=1)
    if pg is not None:
        dcp.save(state, storage_writer=writer, process_group=pg)
    elif "no_dist" in inspect.signature(dcp.save).parameters:
        dcp.save(state, storage_writer=writer, no_dist=True)
    else:  # torch < 2.5: the private entry point has the flag
        from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

        _save_state_dict(state, storage_writer=writer, no_dist=True)


def _dcp_load(state: dict, directory: Path, pg) -> None:
    """Fill the tensors of `state` (plain or DTensor) from the checkpoint, in place."""
    import torch.distributed.checkpoint as dcp

    reader = _reader_class()(directory)
    try:
        if pg is not None:
            dcp.load(state, storage_reader=reader, process_group=pg)
        elif "no_dist" in inspect.signature(dcp.load).parameters:
            dcp.load(state, storage_reader=reader, no_dist=True)
        else:  # torch < 2.5
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            _load_state_dict(state, storage_reader=reader, no_dist=True)
    except _dcp_failure_type() as exc:
        raise ValueError(f"reading checkpoint {directory} failed: {_describe(exc)}") from None


def _dcp_failure_type():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _describe(exc: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (a BaseException carrying every rank's
    error), else the exception itself."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(
            f"rank {rank}: {type(error[0]).__name__}: {error[0]}" for rank, error in sorted(failures.items())
        )
    return f"{type(exc).__name__}: {exc}"


def _dtensor_api():
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Replicate, Shard
    return DTensor, Replicate, Shard


class _Group:
    """The checkpointer's own gloo process group over every rank (nothing in one process)."""

    def __init__(self, parallel_state: ParallelState) -> None:
        self.rank, self.size = parallel_state.rank, parallel_state.world_size
        self.pg = None
        if self.size > 1:
            import torch.distributed as dist

            self.pg = dist.new_group(backend="gloo")

    def all_gather(self, obj) -> list:
        if self.pg is None:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.pg)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.pg is None:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.pg)
        return box[0]


class _TensorLayout:
    """How this rank's tensors map onto logical ones: plain tensors in one process, else DTensors on the
    pipeline stage's (dp, tp) mesh. The mesh is built on the CPU: DCP only ever sees CPU tensors (staged
    copies and load buffers; `DTensor.from_local` would move them to the mesh's device), and it
    communicates over the checkpoint group, never over the mesh's own groups."""

    def __init__(self, parallel_state: ParallelState) -> None:
        self.mesh = None
        if parallel_state.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh

            s = parallel_state
            sizes = (s.pipeline_model_parallel_size, s.data_parallel_size, s.tensor_model_parallel_size)
            mesh = init_device_mesh("cpu", sizes, mesh_dim_names=("pp", "dp", "tp"))
            self.mesh = mesh["dp", "tp"]
            coordinate = tuple(self.mesh.get_coordinate())
            assert coordinate == (s.data_parallel_rank, s.tensor_model_parallel_rank), coordinate

    def wrap(self, local: torch.Tensor, param: torch.nn.Parameter):
        """`local` (this rank's CPU tensor laid out like `param`) as what DCP saves or loads."""
        if self.mesh is None:
            return local
        DTensor, Replicate, Shard = _dtensor_api()
        split = Shard(param.partition_dim) if getattr(param, "tensor_model_parallel", False) else Replicate()
        return DTensor.from_local(local, self.mesh, [Replicate(), split], run_check=False)


def _logical_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "full_shape", param.shape))


# --------------------------------------------------------------------------- saving: staging


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


def _to_cpu(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.to("cpu", copy=True) if copy else tensor.cpu()


def _adam_step(optimizer, group: _Group) -> float:
    """AdamW's step count (the same for every parameter; a rank owning no fragment asks the others)."""
    local = next(
        (float(state["step"]) for state in optimizer.optimizer.state.values() if "step" in state), None
    )
    known = [value for value in group.all_gather(local) if value is not None]
    return max(known, default=0.0)


def _capture_rng(parallel_state: ParallelState) -> tuple[dict, dict[str, torch.Tensor]]:
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
    tensors = {_rng_key(rank, "torch"): torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[_rng_key(rank, "cuda")] = torch.cuda.get_rng_state()
    for device, state in tracker["states"].items():
        tensors[_rng_key(rank, f"tracker_{device}")] = state.detach().cpu().clone()
    return record, tensors


def _layout(parallel_state: ParallelState, optimizer) -> dict:
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
class _SaveJob:
    """Everything the write phase needs, captured at the `save` call (tensors on the CPU)."""

    root: Path
    final: Path
    tmp: Path
    iteration: int
    state: dict
    rng_record: dict
    common: dict


# --------------------------------------------------------------------------- verification


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(the manifest's file table, None) or (None, the problem)."""
    path = directory / MANIFEST_FILENAME
    if not directory.is_dir():
        return None, f"{directory}: does not exist"
    if not path.is_file():
        return None, f"{path}: missing (an incomplete save: the manifest is written last)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable manifest ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        return None, f"{path}: unreadable manifest (no table of files)"
    if manifest.get("format") != FORMAT:
        return None, f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}"
    for required in (METADATA_FILENAME, COMMON_FILENAME):
        if required not in files:
            return None, f"{path}: does not list {required}"
    return files, None


def _file_problem(directory: Path, relative: str, expected: dict) -> str | None:
    path = directory / relative
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST_FILENAME})"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{path}: {size} bytes, {MANIFEST_FILENAME} records {expected.get('bytes')} (truncated or overwritten)"
    if _file_entry(path)["blake2b"] != expected.get("blake2b"):
        return f"{path}: BLAKE2b hash differs from {MANIFEST_FILENAME} (corrupt)"
    return None


def _verification_problems(directory: Path, rank: int, world_size: int, all_gather) -> list[str]:
    """Every problem with `directory`, the same sorted list on every rank; the files are hashed by
    rank `index % world_size`. `all_gather(obj)` returns every rank's object (collective)."""
    files, problem = _read_manifest(directory)
    local = [problem] if problem and rank == 0 else []
    if files is not None:
        for index, relative in enumerate(sorted(files)):
            if index % world_size == rank:
                found = _file_problem(directory, relative, files[relative])
                local += [found] if found else []
    return sorted(problem for problems in all_gather(local) for problem in problems)


def verify_checkpoint(directory, parallel_state: ParallelState | None = None) -> None:
    """Check a checkpoint directory against its manifest: ValueError naming the file and the problem
    (missing, size, hash, missing .metadata or manifest). With a multi-rank `parallel_state` every rank
    must call it; the hashing is split across ranks and every rank gets the same verdict."""
    directory = Path(directory)
    if parallel_state is None or parallel_state.world_size == 1:
        problems = _verification_problems(directory, 0, 1, lambda obj: [obj])
    else:
        group = parallel_state.world_group
        problems = _verification_problems(
            directory, group.rank, group.size, lambda obj: collectives.all_gather_object(obj, group)
        )
    if problems:
        raise ValueError(f"checkpoint {directory} failed verification: " + "; ".join(problems))


def read_common(directory) -> dict:
    """common.json of a checkpoint: format, iteration, consumed_samples, extra, scheduler, grad_scaler,
    config, layout. ValueError when it is missing, unreadable or of another format."""
    path = Path(directory) / COMMON_FILENAME
    try:
        common = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        found = common.get("format") if isinstance(common, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return common


def find_checkpoints(root) -> list[tuple[int, Path]]:
    """(iteration, directory) of every `iter_XXXXXXX` directory under `root`, complete or not, newest
    first (temporary directories of unfinished saves are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITERATION_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: item[0], reverse=True)


# --------------------------------------------------------------------------- one-process readers


def tensor_metadata(directory, prefix: str = "model/") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name (without `prefix`) -> (full logical shape, dtype) of every tensor under `prefix`, from the
    DCP metadata alone (no tensor data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_metadata(directory)
    return {
        key[len(prefix) :]: (tuple(entry.size), entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


def iter_tensors(directory, prefix: str = "model/") -> Iterator[tuple[str, torch.Tensor]]:
    """(name without `prefix`, full tensor) for every tensor under `prefix`, one at a time (only that
    tensor's bytes are read), in one process without torch.distributed, whatever the saving layout.
    Does not verify the manifest: call `verify_checkpoint` first where that matters."""
    directory = Path(directory)
    for name, (shape, dtype) in tensor_metadata(directory, prefix).items():
        tensor = torch.empty(shape, dtype=dtype)
        _dcp_load({prefix + name: tensor}, directory, None)
        yield name, tensor


def load_full_state(directory, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every tensor under `prefix` at its full logical shape (name without `prefix` -> tensor), in one
    process without torch.distributed, whatever the saving layout (tools, generation, conversion)."""
    directory = Path(directory)
    state = {
        prefix + name: torch.empty(shape, dtype=dtype)
        for name, (shape, dtype) in tensor_metadata(directory, prefix).items()
    }
    if state:
        _dcp_load(state, directory, None)
    return {key[len(prefix) :]: tensor for key, tensor in state.items()}


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and loads sharded checkpoints for one run (see the module docstring).

    Every rank constructs it (collective: it creates the checkpoint process group and device mesh) and
    calls `save`, `wait` and `load` together. `async_save`: `save` returns once the tensors are copied to
    the CPU and the files are written in a background thread. `keep_last_k`: after each save is final,
    delete older complete `iter_*` directories beyond the newest k (never the one just written).
    """

    def __init__(
        self, parallel_state: ParallelState, *, async_save: bool = False, keep_last_k: int | None = None
    ):
        if keep_last_k is not None and keep_last_k < 1:
            raise ValueError(
                f"--keep-last-k must be at least 1 (or unset to keep every checkpoint), got {keep_last_k}"
            )
        fault = os.environ.get(FAULT_ENV)
        if fault and fault not in FAULT_POINTS:
            raise ValueError(f"{FAULT_ENV}={fault!r} is not a fault point; valid: {', '.join(FAULT_POINTS)}")
        self.parallel_state = parallel_state
        self.async_save = async_save
        self.keep_last_k = keep_last_k
        self.group = _Group(parallel_state)
        self.layout = _TensorLayout(parallel_state)
        self._pending: tuple[_SaveJob, threading.Thread, list] | None = None

    # ------------------------------------------------------------------ save
    def save(
        self,
        save_dir,
        iteration: int,
        model,
        optimizer,
        scheduler,
        scaler,
        *,
        consumed_samples: int,
        config,
        extra=None,
    ) -> Path:
        """Write `save_dir/iter_XXXXXXX/` atomically and point the tracker at it; returns that directory.
        With `async_save` it returns right after staging (the directory appears later; `wait`).
        Raises CheckpointError when writing fails (with `async_save`: from `wait` or the next save)."""
        self.wait()
        root = Path(save_dir)
        state = self._stage(model, optimizer, copy=self.async_save)  # async: the model changes meanwhile
        rng_record, rng_tensors = _capture_rng(self.parallel_state)
        state.update(rng_tensors)
        common = {
            "format": FORMAT,
            "iteration": int(iteration),
            "consumed_samples": int(consumed_samples),
            "extra": _plain(extra or {}),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "config": _plain(config),
            "layout": _layout(self.parallel_state, optimizer),
        }
        final = checkpoint_dir(root, iteration)
        job = _SaveJob(root, final, self._make_tmp(root, final), int(iteration), state, rng_record, common)
        if not self.async_save:
            return self._write(job)
        outcome: list = []
        thread = threading.Thread(target=self._write_in_background, args=(job, outcome), daemon=True)
        thread.start()
        self._pending = (job, thread, outcome)
        return final

    def _stage(self, model, optimizer, *, copy: bool) -> dict:
        """The DCP state dict of the model and optimizer: CPU tensors (copies when `copy`), wrapped as
        DTensors when there are several ranks."""
        params = _saved_params(model)
        state = {f"model/{name}": self.layout.wrap(_to_cpu(param, copy), param) for name, param in params}
        if optimizer is not None:
            by_name = dict(params)
            for key, tensor in _stage_optimizer(optimizer, params, self.parallel_state, copy).items():
                state[key] = self.layout.wrap(tensor, by_name[key.split("/", 2)[2]])
            state["optimizer/step"] = torch.tensor(_adam_step(optimizer, self.group), dtype=torch.float32)
        return state

    def wait(self) -> Path | None:
        """Finish a pending background save (rename, tracker, keep-last-k); its final directory, or None
        when none was pending. Raises CheckpointError naming the checkpoint when the write failed."""
        if self._pending is None:
            return None
        job, thread, outcome = self._pending
        self._pending = None
        thread.join()
        result = outcome[0]
        if isinstance(result, CheckpointError):
            raise CheckpointError(f"background save: {result}") from result
        if isinstance(result, BaseException):
            raise CheckpointError(
                f"background save of iteration {job.iteration} to {job.final} failed: {type(result).__name__}: {result}"
            ) from result
        return result

    def _write_in_background(self, job: _SaveJob, outcome: list) -> None:
        try:
            outcome.append(self._write(job))
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), never swallowed
            outcome.append(exc)

    def _make_tmp(self, root: Path, final: Path) -> Path:
        """Rank 0 creates the temporary directory (clearing leftovers of interrupted saves) and tells
        every rank its name."""
        outcome = None
        if self.group.rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                _remove_leftovers(root)
                tmp = root / f".{final.name}.tmp-{secrets.token_hex(4)}"
                (tmp / RNG_DIRNAME).mkdir(parents=True)
                outcome = ("ok", str(tmp))
            except OSError as exc:
                outcome = ("error", f"cannot create a checkpoint directory in --save {root}: {exc}")
        outcome = self.group.broadcast(outcome)
        if outcome[0] != "ok":
            raise CheckpointError(outcome[1])
        return Path(outcome[1])

    def _write(self, job: _SaveJob) -> Path:
        """Every rank: DCP files and its RNG record, fsynced and hashed; rank 0 commits; every rank
        learns the outcome (so no rank waits forever on one that failed)."""
        report = self._write_rank_files(job)
        reports = self.group.all_gather(report)
        verdict = self._commit(job, reports) if self.group.rank == 0 else None
        verdict = self.group.broadcast(verdict)
        if verdict is not None:
            raise CheckpointError(f"saving iteration {job.iteration} to {job.final} failed: {verdict}")
        return job.final

    def _write_rank_files(self, job: _SaveJob) -> dict:
        rank = self.group.rank
        try:
            _dcp_save(job.state, job.tmp, self.group.pg)
            _write_json(job.tmp / _rng_json_name(self.parallel_state.rank), job.rng_record)
            mine = [_rng_json_name(self.parallel_state.rank)]
            mine += [p.name for p in job.tmp.glob(f"__{rank}_*.distcp")]
            if rank == 0:
                _write_json(job.tmp / COMMON_FILENAME, job.common)
                _fsync_file(job.tmp / METADATA_FILENAME)
                mine += [COMMON_FILENAME, METADATA_FILENAME]
            return {"files": {relative: _file_entry(job.tmp / relative) for relative in mine}}
        except (Exception, _dcp_failure_type()) as exc:  # noqa: BLE001 - reported to rank 0, raised everywhere
            described = _describe(exc)
            return {"error": described if described.startswith("rank ") else f"rank {rank}: {described}"}

    def _commit(self, job: _SaveJob, reports: list[dict]) -> str | None:
        """Rank 0: manifest, fsync, rename, tracker, keep-last-k. Returns the failure, or None."""
        # DCP raises the same failure on every rank: report each once
        errors = list(dict.fromkeys(report["error"] for report in reports if "error" in report))
        try:
            if errors:
                return "; ".join(errors)
            files = {}
            for report in reports:
                files.update(report["files"])
            for relative in _relative_files(job.tmp):  # anything DCP wrote that no rank claimed
                if relative not in files:
                    files[relative] = _file_entry(job.tmp / relative)
            _write_json(
                job.tmp / MANIFEST_FILENAME, {"format": FORMAT, "iteration": job.iteration, "files": files}
            )
            _fsync_dir(job.tmp / RNG_DIRNAME)
            _fsync_dir(job.tmp)
            _fault("before_rename")
            _replace_directory(job.tmp, job.final)
            _fsync_dir(job.root)
            _fault("before_tracker")
            _write_tracker(job.root, job.iteration)
        except Exception as exc:  # noqa: BLE001 - becomes the CheckpointError of every rank
            return f"{type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(job.tmp, ignore_errors=True)  # gone after a successful rename
        if self.keep_last_k is not None:
            _delete_old(job.root, job.iteration, self.keep_last_k)
        return None

    # ------------------------------------------------------------------ load
    def load(
        self,
        load_dir,
        model,
        optimizer,
        scheduler,
        scaler,
        *,
        finetune: bool = False,
        load_optim: bool = True,
        load_rng: bool = True,
    ) -> LoadedCheckpoint | None:
        """Load the checkpoint the tracker under `load_dir` names into the given objects (None: no
        tracker). An incomplete or corrupt one is skipped for the newest complete one, with a log line;
        ValueError when none is usable or the model's shapes differ (nothing is written into the model
        before every check passed). `finetune`: model weights only, iteration 0. `load_optim=False`:
        fresh optimizer, scheduler and loss scale. `load_rng=False`: keep the current generators."""
        self.wait()
        root = Path(load_dir)
        tracked = read_tracker(root)
        if tracked is None:
            return None
        directory = checkpoint_dir(root, tracked)
        if (directory / basic.MODEL_FILENAME).is_file() and not (directory / MANIFEST_FILENAME).exists():
            return self._load_basic(
                root, directory, model, optimizer, scheduler, scaler, finetune, load_optim, load_rng
            )
        directory = self._usable_checkpoint(root, tracked)
        common = read_common(directory)
        with_optimizer = optimizer is not None and load_optim and not finetune
        restore_rng = load_rng and not finetune and self._rng_layout_matches(common)
        plan = _LoadPlan(model, optimizer if with_optimizer else None, self.parallel_state, restore_rng)
        plan.check(directory, read_metadata(directory), self.group)
        loaded = plan.load(directory, self.layout, self.group.pg)
        plan.apply_model(model, loaded)
        if optimizer is not None and not with_optimizer:
            optimizer.reload_model_params()
        if finetune:
            return LoadedCheckpoint(0, 0, directory, common.get("extra") or {})
        if with_optimizer:
            plan.apply_optimizer(optimizer, loaded)
            _load_object_state(scheduler, common.get("scheduler"))
            _load_object_state(scaler, common.get("grad_scaler"))
        if restore_rng:
            _restore_rng(self.parallel_state, directory, loaded)
        return LoadedCheckpoint(
            int(common["iteration"]), int(common["consumed_samples"]), directory, common.get("extra") or {}
        )

    def _problems(self, directory: Path) -> list[str]:
        return _verification_problems(directory, self.group.rank, self.group.size, self.group.all_gather)

    def _usable_checkpoint(self, root: Path, tracked) -> Path:
        """The tracked checkpoint if it verifies, else the newest one that does (logged)."""
        tracker = root / TRACKER_FILENAME
        tracked_dir = checkpoint_dir(root, tracked)
        candidates = [tracked_dir] + [path for _, path in find_checkpoints(root) if path != tracked_dir]
        reasons = []
        for directory in candidates:
            problems = self._problems(directory)
            if not problems:
                if reasons:
                    log(
                        f"WARNING: checkpoint {tracked_dir} (named by {tracker}) is not usable: {reasons[0]}; "
                        f"loading {directory}, the newest complete checkpoint, instead"
                    )
                return directory
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            reasons.append(problems[0] + more)
        raise ValueError(
            f"--load {root}: no usable checkpoint ({tracker} names {tracked_dir.name}): " + "; ".join(reasons)
        )

    def _rng_layout_matches(self, common: dict) -> bool:
        saved, now = common.get("layout") or {}, _layout(self.parallel_state, None)
        keys = ("world", "tp", "pp", "dp")
        if all(saved.get(key) == now[key] for key in keys):
            return True
        log(
            f"NOTE: random states not restored: saved at TP {saved.get('tp')} x PP {saved.get('pp')} x DP "
            f"{saved.get('dp')}, loading at TP {now['tp']} x PP {now['pp']} x DP {now['dp']}"
        )
        return False

    def _load_basic(
        self, root, directory, model, optimizer, scheduler, scaler, finetune, load_optim, load_rng
    ):
        if self.parallel_state.world_size > 1:
            raise ValueError(
                f"{directory} is a single-file checkpoint ({basic.MODEL_FILENAME}), which loads in one process "
                "only; resume it at world size 1 and save again to get a sharded checkpoint"
            )
        log(f"> {directory} is a single-file checkpoint: loading it with megatron.checkpoint.basic")
        return basic.load_checkpoint(
            root,
            model,
            optimizer,
            scheduler,
            scaler,
            finetune=finetune,
            load_optim=load_optim,
            load_rng=load_rng,
        )


def _load_object_state(obj, state) -> None:
    if obj is not None and state is not None:
        obj.load_state_dict(state)


class _LoadPlan:
    """What one rank loads: keys, their expected logical shapes, the CPU buffers DCP fills."""

    def __init__(self, model, optimizer, parallel_state: ParallelState, restore_rng: bool) -> None:
        self.parallel_state = parallel_state
        self.params = list(model.named_parameters())
        self.optimizer = optimizer
        self.restore_rng = restore_rng
        self.entries: dict[str, tuple[torch.nn.Parameter | None, tuple[int, ...], torch.dtype]] = {}
        for name, param in self.params:
            self.entries[f"model/{name}"] = (param, _logical_shape(param), param.dtype)

    def check(self, directory: Path, metadata, group: _Group) -> None:
        """Add the optimizer and RNG keys the checkpoint holds; ValueError on every rank (before anything
        is written) when a key is missing, a shape differs or the checkpoint has parameters the model
        lacks."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        saved = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._add_optional_keys(saved)
        problems = []
        for key, (_, shape, _) in self.entries.items():
            if key not in saved:
                problems.append(f"{key} is not in the checkpoint")
            elif tuple(saved[key].size) != shape:
                problems.append(
                    f"{key} has shape {list(saved[key].size)} in the checkpoint but {list(shape)} in the model"
                )
        names = {name for name, _ in self.params}
        all_names = set().union(*group.all_gather(names))
        extra = sorted(
            key for key in saved if key.startswith("model/") and key[len("model/") :] not in all_names
        )
        if extra:
            problems.append(f"the checkpoint holds parameters the model does not: {', '.join(extra[:5])}")
        problems = sorted({p for rank_problems in group.all_gather(problems) for p in rank_problems})
        if problems:
            raise ValueError(f"checkpoint {directory} does not fit the model: " + "; ".join(problems))

    def _add_optional_keys(self, saved: dict) -> None:
        if self.optimizer is not None and "optimizer/step" not in saved:
            log(
                "NOTE: the checkpoint holds no optimizer state: fresh AdamW moments, masters from the weights"
            )
            self.optimizer = None
        if self.optimizer is not None:
            self.entries["optimizer/step"] = (None, (), torch.float32)
            for name, param in self.params:
                for kind in MOMENTS + ("master",):
                    key = f"optimizer/{kind}/{name}"
                    if kind in MOMENTS or (param.dtype != torch.float32 and key in saved):
                        self.entries[key] = (param, _logical_shape(param), torch.float32)
        if self.restore_rng:
            for what in ("torch", "cuda", "tracker_cpu", "tracker_cuda"):
                key = _rng_key(self.parallel_state.rank, what)
                if key in saved:
                    self.entries[key] = (None, tuple(saved[key].size), saved[key].properties.dtype)

    def load(self, directory: Path, layout: _TensorLayout, pg) -> dict[str, torch.Tensor]:
        """Read every planned key into fresh CPU tensors (this rank's local part); key -> tensor."""
        local, state = {}, {}
        for key, (param, shape, dtype) in self.entries.items():
            if param is None:
                local[key] = state[key] = torch.empty(shape, dtype=dtype)
            else:
                local[key] = torch.empty(param.shape, dtype=dtype)
                state[key] = layout.wrap(local[key], param)
        _dcp_load(state, directory, pg)
        return local

    @torch.no_grad()
    def apply_model(self, model, loaded: dict) -> None:
        for name, param in self.params:
            param.copy_(loaded[f"model/{name}"])

    @torch.no_grad()
    def apply_optimizer(self, optimizer, loaded: dict) -> None:
        """Exact AdamW state: the masters (or from the model's weights where none were saved), both
        moments and the step of every parameter this rank steps on."""
        if self.optimizer is None:  # the checkpoint had no optimizer state
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
                state[kind].view(-1).copy_(loaded[f"optimizer/{kind}/{name}"].view(-1)[offset:end])
            master = loaded.get(f"optimizer/master/{name}")
            if master is not None:
                main.view(-1).copy_(master.view(-1)[offset:end])


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


def _restore_rng(parallel_state: ParallelState, directory: Path, loaded: dict) -> None:
    """Python, numpy, torch (CPU and CUDA) and the tensor-parallel tracker of this rank."""
    rank = parallel_state.rank
    path = directory / _rng_json_name(rank)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable random state ({exc})") from None
    version, internal, gauss = record["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(loaded[_rng_key(rank, "torch")])
    cuda = loaded.get(_rng_key(rank, "cuda"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    states = {"cpu": loaded[_rng_key(rank, "tracker_cpu")]} if _rng_key(rank, "tracker_cpu") in loaded else {}
    tracker_cuda = loaded.get(_rng_key(rank, "tracker_cuda"))
    if tracker_cuda is not None and torch.cuda.is_available():
        states["cuda"] = tracker_cuda
    if states:
        parallel_state.rng.load_state_dict({"seed_value": record["tracker_seed"], "states": states})


# --------------------------------------------------------------------------- directory housekeeping


def _replace_directory(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same iteration saved again) is moved aside
    first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temporary directories of saves a crash interrupted (only one save runs at a time)."""
    for path in root.iterdir():
        if _LEFTOVER.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{TRACKER_FILENAME}.tmp-"):
            path.unlink(missing_ok=True)


def _delete_old(root: Path, just_saved: int, keep_last_k: int) -> None:
    """Keep the `keep_last_k` newest complete checkpoints up to the one just saved; delete older complete
    ones (renamed away first, so a crash never leaves a half-deleted `iter_*`)."""
    older = [
        (iteration, path)
        for iteration, path in find_checkpoints(root)
        if iteration < just_saved and (path / MANIFEST_FILENAME).is_file()
    ]
    for _, path in older[keep_last_k - 1 :]:
        doomed = path.with_name(f".{path.name}.deleting-{secrets.token_hex(4)}")
        try:
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            log(f"> removed checkpoint {path} (--keep-last-k {keep_last_k})")
        except OSError as exc:
            log(f"WARNING: could not remove old checkpoint {path}: {exc}")
