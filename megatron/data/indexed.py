"""Megatron-LM's memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), read and written.

The byte layout follows ``docs/data-format.md`` and Megatron-LM's ``MMapIndexedDataset`` so that data
tokenized by either tool works in the other:

``.idx`` (little-endian): magic ``b"MMIDIDX\\x00\\x00"``, uint64 version 1, uint8 dtype code, uint64 N
(items), uint64 M (document index entries), int32[N] sizes, int64[N] byte pointers into ``.bin``,
int64[M] document index (first 0, last N). ``.bin`` is the concatenated tokens with no header.

The reader validates the header and every length against the actual file sizes, so a truncated or
mismatched pair fails at open with a ``ValueError`` that names the file, instead of returning garbage.
The writer writes to temporary names and renames only in ``finalize()``; the ``.idx`` appears last, so
an output that has an ``.idx`` is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from array import array
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = 34  # 9 magic + 8 version + 1 dtype code + 8 N + 8 M

# Megatron-LM's codes (megatron/core/datasets/indexed_dataset.py, DType): 6 is float64, 7 float32.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

_WRITE_BUFFER_BYTES = 8 << 20
_VALIDATE_BLOCK = 1 << 22


def data_file_path(prefix: str | os.PathLike) -> str:
    """Path of the token file of ``prefix``."""
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    """Path of the index file of ``prefix``."""
    return f"{os.fspath(prefix)}.idx"


def best_dtype(vocab_size: int) -> np.dtype:
    """Token dtype Megatron-LM picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dtype_code(dtype) -> int:
    """The ``.idx`` code of a NumPy dtype (``ValueError`` for dtypes the format cannot hold)."""
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF_DTYPE:
        valid = ", ".join(str(d) for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dtype} cannot be stored in an indexed dataset; valid: {valid}")
    return _CODE_OF_DTYPE[dtype]


def strip_suffix(path: str | os.PathLike) -> str:
    """Accept ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx`` and return ``PREFIX``."""
    path = os.fspath(path)
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def exists(prefix: str | os.PathLike) -> bool:
    """Whether both files of ``prefix`` exist."""
    return os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))


class _IndexHeader:
    """The fixed 34-byte header of an ``.idx`` file, validated on parse."""

    def __init__(self, path: str, raw: bytes, file_size: int):
        if len(raw) < HEADER_SIZE:
            raise ValueError(
                f"{path}: truncated index file ({file_size} bytes, the header alone is {HEADER_SIZE})"
            )
        if raw[:9] != INDEX_MAGIC:
            raise ValueError(
                f"{path}: not a Megatron indexed dataset index (magic {raw[:9]!r}, expected {INDEX_MAGIC!r})"
            )
        (self.version,) = struct.unpack_from("<Q", raw, 9)
        if self.version != INDEX_VERSION:
            raise ValueError(f"{path}: unsupported index version {self.version} (expected {INDEX_VERSION})")
        code = raw[17]
        if code not in DTYPE_CODES:
            raise ValueError(f"{path}: unknown dtype code {code} (valid: {sorted(DTYPE_CODES)})")
        self.dtype = DTYPE_CODES[code]
        self.num_items, self.num_doc_entries = struct.unpack_from("<QQ", raw, 18)
        expected = HEADER_SIZE + 12 * self.num_items + 8 * self.num_doc_entries
        if file_size != expected:
            problem = "truncated" if file_size < expected else "has trailing bytes"
            raise ValueError(
                f"{path}: index file {problem}: {file_size} bytes, but N={self.num_items} items and "
                f"M={self.num_doc_entries} document entries need {expected}"
            )


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron ``.bin/.idx`` pair.

    ``len(ds)`` is the number of items (sequences); ``ds[i]`` returns item ``i`` as a read-only array of
    ``ds.dtype`` (a contiguous slice ``ds[a:b]`` returns a list of arrays). ``ds.sizes`` (int32),
    ``ds.pointers`` (int64, byte offsets) and ``ds.document_indices`` (int64, M = documents + 1) are
    the index arrays. Any inconsistency between header, index arrays and file lengths raises
    ``ValueError`` naming the file.
    """

    def __init__(self, path_prefix: str | os.PathLike):
        self.path_prefix = strip_suffix(path_prefix)
        idx_path, bin_path = index_file_path(self.path_prefix), data_file_path(self.path_prefix)
        missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"indexed dataset '{self.path_prefix}' not found: missing {' and '.join(missing)} "
                "(a data prefix is the path without .bin/.idx)"
            )
        self._read_index(idx_path)
        self._map_data(bin_path)

    def _read_index(self, idx_path: str) -> None:
        file_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as stream:
            header = _IndexHeader(idx_path, stream.read(HEADER_SIZE), file_size)
        self.dtype = header.dtype
        n, m = header.num_items, header.num_doc_entries
        self._index_map = np.memmap(idx_path, mode="r", dtype=np.uint8)
        buffer = self._index_map
        self.sizes = np.frombuffer(buffer, np.int32, count=n, offset=HEADER_SIZE)
        self.pointers = np.frombuffer(buffer, np.int64, count=n, offset=HEADER_SIZE + 4 * n)
        self.document_indices = np.frombuffer(buffer, np.int64, count=m, offset=HEADER_SIZE + 12 * n)
        self._validate_index(idx_path)

    def _validate_index(self, idx_path: str) -> None:
        n = len(self.sizes)
        if n and self.sizes.min() < 0:
            raise ValueError(f"{idx_path}: negative item size at item {int(np.argmin(self.sizes))}")
        if n and self.pointers[0] != 0:
            raise ValueError(f"{idx_path}: pointer of item 0 is {int(self.pointers[0])}, expected 0")
        # In blocks, so that checking a huge index needs little memory.
        for start in range(0, max(n - 1, 0), _VALIDATE_BLOCK):
            stop = min(start + _VALIDATE_BLOCK, n - 1)
            steps = np.diff(self.pointers[start : stop + 1])
            expected = self.sizes[start:stop].astype(np.int64) * self.dtype.itemsize
            if not np.array_equal(steps, expected):
                bad = start + int(np.flatnonzero(steps != expected)[0]) + 1
                raise ValueError(
                    f"{idx_path}: pointer of item {bad} is {int(self.pointers[bad])}, but item {bad - 1} ends "
                    f"at byte {int(self.pointers[bad - 1]) + int(expected[bad - 1 - start])}"
                )
        doc = self.document_indices
        decreasing = any(
            np.any(np.diff(doc[start : start + _VALIDATE_BLOCK + 1]) < 0)
            for start in range(0, max(len(doc) - 1, 0), _VALIDATE_BLOCK)
        )
        if len(doc) == 0 or doc[0] != 0 or doc[-1] != n or decreasing:
            raise ValueError(
                f"{idx_path}: document index must start at 0, end at N={n} and never decrease "
                f"(got {len(doc)} entries, first {doc[:1].tolist()}, last {doc[-1:].tolist()})"
            )

    def _map_data(self, bin_path: str) -> None:
        needed = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = os.path.getsize(bin_path)
        if actual != needed:
            problem = "shorter" if actual < needed else "longer"
            raise ValueError(
                f"{bin_path}: data file is {problem} than its index says ({actual} bytes, the index needs "
                f"{needed}); the .bin/.idx pair is truncated or mismatched"
            )
        if needed == 0:  # np.memmap refuses empty files
            self._data = np.empty(0, dtype=self.dtype)
        else:
            self._data = np.memmap(bin_path, mode="r", dtype=self.dtype)

    @property
    def num_documents(self) -> int:
        """Number of documents (document index entries minus one)."""
        return len(self.document_indices) - 1

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError(f"{self.path_prefix}: slices must be contiguous (step 1), got step {step}")
            return [self.get(i) for i in range(start, stop)]
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of item ``index`` (the rest of it when length is None)."""
        num_items = len(self.sizes)
        index = int(index)
        if index < 0:
            index += num_items
        if not 0 <= index < num_items:
            raise IndexError(f"item {index} out of range for {num_items} items in {self.path_prefix}")
        size = int(self.sizes[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"offset {offset} + length {length} out of range for item {index} of size {size}"
            )
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        return self._data[start : start + length]

    def __getstate__(self) -> dict:
        # Pickling (data-loader workers under spawn) must not copy the mapped files: reopen them instead.
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset('{self.path_prefix}', items={len(self)}, documents={self.num_documents}, "
            f"dtype={self.dtype})"
        )


class IndexedDatasetWriter:
    """Writes a ``.bin/.idx`` pair atomically.

    Tokens stream to ``PREFIX.bin.tmp-PID`` through a large buffer; ``finalize()`` writes the index and
    renames both files into place (``.idx`` last, so an existing ``.idx`` means a complete dataset).
    ``abort()`` (also run when the writer is used as a context manager and the block raises) removes
    the temporary files and leaves any previous output untouched.
    """

    def __init__(self, path_prefix: str | os.PathLike, dtype):
        self.path_prefix = strip_suffix(path_prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"token dtype must be an integer type, got {self.dtype}")
        self._limits = np.iinfo(self.dtype)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = data_file_path(self.path_prefix) + suffix
        self._tmp_idx = index_file_path(self.path_prefix) + suffix
        Path(self.path_prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp_bin, "wb", buffering=_WRITE_BUFFER_BYTES)  # noqa: SIM115
        self._sizes = array("q")
        self._document_indices = array("q", [0])
        self._closed = False

    def _as_tokens(self, tokens) -> np.ndarray:
        array_tokens = np.asarray(tokens)
        if array_tokens.dtype == self.dtype:
            return array_tokens.reshape(-1)
        if array_tokens.size and array_tokens.dtype.kind in "iu":
            low, high = int(array_tokens.min()), int(array_tokens.max())
            if low < self._limits.min or high > self._limits.max:
                raise ValueError(
                    f"token ids in [{low}, {high}] do not fit the dataset dtype {self.dtype} of "
                    f"{self.path_prefix} (use a wider dtype, e.g. int32 for vocabularies of 65500+)"
                )
        elif array_tokens.size:
            raise ValueError(f"tokens must be integers, got dtype {array_tokens.dtype}")
        return array_tokens.astype(self.dtype, copy=False).reshape(-1)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"writer of {self.path_prefix} is already finalized or aborted")

    def add_item(self, tokens) -> None:
        """Append one item (sequence) without closing the current document."""
        self._check_open()
        array_tokens = self._as_tokens(tokens)
        self._bin.write(array_tokens.tobytes())
        self._sizes.append(array_tokens.size)

    def end_document(self) -> None:
        """Mark a document boundary after the items added so far."""
        self._check_open()
        self._document_indices.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        """Append one document made of a single item."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, flat_tokens, lengths) -> None:
        """Append many single-item documents at once: ``flat_tokens`` holds them back to back."""
        self._check_open()
        array_tokens = self._as_tokens(flat_tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != array_tokens.size or (lengths.size and lengths.min() < 0):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {array_tokens.size} tokens were given")
        self._bin.write(array_tokens.tobytes())
        first = len(self._sizes)
        self._sizes.frombytes(lengths.tobytes())
        self._document_indices.frombytes(np.arange(first + 1, first + 1 + lengths.size).tobytes())

    def append_dataset(self, path_prefix: str | os.PathLike) -> None:
        """Append every item and document of another dataset (merge), rebasing its index."""
        self._check_open()
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {other.path_prefix} (dtype {other.dtype}) into {self.path_prefix} "
                f"(dtype {self.dtype}): token dtypes differ"
            )
        self._bin.flush()
        with open(data_file_path(other.path_prefix), "rb") as source:
            shutil.copyfileobj(source, self._bin, _WRITE_BUFFER_BYTES)
        first = len(self._sizes)
        self._sizes.frombytes(other.sizes.astype(np.int64).tobytes())
        self._document_indices.frombytes((other.document_indices[1:] + first).tobytes())
        del other

    @property
    def num_items(self) -> int:
        """Items written so far."""
        return len(self._sizes)

    @property
    def num_documents(self) -> int:
        """Document boundaries written so far."""
        return len(self._document_indices) - 1

    def _write_index(self) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int64) if len(self._sizes) else np.zeros(0, np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError(f"an item of {int(sizes.max())} tokens exceeds the format's int32 sizes")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        if sizes.size > 1:
            np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        document_indices = np.frombuffer(self._document_indices, dtype=np.int64)
        with open(self._tmp_idx, "wb", buffering=_WRITE_BUFFER_BYTES) as stream:
            stream.write(INDEX_MAGIC)
            stream.write(struct.pack("<QB", INDEX_VERSION, self._code))
            stream.write(struct.pack("<QQ", sizes.size, document_indices.size))
            stream.write(sizes.astype("<i4").tobytes())
            stream.write(pointers.astype("<i8").tobytes())
            stream.write(document_indices.astype("<i8").tobytes())

    def finalize(self) -> None:
        """Write the index and move both files into place (``.idx`` last)."""
        self._check_open()
        try:
            self._bin.close()
            self._write_index()
            final_idx = index_file_path(self.path_prefix)
            # Drop an old index first: a crash between the renames then leaves no complete-looking pair.
            if os.path.exists(final_idx):
                os.remove(final_idx)
            os.replace(self._tmp_bin, data_file_path(self.path_prefix))
            os.replace(self._tmp_idx, final_idx)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written; previous outputs with the same prefix stay as they were."""
        self._closed = True
        if not self._bin.closed:
            # Closing flushes the buffer, which fails again on a full disk: the file is closed anyway.
            with contextlib.suppress(OSError):
                self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()
