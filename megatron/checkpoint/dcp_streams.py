"""DCP's data files close to the disk: written through a stream that checksums the bytes as they pass (so
a save never reads its files back), and read the same way: a file this rank reads whole is read front to
back with large `readinto` calls, a tensor's bytes straight into its destination where the stored record
is the whole destination, while a thread computes the CRC32 of every byte in file order. Files read in
part are mapped and only the requested items touched. The file format is DCP's own (`torch.save` records
one after another). See docs/checkpoints.md.
"""

from __future__ import annotations

import io
import mmap
import os
import queue
import re
import struct
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron.checkpoint.files import DATA_SUFFIX, ChecksumWriter, crc32, crc32_hex

_CRC_CHUNK_BYTES = 16 << 20
# a file read whole: one `readinto` per chunk (large for the device, small enough that the CRC of one
# chunk overlaps the read of the next); an item's zip headers and pickle are read through a head of
# _HEAD_BYTES (an item no larger: all of it), the data beyond it straight into place
_READ_CHUNK_BYTES = 16 << 20
_HEAD_BYTES = 64 << 10
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header (30 bytes)
_LOCAL_SIGNATURE = b"PK\x03\x04"
_NEXT_RECORD = re.compile(rb"PK\x03\x04|PK\x07\x08")  # a local header or a data descriptor
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
    """A seekable read-only stream over a memoryview, or over several read one after another as one (an
    item whose data went straight to its destination): the zip reader reads only headers through it."""

    def __init__(self, view) -> None:
        super().__init__()
        self._parts = [memoryview(part).cast("B") for part in (view if isinstance(view, list) else [view])]
        self._size, self._pos = sum(len(part) for part in self._parts), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        out, done, start = memoryview(buffer).cast("B"), 0, 0
        for part in self._parts:
            end = start + len(part)
            if self._pos + done < end and done < len(out):
                begin = self._pos + done - start
                count = min(len(part) - begin, len(out) - done)
                out[done : done + count] = part[begin : begin + count]
                done += count
            start = end
        self._pos += done
        return done


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


def read_data(reader, plan, planner):
    """DCP `StorageReader.read_data` for `reader` (a FileSystemReader): the items of each file in file
    order; a file read whole is streamed front to back (and checksummed when `checksummed_reads` is
    active), one read in part is mapped."""
    per_file: dict[str, list] = {}
    for item in plan.items:
        info = reader.storage_data[item.storage_index]
        per_file.setdefault(info.relative_path, []).append((info, item))
    found = getattr(_READS, "found", None)
    for relative, items in per_file.items():
        items.sort(key=lambda pair: pair[0].offset)
        path = Path(reader.path) / relative
        size, end = path.stat().st_size, max(info.offset + info.length for info, _ in items)
        if end > size:
            raise ValueError(f"{path}: {size} bytes, DCP's metadata has data up to byte {end} (truncated)")
        if _covers([(info.offset, info.length) for info, _ in items], size):
            entry = _stream_file(reader, path, items, planner, found is not None)
        else:
            entry = _map_file(reader, path, items, planner)
        if entry is not None:
            found[relative] = entry
    future = torch.futures.Future()
    future.set_result(None)
    return future


def _covers(spans: list[tuple[int, int]], size: int) -> bool:
    """Whether the (offset, length) spans tile [0, size) exactly."""
    end = 0
    for offset, length in sorted(set(spans)):
        if offset != end:
            return False
        end = offset + length
    return end == size


# --------------------------------------------------------------------------------------------------
# a file read in part: mapped, only the requested items' pages touched


def _map_file(reader, path: Path, items: list, planner) -> None:
    """Every requested item of a file this rank reads in part into the planner's tensors."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    view = memoryview(mapped)
    storage = torch.frombuffer(mapped, dtype=torch.uint8).untyped_storage() if size else None
    recipes: dict = {}
    for info, request in items:
        item = view[info.offset : info.offset + info.length]
        item_storage = storage[info.offset : info.offset + info.length] if storage is not None else None
        _read_from_memory(reader, item, item_storage, info, request, planner, recipes)


def _read_from_memory(reader, item: memoryview, storage, info, request, planner, recipes: dict) -> None:
    """One request from its item's bytes in memory (`storage`: the same bytes as a torch storage)."""
    from torch.distributed.checkpoint.planner import LoadItemType

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
        tensor = _load_tensor(item, storage, recipes)
    _deliver(planner, request, tensor)


def _deliver(planner, request, tensor: torch.Tensor, target: torch.Tensor | None = None) -> None:
    """The part of the stored `tensor` that `request` asks for, copied into its destination."""
    from torch.distributed._shard._utils import narrow_tensor_by_index

    tensor = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
    target = planner.resolve_tensor(request).detach() if target is None else target
    if target.size() != tensor.size():
        raise ValueError(
            f"{request.storage_index}: stored {list(tensor.size())}, expected {list(target.size())}"
        )
    target.copy_(tensor)
    planner.commit_tensor(request, target)


# --------------------------------------------------------------------------------------------------
# a file read whole: streamed front to back, every byte checksummed in file order


class _Crc32(threading.Thread):
    """CRC32 of the buffers handed to `feed`, in order, computed in this thread (it releases the GIL)
    while the reader goes on reading. A buffer must not change until `drain` or `finish` returned."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self._queue: queue.Queue = queue.Queue()
        self.crc = 0
        self.start()

    def feed(self, view) -> None:
        self._queue.put(view)

    def run(self) -> None:
        while (view := self._queue.get()) is not None:
            for start in range(0, len(view), _CRC_CHUNK_BYTES):
                self.crc = crc32(view[start : start + _CRC_CHUNK_BYTES], self.crc)
            self._queue.task_done()

    def drain(self) -> None:
        """Return once every buffer fed so far is checksummed (before one of them is written to)."""
        self._queue.join()

    def finish(self) -> int:
        self._queue.put(None)
        self.join()
        return self.crc


class _Sequential:
    """One file read front to back with large `readinto` calls straight into the caller's buffers; every
    byte also goes to `crc` (a _Crc32, or None) in file order."""

    def __init__(self, handle, path: Path, crc: _Crc32 | None) -> None:
        self.handle, self.path, self.crc, self.pos = handle, path, crc, 0

    def read_into(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            count = self.handle.readinto(view[done : done + _READ_CHUNK_BYTES])
            if not count:
                raise ValueError(
                    f"{self.path}: ends at byte {self.pos + done}, DCP's metadata has data up to byte "
                    f"{self.pos + len(view)} (truncated)"
                )
            if self.crc is not None:
                self.crc.feed(view[done : done + count])
            done += count
        self.pos += done

    def read(self, nbytes: int) -> bytearray:
        buffer = bytearray(nbytes)
        self.read_into(memoryview(buffer))
        return buffer


@dataclass
class _FileCache:
    """What one file's items share: their pickles' recipes, and the item beginnings (bytes up to the
    data) whose layout torch's zip reader confirmed."""

    recipes: dict = field(default_factory=dict)
    confirmed: set = field(default_factory=set)
    mapped_recipes: dict = field(default_factory=dict)  # _load_tensor's, for items read into memory


def _stream_file(reader, path: Path, items: list, planner, checksum: bool) -> dict | None:
    """Every item of a file this rank reads whole into the planner's tensors, in one front-to-back pass;
    the file's manifest entry when `checksum`, else None."""
    crc = _Crc32() if checksum else None
    cache = _FileCache()
    try:
        with open(path, "rb", buffering=0) as handle:  # (POSIX_FADV_SEQUENTIAL measured no faster)
            stream = _Sequential(handle, path, crc)
            for info, requests in _by_item(items):
                _stream_item(reader, stream, info, requests, planner, cache)
    finally:
        value = crc.finish() if crc is not None else 0
    return {"bytes": stream.pos, "crc32": crc32_hex(value)} if crc is not None else None


def _by_item(items: list) -> list[tuple]:
    """(storage info, [requests]) per stored item, in file order (several requests may read one item)."""
    grouped: list[tuple] = []
    for info, request in items:
        if grouped and (grouped[-1][0].offset, grouped[-1][0].length) == (info.offset, info.length):
            grouped[-1][1].append(request)
        else:
            grouped.append((info, [request]))
    return grouped


def _stream_item(reader, stream: _Sequential, info, requests: list, planner, cache: _FileCache) -> None:
    from torch.distributed.checkpoint.planner import LoadItemType

    tensors = all(request.type != LoadItemType.BYTE_IO for request in requests)
    if not tensors or getattr(info, "transform_descriptors", None):
        _from_bytes(reader, stream.read(info.length), info, requests, planner, cache)
        return
    head = stream.read(min(info.length, _HEAD_BYTES))  # an item no larger: all of it
    guess = _guess_layout(head, cache)
    if guess is None or guess[1] + guess[0].nbytes > info.length:
        _from_bytes(reader, head + stream.read(info.length - len(head)), info, requests, planner, cache)
        return
    recipe, start = guess
    end = start + recipe.nbytes
    target = planner.resolve_tensor(requests[0]).detach() if len(requests) == 1 else None
    direct = target is not None and _whole_destination(recipe, requests[0], target)
    holder = target if direct else torch.empty(recipe.nbytes, dtype=torch.uint8)
    data = _bytes_of(holder)
    known = memoryview(head)[start:end]  # the data's beginning, read with the head
    data[: len(known)] = known
    stream.read_into(data[len(known) :])
    tail = stream.read(info.length - max(len(head), end))
    segments = [memoryview(head)[:start], data, memoryview(head)[end:], memoryview(tail)]
    if not _layout_confirmed(segments, recipe, start, cache):  # not as guessed: torch's own reading
        item = bytearray(b"".join(segments))
        if stream.crc is not None:
            stream.crc.drain()  # the destination is written again: its bytes checksummed first
        _from_bytes(reader, item, info, requests, planner, cache)
        return
    if direct:
        planner.commit_tensor(requests[0], target)
        return
    tensor = torch.empty(0, dtype=recipe.dtype).set_(
        holder.untyped_storage(), recipe.offset, recipe.size, recipe.stride
    )
    for request in requests:
        _deliver(planner, request, tensor, target if len(requests) == 1 else None)


def _from_bytes(reader, item: bytearray, info, requests: list, planner, cache: _FileCache) -> None:
    storage = torch.frombuffer(item, dtype=torch.uint8).untyped_storage() if item else None
    for request in requests:
        _read_from_memory(reader, memoryview(item), storage, info, request, planner, cache.mapped_recipes)


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _whole_destination(recipe: _Recipe, request, target: torch.Tensor) -> bool:
    """Whether the stored tensor's bytes are, in order, exactly the destination's: then they are read
    straight into it."""
    size = tuple(recipe.size)
    return (
        recipe.contiguous
        and recipe.offset == 0
        and target.device.type == "cpu"
        and target.dtype == recipe.dtype
        and target.is_contiguous()
        and tuple(target.size()) == size
        and recipe.nbytes == target.numel() * target.element_size()
        and all(offset == 0 for offset in request.storage_offsets)
        and tuple(request.lengths) == size
    )


@dataclass(frozen=True)
class _Recipe:
    """How a `torch.save` pickle rebuilds its one tensor: the storage record's key, dtype and bytes, and
    the view's offset, size and stride (`pickle`: the pickle's exact bytes)."""

    pickle: bytes
    key: str
    dtype: torch.dtype
    nbytes: int
    offset: int
    size: tuple
    stride: tuple
    contiguous: bool


def _recipe(data: memoryview) -> _Recipe:
    """The recipe of the pickle at the start of `data` (read up to its STOP): unpickled by torch's
    weights-only unpickler against a storage on the meta device, so no data is needed."""
    from torch import _weights_only_unpickler

    storages = []

    def persistent_load(saved_id):
        typename, storage_type, key, _, numel = saved_id
        if (typename.decode() if isinstance(typename, bytes) else typename) != "storage":
            raise ValueError(f"unexpected persistent id {typename!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        storages.append(str(key))
        meta = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    source = io.BytesIO(data)
    unpickler = _weights_only_unpickler.Unpickler(source, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    tensor = unpickler.load()
    if not isinstance(tensor, torch.Tensor) or len(storages) != 1:
        raise ValueError("not one tensor over one storage")
    return _Recipe(
        pickle=bytes(data[: source.tell()]),
        key=storages[0],
        dtype=tensor.dtype,
        nbytes=tensor.untyped_storage().nbytes(),
        offset=tensor.storage_offset(),
        size=tuple(tensor.size()),
        stride=tuple(tensor.stride()),
        contiguous=tensor.is_contiguous(),
    )


def _local_record(buffer: bytearray, pos: int) -> tuple[bytes, int] | None:
    """(name, where its data starts) of the zip local file header at `pos`, if one lies whole there."""
    if pos + _LOCAL_HEADER.size > len(buffer):
        return None
    fields = _LOCAL_HEADER.unpack_from(buffer, pos)
    name_start = pos + _LOCAL_HEADER.size
    start = name_start + fields[9] + fields[10]
    if buffer[pos : pos + 4] != _LOCAL_SIGNATURE or start > len(buffer):
        return None
    return bytes(buffer[name_start : name_start + fields[9]]), start


def _guess_layout(head: bytearray, cache: _FileCache) -> tuple[_Recipe, int] | None:
    """(recipe, where the data starts in the item) as `torch.save` lays an item out: the pickle first,
    then the data record's local header; None if the head shows no such layout. A guess only: it is
    confirmed by torch's zip reader once the item is read (`_layout_confirmed`)."""
    first = _local_record(head, 0)
    if first is None or not first[0].endswith(b"data.pkl"):
        return None
    name, start = first
    following = _NEXT_RECORD.search(head, start)
    key = bytes(head[start : following.start() if following else len(head)])
    recipe = cache.recipes.get(key)
    if recipe is None or head[start : start + len(recipe.pickle)] != recipe.pickle:
        try:
            recipe = _recipe(memoryview(head)[start:])
        except Exception:  # noqa: BLE001 - not a pickle this path understands: torch.load's path decides
            return None
        cache.recipes[key] = recipe
    data_name = name[: -len(b"data.pkl")] + b"data/" + recipe.key.encode()
    pos = start + len(recipe.pickle)
    while (pos := head.find(_LOCAL_SIGNATURE, pos)) >= 0:
        record = _local_record(head, pos)
        if record is not None and record[0] == data_name:
            return recipe, record[1]
        pos += len(_LOCAL_SIGNATURE)
    return None


def _layout_confirmed(segments: list, recipe: _Recipe, start: int, cache: _FileCache) -> bool:
    """Whether torch's zip reader finds `recipe`'s pickle, native byte order and the data at `start` in
    the item (`segments`: its bytes). An item whose bytes up to the data equal a confirmed one's has
    the same layout and is not parsed again."""
    from torch import serialization

    before = bytes(segments[0])
    if before in cache.confirmed:
        return True
    try:
        with serialization._open_zipfile_reader(_MemoryReader(segments)) as zip_file:
            order = zip_file.get_record("byteorder") if zip_file.has_record("byteorder") else b"little"
            confirmed = (
                zip_file.get_record("data.pkl") == recipe.pickle
                and order == sys.byteorder.encode()
                and zip_file.get_record_offset(f"data/{recipe.key}") == start
            )
    except Exception:  # noqa: BLE001 - unreadable here: torch.load's path reports it
        return False
    if confirmed:
        cache.confirmed.add(before)
    return confirmed
