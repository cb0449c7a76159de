"""DCP's data files close to the disk: written through a stream that checksums the bytes as they pass (so
a save never reads its files back), and read by mapping each file once, tensors deserialized straight
from the mapping (no intermediate buffer per tensor) while a thread checksums every file this rank reads
whole. The file format is DCP's own (`torch.save` records one after another). See docs/checkpoints.md.
"""

from __future__ import annotations

import io
import mmap
import os
import sys
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import torch

from megatron.checkpoint.files import DATA_SUFFIX, ChecksumWriter, crc32_hex

_CRC_CHUNK_BYTES = 16 << 20
_READS = threading.local()


@contextmanager
def checksummed_reads():
    """Within it, DCP loads of this thread record `{file name: {"bytes", "crc32"}}` for every data file
    they read whole (the dict yielded), computed from the bytes read: the load is the verification."""
    found: dict[str, dict] = {}
    previous = getattr(_READS, "found", None)
    _READS.found = found
    try:
        yield found
    finally:
        _READS.found = previous


def checksum_file_system():
    """A DCP `FileSystem` whose data files are `ChecksumWriter`s; `.entries` maps each data file name to
    its manifest entry once it is closed."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    class ChecksumFileSystem(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.entries: dict[str, dict] = {}
            self._lock = threading.Lock()

        @contextmanager
        def create_stream(self, path, mode: str):
            path = Path(path)
            if mode != "wb" or not path.name.endswith(DATA_SUFFIX):
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            stream = ChecksumWriter(path)
            try:
                yield stream
            except OSError as exc:  # a write's ENOSPC or EIO names no file: name it
                if exc.errno is None or exc.filename is not None:
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            finally:
                stream.close()
            entry = stream.entry()
            if entry is not None:
                with self._lock:
                    self.entries[path.name] = entry

    return ChecksumFileSystem()


@contextmanager
def without_record_checksums():
    """torch.save computes a CRC32 of every zip record it writes (a quarter of the write time); the
    checkpoint's own CRC32 of each whole file replaces it (torch.load does not check it). Where the torch
    has the setting (>= 2.6)."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        yield
        return
    save_config = getattr(config, "save", None)
    before = getattr(save_config, "compute_crc32", None)
    if before is None:
        yield
        return
    save_config.compute_crc32 = False
    try:
        yield
    finally:
        save_config.compute_crc32 = before


class _MemoryReader(io.RawIOBase):
    """A seekable read-only stream over a memoryview (the zip reader reads only headers through it)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        end = min(len(self._view), self._pos + len(buffer))
        count = max(0, end - self._pos)
        memoryview(buffer).cast("B")[:count] = self._view[self._pos : end]
        self._pos += count
        return count


def _load_tensor(view: memoryview, storage, recipes: dict) -> torch.Tensor:
    """The tensor `torch.save` wrote into `view` (one DCP item), its data a view of `storage` (the same
    bytes, mapped from the file): torch.load's own mmap path, pointed at one record of a larger file.
    `recipes` maps a record's pickle (its dtype, shape, strides) to how it rebuilt the tensor, so items
    of the same shape skip the unpickling."""
    from torch import serialization

    try:
        reader = serialization._open_zipfile_reader(_MemoryReader(view))
        load = serialization._load
    except AttributeError:  # another torch's private names: the copying path
        return torch.load(_MemoryReader(view), map_location="cpu", weights_only=True)
    with reader as zip_file:
        key = (zip_file.get_record("data.pkl"), zip_file.get_record("byteorder"))
        recipe = recipes.get(key)
        if recipe is not None:
            dtype, nbytes, offset, size, stride = recipe
            start = zip_file.get_record_offset("data/0")
            data = storage[start : start + nbytes]
            return torch.empty(0, dtype=dtype).set_(data, offset, size, stride)
        tensor = load(
            zip_file, "cpu", torch._weights_only_unpickler, overall_storage=storage, encoding="utf-8"
        )
        data = tensor.untyped_storage()
        if key[
            1
        ] == sys.byteorder.encode() and data.data_ptr() == storage.data_ptr() + zip_file.get_record_offset(
            "data/0"
        ):
            recipes[key] = (
                tensor.dtype,
                data.nbytes(),
                tensor.storage_offset(),
                tensor.size(),
                tensor.stride(),
            )
        return tensor


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    """Whether the (offset, length) spans tile [0, size) exactly."""
    end = 0
    for offset, length in sorted(set(spans)):
        if offset != end:
            return False
        end = offset + length
    return end == size


class _Checksum(threading.Thread):
    """CRC32 of a whole mapped file, in the background while the items are deserialized."""

    def __init__(self, view: memoryview) -> None:
        super().__init__(daemon=True)
        self.view, self.crc = view, 0

    def run(self) -> None:
        for start in range(0, len(self.view), _CRC_CHUNK_BYTES):
            self.crc = zlib.crc32(self.view[start : start + _CRC_CHUNK_BYTES], self.crc)


def read_data(reader, plan, planner):
    """DCP `StorageReader.read_data` for `reader` (a FileSystemReader): each file mapped once, its items
    read in file order; files read whole are checksummed when `checksummed_reads` is active."""
    per_file: dict[str, list] = {}
    for item in plan.items:
        info = reader.storage_data[item.storage_index]
        per_file.setdefault(info.relative_path, []).append((info, item))
    found = getattr(_READS, "found", None)
    for relative, items in per_file.items():
        items.sort(key=lambda pair: pair[0].offset)
        entry = _read_file(reader, Path(reader.path) / relative, items, planner, found is not None)
        if entry is not None:
            found[relative] = entry
    future = torch.futures.Future()
    future.set_result(None)
    return future


def _read_file(reader, path: Path, items: list, planner, checksum: bool) -> dict | None:
    """Every requested item of one file into the planner's tensors; the file's manifest entry when it was
    read whole and `checksum`, else None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    view = memoryview(mapped)
    spans = [(info.offset, info.length) for info, _ in items]
    thread = _Checksum(view) if checksum and _covers(spans, size) else None
    if thread is not None:
        thread.start()
    storage = torch.frombuffer(mapped, dtype=torch.uint8).untyped_storage() if size else None
    recipes: dict = {}
    try:
        for info, request in items:
            _read_item(reader, view, storage, info, request, planner, recipes)
    finally:
        if thread is not None:
            thread.join()
    return {"bytes": size, "crc32": crc32_hex(thread.crc)} if thread is not None else None


def _read_item(reader, view: memoryview, storage, info, request, planner, recipes: dict) -> None:
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.planner import LoadItemType

    item = view[info.offset : info.offset + info.length]
    descriptors = getattr(info, "transform_descriptors", None) or ()
    if request.type == LoadItemType.BYTE_IO or descriptors:
        stream = _MemoryReader(item)
        if descriptors:
            stream = io.BytesIO(reader.transforms.transform_load_stream(request, descriptors, stream).read())
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(stream.read()))
            return
        tensor = torch.load(stream, map_location="cpu", weights_only=True)
    else:
        tensor = _load_tensor(item, storage[info.offset : info.offset + info.length], recipes)
    tensor = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
    target = planner.resolve_tensor(request).detach()
    if target.size() != tensor.size():
        raise ValueError(
            f"{request.storage_index}: stored {list(tensor.size())}, expected {list(target.size())}"
        )
    target.copy_(tensor)
    planner.commit_tensor(request, target)
