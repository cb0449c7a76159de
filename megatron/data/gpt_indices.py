"""The GPT dataset's index arrays built from item sizes: epochs, doc_idx, sample_idx, shuffle_idx.

Pure functions of (sizes, document range, num_samples, seq_length, seed), no files: the layout, the
randomness and the speed tricks are described in ``megatron.data.gpt_dataset`` (which caches them).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import NamedTuple

import numpy as np

from megatron.log import get_logger

logger = get_logger(__name__)

LAST_EPOCH_FRACTION = 0.80  # Megatron-LM's threshold for shuffling the last epoch separately
_SHUFFLE_BUCKET_ELEMENTS = 1 << 17  # target bucket size of uniform_shuffle (fits in L2 cache)
_SHUFFLE_CHUNK_ELEMENTS = 1 << 20  # input chunk of the bucket-assignment pass
_SAMPLE_BLOCK_DOCS = 1 << 20  # doc_idx entries per block of the sample_idx build
# Index entries (doc_idx + samples) from which a build is announced and timed phase by phase on the main
# rank (about a second and up, at 20-60 M entries/s): the small case stays silent and pays nothing.
PROGRESS_MIN_ENTRIES = 32 << 20


class IndexArrays(NamedTuple):
    """The three arrays of a GPT dataset (see ``megatron.data.gpt_dataset``)."""

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


class _Phases:
    """Log lines "> WHAT: PHASE (elapsed)" for a long build; silent when not ``enabled``."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled, self.started = what, enabled, time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.enabled:
            logger.info(f"> {self.what}: {phase} ({time.perf_counter() - self.started:.1f} s)")


def build_indices(
    sizes: np.ndarray,
    document_range: tuple[int, int],
    num_samples: int,
    seq_length: int,
    seed: int,
    phases: _Phases | None = None,
) -> IndexArrays:
    """Build doc_idx, sample_idx and shuffle_idx from the item sizes (no files involved)."""
    phases = phases or _Phases("", False)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    plan = plan_indices(sizes, document_range, num_samples, seq_length)
    phases(
        f"building for {document_range[1] - document_range[0]:,} documents x {plan.num_epochs} epoch(s), "
        f"{plan.num_samples_total:,} samples of {seq_length} tokens"
    )
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
        phases("document and sample indices built")
        rng = np.random.default_rng([seed, 1])
        shuffle_idx = build_shuffle_idx(plan.num_samples_first, plan.num_samples_total, rng)
        phases("shuffle index built")
    return IndexArrays(doc_idx, sample_idx, shuffle_idx)
