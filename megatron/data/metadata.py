"""Source metadata of each document (path, repository, licence), in a sidecar aligned with document ids.

An indexed dataset ``PREFIX.bin/.idx`` may have two more files:

``PREFIX.meta.jsonl``
    one compact JSON object per document, in document order (line ``d`` describes document ``d``):
    the ``--metadata-keys`` fields present in the document's input record, e.g.
    ``{"max_stars_repo_name": "org/repo", "max_stars_repo_path": "src/a.py",
    "max_stars_repo_licenses": ["MIT"]}``; ``{}`` when the record had none of them. Readable with
    ``sed -n "$((d + 1))p"``.
``PREFIX.meta.offsets``
    the byte offset of every line, for O(1) lookup by document id without reading the JSONL:
    8-byte magic ``b"MMIDMETA"``, uint64 version 1, uint64 D (documents), then uint64[D + 1] offsets
    (little-endian; the first 0, the last the size of the JSONL file).

Why this layout: 8 bytes per document of index plus the JSON text (~100 bytes for The Stack's fields),
so 300 million documents take 2.4 GB of offsets, memory-mapped (only the pages touched are read); JSON
keeps whatever fields a corpus has without a schema, and two sidecars concatenate like the ``.bin``
files (merge rebases the offsets). Both are written under temporary names and renamed after the
dataset itself, offsets last: a sidecar with an offsets file is complete. A dataset without a sidecar
works everywhere; attribution search then reports "no metadata".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from array import array

import numpy as np

from megatron.data.indexed import IndexedDatasetWriter, strip_suffix

METADATA_MAGIC = b"MMIDMETA"
METADATA_VERSION = 1
_HEADER = struct.Struct("<8sQQ")

# The Stack v1 (max_stars_*, hexsha), The Stack v2 / smol (repo_name, path, detected_licenses,
# license_type, blob_id) and generic (repo, license) field names; absent fields are left out.
DEFAULT_METADATA_KEYS = (
    "max_stars_repo_name",
    "max_stars_repo_path",
    "max_stars_repo_licenses",
    "max_stars_repo_head_hexsha",
    "hexsha",
    "repo_name",
    "repo",
    "path",
    "license",
    "licenses",
    "detected_licenses",
    "license_type",
    "blob_id",
)


def add_metadata_keys_argument(group) -> None:
    """The preprocessing flag ``--metadata-keys`` (an argparse group or parser)."""
    group.add_argument(
        "--metadata-keys",
        nargs="*",
        default=list(DEFAULT_METADATA_KEYS),
        help="input fields recorded per document in OUTPUT.meta.jsonl, the source metadata that attribution "
        "search prints (absent fields are left out; no names: no sidecar). Default: The Stack's "
        f"{' '.join(DEFAULT_METADATA_KEYS)}",
    )


def jsonl_path(prefix: str | os.PathLike) -> str:
    """Path of the metadata lines of dataset ``prefix``."""
    return f"{strip_suffix(prefix)}.meta.jsonl"


def offsets_path(prefix: str | os.PathLike) -> str:
    """Path of the metadata line offsets of dataset ``prefix``."""
    return f"{strip_suffix(prefix)}.meta.offsets"


def metadata_line(record: dict, keys) -> bytes:
    """The sidecar line (no newline) of one input record: its ``keys`` that are present and not null."""
    kept = {key: record[key] for key in keys if record.get(key) is not None}
    # ensure_ascii: a lone surrogate in a path is escaped instead of failing the encode.
    return json.dumps(kept, separators=(",", ":"), default=str).encode("ascii")


def remove_sidecar(prefix: str | os.PathLike) -> None:
    """Delete the sidecar of ``prefix`` if any (offsets first: a lone JSONL is never read)."""
    for path in (offsets_path(prefix), jsonl_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


class MetadataWriter:
    """Writes a sidecar under temporary names; ``finalize`` renames it into place (offsets last)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = strip_suffix(prefix)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_jsonl, self._tmp_offsets = jsonl_path(prefix) + suffix, offsets_path(prefix) + suffix
        self._jsonl = open(self._tmp_jsonl, "wb", buffering=8 << 20)  # noqa: SIM115
        self._offsets = array("q", [0])

    @property
    def num_documents(self) -> int:
        return len(self._offsets) - 1

    def add(self, lines) -> None:
        """Append one line (bytes, no newline) per document."""
        end = self._offsets[-1]
        for line in lines:
            self._jsonl.write(line + b"\n")
            end += len(line) + 1
            self._offsets.append(end)

    def append_sidecar(self, prefix: str | os.PathLike, num_documents: int) -> None:
        """Append another dataset's sidecar (merge); ``{}`` lines when it has none."""
        reader = SourceMetadata.open(prefix, num_documents)
        if reader is None:
            self.add([b"{}"] * num_documents)
            return
        self._jsonl.flush()
        with open(jsonl_path(prefix), "rb") as source:
            shutil.copyfileobj(source, self._jsonl, 8 << 20)
        base = self._offsets[-1]
        self._offsets.frombytes((reader.offsets[1:].astype(np.int64) + base).tobytes())

    def finalize(self) -> None:
        try:
            self._jsonl.close()
            with open(self._tmp_offsets, "wb") as stream:
                stream.write(_HEADER.pack(METADATA_MAGIC, METADATA_VERSION, self.num_documents))
                stream.write(np.frombuffer(self._offsets, dtype=np.int64).astype("<u8").tobytes())
            os.replace(self._tmp_jsonl, jsonl_path(self.prefix))
            os.replace(self._tmp_offsets, offsets_path(self.prefix))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._jsonl.closed:
            # Closing flushes the buffer, which fails again on a full disk: the file is closed anyway.
            with contextlib.suppress(OSError):
                self._jsonl.close()
        for path in (self._tmp_jsonl, self._tmp_offsets):
            if os.path.exists(path):
                os.remove(path)


class DocumentWriter:
    """An ``IndexedDatasetWriter`` that also writes the metadata sidecar (when ``metadata_keys``).

    ``finalize`` removes any old sidecar of the prefix, writes the dataset, then the sidecar: a crash in
    between leaves a complete dataset without metadata, never metadata describing other documents.
    """

    def __init__(self, prefix: str | os.PathLike, dtype, metadata_keys=()):
        self.dataset = IndexedDatasetWriter(prefix, dtype)
        self.metadata = MetadataWriter(prefix) if metadata_keys else None

    @property
    def path_prefix(self) -> str:
        return self.dataset.path_prefix

    def add_documents(self, flat_tokens, lengths, metadata_lines=None) -> None:
        """``IndexedDatasetWriter.add_documents`` plus one metadata line per document."""
        self.dataset.add_documents(flat_tokens, lengths)
        if self.metadata is not None:
            if metadata_lines is None or len(metadata_lines) != len(lengths):
                raise ValueError(f"{len(lengths)} documents but {len(metadata_lines or [])} metadata lines")
            self.metadata.add(metadata_lines)

    def finalize(self) -> None:
        try:
            remove_sidecar(self.dataset.path_prefix)
            self.dataset.finalize()
        except BaseException:
            self.abort()
            raise
        if self.metadata is not None:
            self.metadata.finalize()

    def abort(self) -> None:
        self.dataset.abort()
        if self.metadata is not None:
            self.metadata.abort()


@contextlib.contextmanager
def merged_metadata(datasets, output_prefix: str | os.PathLike):
    """Around a merge of ``datasets`` (``IndexedDataset``s, in order) into ``output_prefix``: the
    concatenated sidecar is written under a temporary name on entry and renamed into place on a
    successful exit, after the merged dataset (``{}`` lines for inputs without one; no sidecar when no
    input has one). The output's old sidecar is removed first: it never sits beside other data."""
    remove_sidecar(output_prefix)
    if all(SourceMetadata.open(d.path_prefix, d.num_documents) is None for d in datasets):
        yield
        return
    writer = MetadataWriter(output_prefix)
    try:
        for dataset in datasets:
            writer.append_sidecar(dataset.path_prefix, dataset.num_documents)
        yield
    except BaseException:
        writer.abort()
        raise
    writer.finalize()


class SourceMetadata:
    """Read-only sidecar of one dataset: ``len(m)`` documents, ``m[d]`` the dict of document ``d``."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = strip_suffix(prefix)
        path = offsets_path(self.prefix)
        size = os.path.getsize(path)
        with open(path, "rb") as stream:
            raw = stream.read(_HEADER.size)
        if len(raw) < _HEADER.size or raw[:8] != METADATA_MAGIC:
            raise ValueError(f"{path}: not a metadata offsets file (magic {raw[:8]!r})")
        _, version, count = _HEADER.unpack(raw)
        if version != METADATA_VERSION or size != _HEADER.size + 8 * (count + 1):
            raise ValueError(f"{path}: version {version} or size {size} does not fit {count} documents")
        self.offsets = np.memmap(path, dtype="<u8", mode="r", offset=_HEADER.size, shape=(count + 1,))
        jsonl_size = os.path.getsize(jsonl_path(self.prefix))
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != jsonl_size:
            raise ValueError(
                f"{path}: offsets end at {int(self.offsets[-1])} but {jsonl_path(self.prefix)} has "
                f"{jsonl_size} bytes (the sidecar is truncated or mismatched)"
            )
        self._lines = np.memmap(jsonl_path(self.prefix), mode="r") if jsonl_size else b""

    @classmethod
    def open(cls, prefix: str | os.PathLike, num_documents: int | None = None) -> SourceMetadata | None:
        """The sidecar of ``prefix``, or None when it has none; ``ValueError`` if it does not have
        ``num_documents`` entries (a sidecar left from another dataset)."""
        if not (os.path.isfile(offsets_path(prefix)) and os.path.isfile(jsonl_path(prefix))):
            return None
        metadata = cls(prefix)
        if num_documents is not None and len(metadata) != num_documents:
            raise ValueError(
                f"{offsets_path(prefix)} describes {len(metadata)} documents but the dataset has "
                f"{num_documents}: the sidecar belongs to another dataset (delete it or re-run preprocessing)"
            )
        return metadata

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, document: int) -> dict:
        if not 0 <= document < len(self):
            raise IndexError(f"document {document} out of range for {len(self)} in {self.prefix}")
        start, end = int(self.offsets[document]), int(self.offsets[document + 1])
        return json.loads(bytes(self._lines[start:end]))
