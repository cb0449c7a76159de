"""GPT training samples over an indexed dataset: doc, sample and shuffle indices, built fast and cached.

The indices follow ``docs/data-format.md`` (Megatron-LM's GPT dataset):

- ``num_epochs`` is the smallest e with ``(e * tokens_per_epoch - 1) // seq_length >= num_samples``.
- ``doc_idx`` is the document range tiled ``num_epochs`` times and shuffled. When the last epoch would
  yield fewer than 80% of an epoch's samples it is shuffled on its own and appended, so the first
  ``num_samples`` samples still cover the earlier epochs evenly.
- ``sample_idx[i] = (position in doc_idx, token offset)`` of token ``i * seq_length`` of the
  concatenated ``doc_idx`` stream (row 0 is ``(0, 0)``); sample ``i`` spans rows ``i`` and ``i + 1``
  inclusive, ``seq_length + 1`` tokens, so consecutive samples overlap by one token. int64 throughout.
- ``shuffle_idx`` permutes the samples (the separate last epoch's samples on their own, after the rest).

Documents are the items of the indexed dataset (document-level preprocessing writes one item per
document), exactly as Megatron-LM's GPT dataset uses ``sizes``.

Randomness: two NumPy ``Generator`` streams seeded from ``SeedSequence([seed, 0])`` (doc_idx) and
``SeedSequence([seed, 1])`` (shuffle_idx). Permutations use :func:`uniform_shuffle`, a blocked
(Rao-Sandelius) shuffle that is exactly uniform and several times faster than a whole-array shuffle
because every pass stays in cache. NumPy does not promise ``Generator`` streams across releases; the
test suite pins a few values so a change is noticed, and an existing cache is always reused as is.

Cache: the three arrays are ``.npy`` files in ``cache_dir`` (default: the data's directory), named by a
hash of every input that affects them: the item sizes in the document range (the data's identity as
far as the indices are concerned, so a byte-identical copy on another node maps to the same name and
changed data never reuses a stale cache), the range, the number of items, ``num_samples``,
``seq_length``, ``seed`` and :data:`INDEX_FORMAT_VERSION`. Each file is written to a unique temporary
name and published with ``os.replace``; builds are deterministic, so concurrent builders (on one node,
or on nodes without a shared filesystem) publish identical content. An advisory lock lets one process
per filesystem build while others wait. A reader validates dtypes, shapes and boundary rows before
trusting a cache and rebuilds otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

from megatron.log import get_logger

logger = get_logger(__name__)

INDEX_FORMAT_VERSION = 1
LAST_EPOCH_FRACTION = 0.80  # Megatron-LM's threshold for shuffling the last epoch separately
_SHUFFLE_BUCKET_ELEMENTS = 1 << 17  # target bucket size of uniform_shuffle (fits in L2 cache)
_SHUFFLE_CHUNK_ELEMENTS = 1 << 20  # input chunk of the bucket-assignment pass
_SAMPLE_BLOCK_DOCS = 1 << 20  # doc_idx entries per block of the sample_idx build


class IndexArrays(NamedTuple):
    """The three arrays of a GPT dataset (see the module docstring)."""

    doc_idx: np.ndarray
    sample_idx: np.ndarray
    shuffle_idx: np.ndarray


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest e >= 1 with ``(e * tokens_per_epoch - 1) // seq_length >= num_samples``."""
    assert tokens_per_epoch > 0 and seq_length > 0 and num_samples >= 0
    # e * tokens_per_epoch - 1 >= num_samples * seq_length  <=>  e >= (num_samples * seq_length + 1) / tpe
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def separate_last_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int, num_epochs: int) -> bool:
    """Whether the last epoch yields under 80% of an epoch's samples (then it is shuffled on its own)."""
    if num_epochs == 1:
        return False
    from_earlier_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last_epoch_samples = num_samples - from_earlier_epochs
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    return last_epoch_samples < int(LAST_EPOCH_FRACTION * samples_per_epoch)


def _num_buckets(num_values: int) -> int:
    num_buckets = 1
    while num_buckets * _SHUFFLE_BUCKET_ELEMENTS < num_values:
        num_buckets *= 2
    return num_buckets


def _shuffled_buckets(num_values: int, make_chunk, rng: np.random.Generator):
    """Yield, in order, the pieces of a uniform shuffle of the values ``make_chunk(a, b)`` gives.

    ``make_chunk(a, b)`` returns (a new array or a view of) values ``a:b`` of the input; a yielded
    piece is only valid until the next one is requested (its buffer is reused). Rao-Sandelius:
    every value independently draws one of K buckets, buckets are filled in input order and each is
    shuffled uniformly; the concatenated buckets are a uniformly random permutation, because relabelling
    the inputs leaves the procedure's distribution unchanged (i.i.d. bucket draws, uniform shuffles), so
    the distribution is invariant under every permutation. Both passes touch memory sequentially or
    within one cache-sized bucket, unlike one Fisher-Yates pass over hundreds of megabytes.
    """
    num_buckets = _num_buckets(num_values)
    if num_buckets == 1:
        values = np.array(make_chunk(0, num_values))
        rng.shuffle(values)
        yield values
        return
    key_dtype = np.uint16 if num_buckets <= 1 << 16 else np.uint32
    pieces, bounds = [], []
    for start in range(0, num_values, _SHUFFLE_CHUNK_ELEMENTS):
        part = make_chunk(start, min(num_values, start + _SHUFFLE_CHUNK_ELEMENTS))
        keys = rng.integers(0, num_buckets, size=len(part), dtype=key_dtype)
        # a stable sort is a deterministic function of the keys on every CPU (a radix sort here)
        pieces.append(part[np.argsort(keys, kind="stable")])
        bounds.append(np.concatenate(([0], np.cumsum(np.bincount(keys, minlength=num_buckets)))))
    bucket_sizes = np.sum([b[1:] - b[:-1] for b in bounds], axis=0)
    buffer = np.empty(int(bucket_sizes.max()), dtype=pieces[0].dtype)  # reused: fresh pages are slow
    for bucket in range(num_buckets):
        values = buffer[: bucket_sizes[bucket]]
        np.concatenate([p[b[bucket] : b[bucket + 1]] for p, b in zip(pieces, bounds)], out=values)
        rng.shuffle(values)
        yield values


def uniform_shuffle(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random permutation of ``values`` (a new array); see :func:`_shuffled_buckets`."""
    values = np.asarray(values)
    out = np.empty_like(values)
    position = 0
    for bucket in _shuffled_buckets(len(values), lambda a, b: values[a:b], rng):
        out[position : position + len(bucket)] = bucket
        position += len(bucket)
    return out


def _epoch_groups(num_epochs: int, separate_last: bool) -> list[int]:
    """Epoch counts shuffled together: all of them, or all but the last and then the last alone."""
    return [num_epochs - 1, 1] if separate_last and num_epochs > 1 else [num_epochs]


def _tiled(base: np.ndarray):
    """``make_chunk`` over ``base`` repeated end to end, without materialising the repetition."""

    def make_chunk(a: int, b: int) -> np.ndarray:
        pieces = []
        while a < b:
            start = a % len(base)
            stop = min(len(base), start + (b - a))
            pieces.append(base[start:stop])
            a += stop - start
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return make_chunk


def build_doc_idx(
    document_range: tuple[int, int], num_epochs: int, separate_last: bool, rng: np.random.Generator
) -> np.ndarray:
    """Document ids of the range tiled ``num_epochs`` times and shuffled (last epoch apart if asked)."""
    start, end = document_range
    documents = np.arange(start, end, dtype=np.int32 if end <= np.iinfo(np.int32).max else np.int64)
    groups = []
    for epochs in _epoch_groups(num_epochs, separate_last):
        groups.extend(
            bucket.copy() for bucket in _shuffled_buckets(epochs * len(documents), _tiled(documents), rng)
        )
    return np.concatenate(groups)


class _SampleLocator:
    """Finds sample starts (token ``i * seq_length``) while doc_idx lengths are fed block by block."""

    def __init__(self, seq_length: int, num_samples_total: int):
        self.seq_length = seq_length
        self.sample_idx = np.zeros((num_samples_total + 1, 2), dtype=np.int64)  # row 0 stays (0, 0)
        self.tokens_before = 0  # tokens of the doc_idx entries fed so far
        self.docs_before = 0
        self.next_sample = 1
        self._ends = np.empty(0, dtype=np.int64)

    def feed(self, lengths: np.ndarray) -> None:
        """Locate the samples starting in the next ``len(lengths)`` doc_idx entries."""
        if len(lengths) == 0:
            return
        if len(self._ends) < len(lengths):
            self._ends = np.empty(len(lengths), dtype=np.int64)
        ends = self._ends[: len(lengths)]  # reused: a fresh array per block costs page faults
        np.copyto(ends, lengths)
        np.cumsum(ends, out=ends)
        ends += self.tokens_before
        total = len(self.sample_idx) - 1
        last_sample = min(total, (int(ends[-1]) - 1) // self.seq_length)
        if last_sample >= self.next_sample:
            starts = np.arange(self.next_sample, last_sample + 1, dtype=np.int64) * self.seq_length
            local = np.searchsorted(ends, starts, side="right")
            rows = self.sample_idx[self.next_sample : last_sample + 1]
            rows[:, 0] = local + self.docs_before
            rows[:, 1] = starts - (ends[local] - lengths[local])
            self.next_sample = last_sample + 1
        self.tokens_before = int(ends[-1])
        self.docs_before += len(lengths)

    def result(self) -> np.ndarray:
        assert self.next_sample == len(self.sample_idx), "doc_idx holds fewer tokens than the samples need"
        return self.sample_idx


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples_total: int
) -> np.ndarray:
    """(num_samples_total + 1, 2) int64 rows (doc_idx position, offset) of token ``i * seq_length``.

    Vectorised per block of doc_idx: the cumulative token count locates every sample start with one
    ``searchsorted``. Equivalent to Megatron-LM's C++ loop (a sample ending on a document's last token
    records that token's position, not offset 0 of the next document).
    """
    locator = _SampleLocator(seq_length, num_samples_total)
    for block_start in range(0, len(doc_idx), _SAMPLE_BLOCK_DOCS):
        if locator.next_sample > num_samples_total:
            break
        locator.feed(sizes[doc_idx[block_start : block_start + _SAMPLE_BLOCK_DOCS]])
    return locator.result()


def build_doc_and_sample_idx(
    sizes: np.ndarray,
    document_range: tuple[int, int],
    num_epochs: int,
    separate_last: bool,
    seq_length: int,
    num_samples_total: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """doc_idx and sample_idx in one pass, equal to build_doc_idx then build_sample_idx.

    Each document id travels packed with its size in one uint64, so the sample search reads sizes from
    the cache-resident bucket instead of gathering them at random from the whole index.
    """
    start, end = document_range
    if end > 1 << 32 or int(sizes[start:end].max()) >= 1 << 32:  # ids or sizes do not fit the packing
        doc_idx = build_doc_idx(document_range, num_epochs, separate_last, rng)
        return doc_idx, build_sample_idx(sizes, doc_idx, seq_length, num_samples_total)
    dtype = np.int32 if end <= np.iinfo(np.int32).max else np.int64
    doc_idx = np.empty((end - start) * num_epochs, dtype=dtype)
    packed = np.empty((end - start, 2), dtype=np.uint32)  # one uint64 per document: (id, size) halves
    id_half = 0 if sys.byteorder == "little" else 1  # the low 32 bits of the uint64
    packed[:, id_half] = np.arange(start, end, dtype=np.uint32)
    packed[:, 1 - id_half] = sizes[start:end]
    packed = packed.view(np.uint64).reshape(-1)
    doc_ids = doc_idx.view(np.uint32) if dtype == np.int32 else doc_idx  # same-type copy is faster
    locator = _SampleLocator(seq_length, num_samples_total)
    position = 0
    for epochs in _epoch_groups(num_epochs, separate_last):
        for bucket in _shuffled_buckets(epochs * (end - start), _tiled(packed), rng):
            halves = bucket.view(np.uint32).reshape(-1, 2)
            doc_ids[position : position + len(bucket)] = halves[:, id_half]
            locator.feed(halves[:, 1 - id_half])
            position += len(bucket)
    return doc_idx, locator.result()


def build_shuffle_idx(num_first: int, num_total: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(num_first) followed by one of range(num_first, num_total), int64."""
    shuffle_idx = np.empty(num_total, dtype=np.int64)
    position = 0
    for low, high in ((0, num_first), (num_first, num_total)):
        if high == low:
            continue
        for bucket in _shuffled_buckets(high - low, _tiled(np.arange(low, high, dtype=np.int64)), rng):
            shuffle_idx[position : position + len(bucket)] = bucket
            position += len(bucket)
    return shuffle_idx


class IndexPlan(NamedTuple):
    """The sizes of the index arrays, computable without building them."""

    tokens_per_epoch: int
    num_epochs: int
    separate_last_epoch: bool
    num_samples_total: int
    num_samples_first: int  # samples shuffled in the first group (all of them unless separate)
    doc_idx_length: int


def plan_indices(
    sizes: np.ndarray, document_range: tuple[int, int], num_samples: int, seq_length: int
) -> IndexPlan:
    """Epoch count and array sizes for the given inputs (``ValueError`` on unusable inputs)."""
    start, end = document_range
    if not 0 <= start < end <= len(sizes):
        raise ValueError(
            f"document range {document_range} is empty or outside the {len(sizes)} documents of the data"
        )
    if seq_length < 1 or num_samples < 0:
        raise ValueError(f"seq_length must be >= 1 and num_samples >= 0 (got {seq_length}, {num_samples})")
    tokens_per_epoch = int(sizes[start:end].sum(dtype=np.int64))
    if tokens_per_epoch < 2:
        raise ValueError(f"document range {document_range} holds {tokens_per_epoch} tokens; need at least 2")
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    separate = separate_last_epoch(tokens_per_epoch, seq_length, num_samples, num_epochs)
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate else total
    return IndexPlan(tokens_per_epoch, num_epochs, separate, total, first, num_epochs * (end - start))


@contextlib.contextmanager
def _small_pages():
    """Let NumPy skip ``madvise(MADV_HUGEPAGE)`` on its large arrays while the indices are built.

    The build touches each of its gigabyte of fresh arrays once, sequentially or in cache-sized
    buckets, so huge pages save no TLB misses, while faulting them in (zeroing, and compaction where
    the kernel defragments on madvise) measured 5x slower than small pages here. Process-wide NumPy
    setting, restored afterwards; a no-op where NumPy lacks the switch.
    """
    multiarray = getattr(np, "_core", np).multiarray
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def build_indices(
    sizes: np.ndarray, document_range: tuple[int, int], num_samples: int, seq_length: int, seed: int
) -> IndexArrays:
    """Build doc_idx, sample_idx and shuffle_idx from the item sizes (no files involved)."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    plan = plan_indices(sizes, document_range, num_samples, seq_length)
    with _small_pages():
        doc_idx, sample_idx = build_doc_and_sample_idx(
            sizes,
            document_range,
            plan.num_epochs,
            plan.separate_last_epoch,
            seq_length,
            plan.num_samples_total,
            np.random.default_rng([seed, 0]),
        )
        rng = np.random.default_rng([seed, 1])
        shuffle_idx = build_shuffle_idx(plan.num_samples_first, plan.num_samples_total, rng)
    return IndexArrays(doc_idx, sample_idx, shuffle_idx)


def cache_key(
    sizes: np.ndarray, document_range: tuple[int, int], num_samples: int, seq_length: int, seed: int
) -> str:
    """Hex digest of every input that affects the index arrays."""
    start, end = document_range
    digest = hashlib.blake2b(digest_size=16)
    header = {
        "format": INDEX_FORMAT_VERSION,
        "num_items": len(sizes),
        "document_range": [int(start), int(end)],
        "num_samples": int(num_samples),
        "seq_length": int(seq_length),
        "seed": int(seed),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(sizes[start:end], dtype="<i4").view(np.uint8))
    return digest.hexdigest()


def cache_paths(cache_dir: str, data_name: str, split_name: str, key: str) -> dict[str, str]:
    """The three ``.npy`` paths of one cache entry."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{data_name}_{split_name}")
    return {
        part: os.path.join(cache_dir, f"{readable}_{key}_{part}.npy")
        for part in ("doc_idx", "sample_idx", "shuffle_idx")
    }


def _load_cached(paths: dict[str, str], plan: IndexPlan) -> IndexArrays | None:
    """The cached arrays if all three exist and look right for ``plan``, else None."""
    try:
        arrays = IndexArrays(*(np.load(paths[part], mmap_mode="r") for part in IndexArrays._fields))
    except (OSError, ValueError, EOFError):
        return None
    doc_idx, sample_idx, shuffle_idx = arrays
    valid = (
        doc_idx.dtype.kind == "i"
        and doc_idx.shape == (plan.doc_idx_length,)
        and sample_idx.dtype == np.int64
        and sample_idx.shape == (plan.num_samples_total + 1, 2)
        and shuffle_idx.dtype == np.int64
        and shuffle_idx.shape == (plan.num_samples_total,)
        and sample_idx[0].tolist() == [0, 0]
        and 0 <= sample_idx[-1, 0] < plan.doc_idx_length
        and (plan.num_samples_total == 0 or 0 <= shuffle_idx[-1] < plan.num_samples_total)
    )
    if not valid:
        logger.warning("ignoring an index cache that does not match its inputs: %s", paths["doc_idx"])
        return None
    return arrays


def _publish(path: str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically: a unique temporary file, fsync, then os.replace."""
    directory = os.path.dirname(path) or "."
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            np.save(stream, array, allow_pickle=False)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise


@contextlib.contextmanager
def _build_lock(lock_path: str):
    """Advisory exclusive lock so one process per filesystem builds; a no-op where locks fail."""
    try:
        import fcntl

        stream = open(lock_path, "a")  # noqa: SIM115 (held for the duration of the with block)
    except (ImportError, OSError):
        yield
        return
    try:
        # a filesystem without locks: every process builds; publishing stays atomic
        with contextlib.suppress(OSError):
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        stream.close()


def load_or_build_indices(
    sizes: np.ndarray,
    document_range: tuple[int, int],
    num_samples: int,
    seq_length: int,
    seed: int,
    *,
    cache_dir: str | None,
    data_name: str = "data",
    split_name: str = "train",
) -> IndexArrays:
    """The index arrays from the cache in ``cache_dir`` if valid, else built (and cached if writable).

    ``cache_dir=None`` builds in memory without caching.
    """
    plan = plan_indices(sizes, document_range, num_samples, seq_length)
    if cache_dir is None:
        return build_indices(sizes, document_range, num_samples, seq_length, seed)
    key = cache_key(sizes, document_range, num_samples, seq_length, seed)
    paths = cache_paths(cache_dir, data_name, split_name, key)
    cached = _load_cached(paths, plan)
    if cached is not None:
        return cached
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = _build_lock(os.path.join(cache_dir, f".{key}.lock"))
    except OSError as error:
        logger.warning("index cache directory %s is not usable (%s); building in memory", cache_dir, error)
        return build_indices(sizes, document_range, num_samples, seq_length, seed)
    with lock:
        cached = _load_cached(paths, plan)  # another process may have built it while we waited
        if cached is not None:
            return cached
        started = time.perf_counter()
        arrays = build_indices(sizes, document_range, num_samples, seq_length, seed)
        logger.debug("built %s indices in %.2f s", split_name, time.perf_counter() - started)
        try:
            for part in IndexArrays._fields:
                _publish(paths[part], getattr(arrays, part))
        except OSError as error:
            logger.warning(
                "could not write the index cache in %s (%s); using it from memory", cache_dir, error
            )
    return arrays


class GPTDataset:
    """Fixed-length GPT samples (``seq_length + 1`` tokens, int64) over a document range.

    ``len(ds)`` is the number of samples the indices hold (at least ``num_samples``; Megatron-LM's
    convention). ``ds[i]`` reads the tokens of sample ``shuffle_idx[i]`` across document boundaries.
    """

    def __init__(
        self,
        indexed,
        *,
        name: str,
        document_range: tuple[int, int],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | None = None,
    ):
        self.indexed = indexed
        self.name = name
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        prefix = os.fspath(indexed.path_prefix)
        if cache_dir is None:
            cache_dir = os.path.dirname(os.path.abspath(prefix))
        self.cache_dir = cache_dir
        arrays = load_or_build_indices(
            indexed.sizes,
            self.document_range,
            self.num_samples,
            self.seq_length,
            self.seed,
            cache_dir=cache_dir,
            data_name=os.path.basename(prefix),
            split_name=name,
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = arrays

    def __len__(self) -> int:
        return len(self.sample_idx) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        num = len(self)
        index = int(index)
        if index < 0:
            index += num
        if not 0 <= index < num:
            raise IndexError(f"sample {index} out of range for {num} samples of {self.name}")
        sample = int(self.shuffle_idx[index])
        first_doc, first_offset = (int(v) for v in self.sample_idx[sample])
        last_doc, last_offset = (int(v) for v in self.sample_idx[sample + 1])
        get = self.indexed.get
        if first_doc == last_doc:
            tokens = get(int(self.doc_idx[first_doc]), first_offset, last_offset - first_offset + 1)
            return tokens.astype(np.int64)
        parts = [get(int(self.doc_idx[first_doc]), first_offset)]
        parts.extend(get(int(doc)) for doc in self.doc_idx[first_doc + 1 : last_doc])
        parts.append(get(int(self.doc_idx[last_doc]), 0, last_offset + 1))
        return np.concatenate(parts, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"GPTDataset(name={self.name!r}, data={self.indexed.path_prefix!r}, "
            f"documents={self.document_range}, samples={len(self)}, seq_length={self.seq_length})"
        )
