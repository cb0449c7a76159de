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
import time

import numpy as np

from megatron.data.gpt_indices import (  # noqa: F401 (re-exported: the indices' public API lives here too)
    LAST_EPOCH_FRACTION,
    PROGRESS_MIN_ENTRIES,
    IndexArrays,
    IndexPlan,
    _Phases,
    _small_pages,
    build_doc_and_sample_idx,
    build_doc_idx,
    build_indices,
    build_sample_idx,
    build_shuffle_idx,
    num_epochs_needed,
    plan_indices,
    separate_last_epoch,
    uniform_shuffle,
)
from megatron.data.token_ids import (
    TokenBound,
    TokenIdError,
    document_of_item,
    first_out_of_range,
    out_of_range_message,
)
from megatron.fileio import create_temporary
from megatron.log import get_logger

logger = get_logger(__name__)

INDEX_FORMAT_VERSION = 1


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
    fd, tmp_path = create_temporary(directory, f".tmp-{os.getpid()}-", ".npy")  # umask mode, not 0600
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
def _build_lock(lock_path: str, on_wait=lambda: None):
    """Advisory exclusive lock so one process per filesystem builds; a no-op where locks fail.

    ``on_wait()`` is called once when another process holds the lock (before waiting for it).
    """
    try:
        import fcntl

        stream = open(lock_path, "a")  # noqa: SIM115 (held for the duration of the with block)
    except (ImportError, OSError):
        yield
        return
    try:
        # a filesystem without locks: every process builds; publishing stays atomic
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            with contextlib.suppress(OSError):
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
        except OSError:
            pass
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
    what = f"indices of the {split_name} split of {data_name}"
    phases = _Phases(what, plan.doc_idx_length + plan.num_samples_total >= PROGRESS_MIN_ENTRIES)
    if cache_dir is None:
        return build_indices(sizes, document_range, num_samples, seq_length, seed, phases)
    key = cache_key(sizes, document_range, num_samples, seq_length, seed)
    paths = cache_paths(cache_dir, data_name, split_name, key)
    cached = _load_cached(paths, plan)
    if cached is not None:
        return cached
    try:
        os.makedirs(cache_dir, exist_ok=True)
        lock = _build_lock(
            os.path.join(cache_dir, f".{key}.lock"),
            lambda: phases(f"waiting for another process to build them in {cache_dir}"),
        )
    except OSError as error:
        logger.warning("index cache directory %s is not usable (%s); building in memory", cache_dir, error)
        return build_indices(sizes, document_range, num_samples, seq_length, seed, phases)
    with lock:
        cached = _load_cached(paths, plan)  # another process may have built it while we waited
        if cached is not None:
            phases("read from the cache another process wrote")
            return cached
        started = time.perf_counter()
        arrays = build_indices(sizes, document_range, num_samples, seq_length, seed, phases)
        logger.debug("built %s indices in %.2f s", split_name, time.perf_counter() - started)
        try:
            for part in IndexArrays._fields:
                _publish(paths[part], getattr(arrays, part))
            phases(f"written to the cache in {cache_dir}")
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
        token_bound: TokenBound | None = None,
    ):
        self.indexed = indexed
        self.token_bound = token_bound  # ids checked per sample when given (megatron.data.token_ids)
        self.name = name
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.num_samples = int(num_samples)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        prefix = os.fspath(indexed.path_prefix)
        if cache_dir is None:
            cache_dir = os.path.dirname(os.path.abspath(prefix))
        self.cache_dir = cache_dir
        self._check_size(indexed.sizes, prefix)
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

    def _check_size(self, sizes: np.ndarray, prefix: str) -> None:
        """ValueError naming the data when the range has under 2 tokens; a warning under one sample."""
        start, end = self.document_range
        if not 0 <= start < end <= len(sizes):
            return  # plan_indices reports it
        num_tokens = int(sizes[start:end].sum(dtype=np.int64))
        where = f"the {self.name} split of {prefix} (documents {start} to {end - 1})"
        if num_tokens < 2:
            raise ValueError(f"{where} holds {num_tokens} token(s); a sample needs at least 2")
        if num_tokens < self.seq_length + 1:
            logger.info(
                f"WARNING: {where} holds {num_tokens} tokens, fewer than one sample of --seq-length "
                f"{self.seq_length} + 1: every sample repeats them about "
                f"{(self.seq_length + 1) / num_tokens:.0f} times; use more data or a shorter --seq-length"
            )

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
            tokens = tokens.astype(np.int64)
        else:
            parts = [get(int(self.doc_idx[first_doc]), first_offset)]
            parts.extend(get(int(doc)) for doc in self.doc_idx[first_doc + 1 : last_doc])
            parts.append(get(int(self.doc_idx[last_doc]), 0, last_offset + 1))
            tokens = np.concatenate(parts, dtype=np.int64)
        if self.token_bound is not None:
            bad = first_out_of_range(tokens, self.token_bound.limit)
            if bad is not None:
                raise TokenIdError(self._out_of_range(sample, bad, int(tokens[bad])))
        return tokens

    def _out_of_range(self, sample: int, position: int, token_id: int) -> str:
        """The error text for token ``position`` of ``sample``: which document and where in it."""
        doc_position, offset = (int(v) for v in self.sample_idx[sample])
        offset += position
        while offset >= int(self.indexed.sizes[self.doc_idx[doc_position]]):
            offset -= int(self.indexed.sizes[self.doc_idx[doc_position]])
            doc_position += 1
        item = int(self.doc_idx[doc_position])
        document = document_of_item(self.indexed, item)
        prefix = os.fspath(self.indexed.path_prefix)
        return out_of_range_message(prefix, token_id, document, offset, self.token_bound)

    def __repr__(self) -> str:
        return (
            f"GPTDataset(name={self.name!r}, data={self.indexed.path_prefix!r}, "
            f"documents={self.document_range}, samples={len(self)}, seq_length={self.seq_length})"
        )
