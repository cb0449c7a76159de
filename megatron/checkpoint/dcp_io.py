"""torch.distributed.checkpoint (DCP) plumbing: its metadata read without unpickling anything else, save
and load in one process or over a process group, the checkpointer's own process group, and how this
rank's tensors map onto the logical ones DCP records. See docs/checkpoints.md.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path

import torch

from megatron.checkpoint.files import METADATA_FILENAME
from megatron.checkpoint.fragments import chunk_load_planner, chunk_save_planner
from megatron.parallel.state import ParallelState

# DCP warns on every call in one process that it runs without torch.distributed: that is the intent
# here. (A process-wide filter: warnings.catch_warnings is not thread-safe, and saves run in a thread.)
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)


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
        """DCP's file reader with `.metadata` read by `_SafeUnpickler` instead of plain pickle, and the data
        read by `dcp_streams.read_data` (each file mapped once, checksummed when read whole)."""

        def __init__(self, path) -> None:
            super().__init__(path)
            self.directory = Path(path)

        def read_metadata(self, *args, **kwargs):
            return read_metadata(self.directory, load_id=getattr(self, "load_id", None))

        def read_data(self, plan, planner):
            from megatron.checkpoint.dcp_streams import read_data

            return read_data(self, plan, planner)

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


def dcp_save(state: dict, directory: Path, pg) -> dict[str, dict]:
    """Write `state` with DCP (one data file per rank, fsynced); returns the manifest entry (size, CRC32)
    of every data file this rank wrote, computed while writing."""
    import torch.distributed.checkpoint as dcp

    from megatron.checkpoint.dcp_streams import checksum_file_system, without_record_checksums

    writer = dcp.FileSystemWriter(directory, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.fs = checksum_file_system()
    planner = chunk_save_planner()  # DCP's default, plus LogicalChunks values (fragments.py)
    with without_record_checksums():
        if pg is not None:
            dcp.save(state, storage_writer=writer, process_group=pg, planner=planner)
        elif "no_dist" in inspect.signature(dcp.save).parameters:
            dcp.save(state, storage_writer=writer, no_dist=True, planner=planner)
        else:  # torch < 2.5: the private entry point has the flag
            from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

            _save_state_dict(state, storage_writer=writer, no_dist=True, planner=planner)
    return dict(writer.fs.entries)


def dcp_load(state: dict, directory: Path, pg) -> None:
    """Fill the tensors of `state` (plain, DTensor or fragments.LogicalChunks) from the checkpoint, in
    place."""
    import torch.distributed.checkpoint as dcp

    reader = _reader_class()(directory)
    planner = chunk_load_planner()  # DCP's default, plus LogicalChunks values; counts bytes read
    try:
        if pg is not None:
            dcp.load(state, storage_reader=reader, process_group=pg, planner=planner)
        elif "no_dist" in inspect.signature(dcp.load).parameters:
            dcp.load(state, storage_reader=reader, no_dist=True, planner=planner)
        else:  # torch < 2.5
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            _load_state_dict(state, storage_reader=reader, no_dist=True, planner=planner)
    except dcp_failure_type() as exc:
        raise ValueError(f"reading checkpoint {directory} failed: {describe(exc)}") from None


def dcp_failure_type():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def describe(exc: BaseException) -> str:
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


class CheckpointGroup:
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


class TensorLayout:
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


def logical_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "full_shape", param.shape))
