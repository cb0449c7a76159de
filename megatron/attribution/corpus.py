"""The token stream of the indexed datasets: memory-mapped tokens, document boundaries, metadata, and a
fingerprint that tells a search index whether the files changed since it was built."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron.data.indexed import IndexedDataset, data_file_path, index_file_path, strip_suffix
from megatron.data.metadata import SourceMetadata

_SAMPLE_BYTES = 1 << 20


def _sampled_digest(path: str) -> str:
    """SHA-256 of the first and last MiB of a file: cheap at any size, and any rewrite of a dataset
    (other documents, other tokenizer) changes its index's tail or its data's ends."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as stream:
        digest.update(stream.read(_SAMPLE_BYTES))
        if size > _SAMPLE_BYTES:
            stream.seek(max(_SAMPLE_BYTES, size - _SAMPLE_BYTES))
            digest.update(stream.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def fingerprint(prefix: str) -> dict:
    """Sizes, modification times and sampled digests of a dataset's ``.bin`` and ``.idx``."""
    record = {"prefix": os.path.abspath(prefix)}
    for name, path in (("bin", data_file_path(prefix)), ("idx", index_file_path(prefix))):
        status = os.stat(path)
        record[f"{name}_bytes"] = status.st_size
        record[f"{name}_mtime_ns"] = status.st_mtime_ns
        record[f"{name}_sha256_ends"] = _sampled_digest(path)
    return record


def stale_reason(recorded: dict) -> str | None:
    """Why the dataset ``recorded`` (a ``fingerprint``) no longer matches its files, or None."""
    prefix = recorded["prefix"]
    if not (os.path.isfile(data_file_path(prefix)) and os.path.isfile(index_file_path(prefix))):
        return f"dataset {prefix} is missing (no .bin/.idx)"
    for name, path in (("bin", data_file_path(prefix)), ("idx", index_file_path(prefix))):
        size = os.path.getsize(path)
        if size != recorded[f"{name}_bytes"]:
            return f"{path} has {size} bytes, {recorded[f'{name}_bytes']} when the index was built"
        if _sampled_digest(path) != recorded[f"{name}_sha256_ends"]:
            return f"{path} changed since the index was built (same size, other content)"
    return None


class DatasetStream:
    """One dataset as a flat token array with document start offsets (``doc_starts[d]`` is the first
    token of document ``d``; ``doc_starts[-1]`` the number of tokens) and its source metadata."""

    def __init__(self, prefix: str):
        self.prefix = strip_suffix(prefix)
        dataset = IndexedDataset(self.prefix)
        self.dtype = dataset.dtype
        item_starts = np.empty(len(dataset.sizes) + 1, dtype=np.int64)
        item_starts[:-1] = dataset.pointers // dataset.dtype.itemsize
        item_starts[-1] = int(dataset.sizes.sum(dtype=np.int64))
        self.doc_starts = item_starts[np.asarray(dataset.document_indices)]
        self.num_tokens = int(item_starts[-1])
        self.num_documents = dataset.num_documents
        if self.num_tokens:
            self.tokens = np.memmap(data_file_path(self.prefix), dtype=self.dtype, mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)
        self.metadata = SourceMetadata.open(self.prefix, self.num_documents)

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """Document id of each token position (empty documents never contain a position)."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1

    def describe(self, document: int) -> dict | None:
        """The source metadata of ``document``, or None when the dataset has no sidecar."""
        return None if self.metadata is None else self.metadata[document]
