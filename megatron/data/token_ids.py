"""Token ids checked against the tokenizer's vocabulary before they reach FIM or the embedding.

A ``.bin`` tokenized with another tokenizer holds ids the model's tokenizer does not have. Unchecked, an
id past the embedding is a raw ``IndexError`` on a CPU and a device-side assert that kills the job on a
GPU; an id inside the padding of the model's vocabulary (``--make-vocab-size-divisible-by``) trains a
row no text ever produces without any error at all. So the bound is the tokenizer's own vocabulary size,
not the padded one: every id a tokenizer writes is below it.

Two checks, because the ``.idx`` format (Megatron-LM's) records no maximum id:

- When a dataset is opened, its ``.bin`` is scanned once (a vectorised max, block by block) if it is
  small enough (:data:`SCAN_BUDGET_BYTES` of unscanned data per run); the maximum is cached in a small
  JSON file next to the index cache, named by a hash of the ``.idx``, so every later run and every rank
  reuses it for free. A bad id fails the run before training starts (exit status 2).
- Every sample is checked as it is read (``GPTDataset.__getitem__``, in the data workers): one max over
  ``seq_length + 1`` ints, well under a percent of reading the sample. This covers datasets too large to
  scan at start-up (a multi-terabyte ``.bin`` read on every rank would take longer than many jobs).

Both errors name the dataset prefix, the offending id, the document and the position in it, and the
tokenizer (type, file and vocabulary size).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import NamedTuple

import numpy as np

from megatron.log import get_logger

logger = get_logger(__name__)

SCAN_BUDGET_BYTES = 2 << 30  # .bin bytes scanned at start-up per run (cached maxima are free)
_SCAN_BLOCK_ELEMENTS = 1 << 24
_CACHE_FORMAT = 1
_FULL_HASH_BYTES = 64 << 20
_PARTIAL_HASH_BYTES = 8 << 20


class TokenIdError(ValueError):
    """A dataset holds a token id outside the tokenizer's vocabulary."""


class TokenBound(NamedTuple):
    """Token ids must be below ``limit`` (the tokenizer's own vocabulary size); ``tokenizer`` names it."""

    limit: int
    tokenizer: str

    @classmethod
    def of(cls, tokenizer) -> TokenBound:
        """The bound of a ``megatron.data.tokenizer.Tokenizer`` (its unpadded vocabulary)."""
        return cls(int(tokenizer.vocab_size), str(getattr(tokenizer, "name", type(tokenizer).__name__)))


def first_out_of_range(tokens: np.ndarray, limit: int) -> int | None:
    """Position of the first id of ``tokens`` (a 1-D integer array) outside ``[0, limit)``, or None.

    One max over an unsigned view: a negative id of a signed dtype reads as a huge unsigned value, so
    both ends are checked in one pass.
    """
    if tokens.size == 0:
        return None
    unsigned = tokens.view(np.dtype(f"u{tokens.dtype.itemsize}"))
    if int(unsigned.max()) < limit:
        return None
    return int(np.flatnonzero(unsigned >= limit)[0])


def out_of_range_message(prefix: str, token_id: int, document: int, offset: int, bound: TokenBound) -> str:
    """The error text: dataset, id, document and position, tokenizer, and what to do."""
    what = "negative token id" if token_id < 0 else "token id"
    return (
        f"dataset {prefix}: {what} {token_id} at token {offset} of document {document}, but tokenizer "
        f"{bound.tokenizer} has {bound.limit} tokens (ids 0..{bound.limit - 1}); the data was tokenized "
        "with another tokenizer: give the tokenizer it was preprocessed with (--tokenizer-type, "
        "--tokenizer-file) or preprocess it again with this one"
    )


def document_of_item(indexed, item: int) -> int:
    """The document holding item ``item`` (items and documents coincide for document-level data)."""
    return int(np.searchsorted(indexed.document_indices, item, side="right")) - 1


def locate(indexed, element: int) -> tuple[int, int]:
    """(item, offset in the item) of token ``element`` of the ``.bin`` (counted in tokens)."""
    item = int(np.searchsorted(indexed.pointers, element * indexed.dtype.itemsize, side="right")) - 1
    return item, element - int(indexed.pointers[item]) // indexed.dtype.itemsize


def scan(indexed, limit: int) -> tuple[int, int | None]:
    """(maximum id as an unsigned value, first token position out of range or None) of a whole ``.bin``."""
    data = getattr(indexed, "_data", None)
    if data is None or len(data) == 0:
        return 0, None
    unsigned_dtype = np.dtype(f"u{data.dtype.itemsize}")
    maximum, first_bad = 0, None
    for start in range(0, len(data), _SCAN_BLOCK_ELEMENTS):
        block = data[start : start + _SCAN_BLOCK_ELEMENTS].view(unsigned_dtype)
        block_max = int(block.max())
        maximum = max(maximum, block_max)
        if block_max >= limit and first_bad is None:
            first_bad = start + int(np.flatnonzero(block >= limit)[0])
            break
    return maximum, first_bad


def _cache_path(indexed, cache_dir: str) -> str:
    """The cached maximum's file, named by the data's identity: the ``.idx`` bytes (the item sizes of a
    tokenization), all of them up to 64 MiB, else the first and last 8 MiB with both file sizes, so
    that a multi-gigabyte index is not hashed by every rank of every run."""
    idx_path = f"{indexed.path_prefix}.idx"
    size = os.path.getsize(idx_path)
    digest = hashlib.blake2b(str((size, len(indexed._data))).encode(), digest_size=16)
    with open(idx_path, "rb") as stream:
        if size <= _FULL_HASH_BYTES:
            digest.update(stream.read())
        else:
            digest.update(stream.read(_PARTIAL_HASH_BYTES))
            stream.seek(size - _PARTIAL_HASH_BYTES)
            digest.update(stream.read(_PARTIAL_HASH_BYTES))
    name = os.path.basename(os.fspath(indexed.path_prefix))
    return os.path.join(cache_dir, f"{name}_{digest.hexdigest()}_max_token_id.json")


def _read_cached_max(path: str) -> int | None:
    try:
        with open(path) as stream:
            record = json.load(stream)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _CACHE_FORMAT:
        return None
    value = record.get("max_token_id")
    return value if isinstance(value, int) and value >= 0 else None


def _write_cached_max(path: str, maximum: int) -> None:
    """Best effort, atomic (a reader never sees half a file), mode 0666 & ~umask."""
    tmp_path = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp_path, "w") as stream:
            json.dump({"format": _CACHE_FORMAT, "max_token_id": maximum}, stream)
        os.replace(tmp_path, path)
    except OSError as error:
        logger.debug("could not cache the maximum token id in %s: %s", path, error)
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)


@contextlib.contextmanager
def _one_scanner(cache_path: str | None):
    """An advisory lock beside the cache file while scanning; a no-op where locks do not work."""
    if cache_path is None:
        yield
        return
    try:
        import fcntl

        directory, name = os.path.split(cache_path)
        os.makedirs(directory, exist_ok=True)
        stream = open(os.path.join(directory, f".{name}.lock"), "a")  # noqa: SIM115 (held until the end)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        stream.close()


class StartupCheck:
    """Checks each dataset opened by one run, scanning at most ``budget_bytes`` of uncached data."""

    def __init__(self, bound: TokenBound, cache_dir: str | None, budget_bytes: int | None = None):
        self.bound = bound
        self.cache_dir = cache_dir
        self.budget_bytes = SCAN_BUDGET_BYTES if budget_bytes is None else budget_bytes
        self.unscanned: list[str] = []

    def check(self, indexed) -> None:
        """TokenIdError when ``indexed`` holds an id outside the vocabulary (from the cache or a scan)."""
        cache_dir = self.cache_dir or os.path.dirname(os.path.abspath(os.fspath(indexed.path_prefix)))
        try:
            path = _cache_path(indexed, cache_dir)
        except OSError:
            path = None
        maximum = _read_cached_max(path) if path else None
        if maximum is not None and maximum < self.bound.limit:
            return
        num_bytes = len(indexed._data) * indexed.dtype.itemsize
        if maximum is None and num_bytes > self.budget_bytes:
            self.unscanned.append(os.fspath(indexed.path_prefix))
            return
        if maximum is None:
            self.budget_bytes -= num_bytes
        with _one_scanner(path):  # one process per filesystem scans; the others read its result
            maximum = _read_cached_max(path) if path else None
            if maximum is not None and maximum < self.bound.limit:
                return
            maximum, first_bad = scan(indexed, self.bound.limit)
            if first_bad is None:
                if path:
                    _write_cached_max(path, maximum)
                return
        item, offset = locate(indexed, first_bad)
        token_id = int(indexed._data[first_bad])
        prefix = os.fspath(indexed.path_prefix)
        document = document_of_item(indexed, item)
        raise TokenIdError(out_of_range_message(prefix, token_id, document, offset, self.bound))

    def report(self) -> None:
        """One line naming the datasets left to the per-sample check (too large to scan at start-up)."""
        if self.unscanned:
            logger.info(
                f"token ids of {len(self.unscanned)} dataset(s) too large to scan at start-up are checked "
                f"as each sample is read: {', '.join(self.unscanned[:3])}"
                + (" ..." if len(self.unscanned) > 3 else "")
            )
