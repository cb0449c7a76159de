"""Exact locator: hashed k-gram postings sampled every ``stride`` tokens, verified against the tokens.

Build: the hash of ``tokens[p : p + k]`` for every ``p`` that is a multiple of ``stride`` (per dataset),
with ``p`` as a global position (datasets laid end to end), bucketed by the hash's top bits into shards
and sorted by hash within each shard (an external bucket sort: memory holds one chunk of tokens, then
one shard). Files: ``postings-NNNN.hashes.npy`` (uint64, sorted) and ``postings-NNNN.positions.npy``
(uint64): 16 bytes per posting, ``16 / stride`` bytes per token.

Guarantee: with ``k + stride - 1 <= min_tokens``, every span of at least ``min_tokens`` tokens that occurs
verbatim inside one document contains a sampled k-gram, so hashing every k-gram of the query finds it.
Search: the query's k-gram hashes are looked up; each hit (query position i, corpus position p) names a
diagonal ``p - i`` in one document; the query is compared with the corpus along each diagonal (a
window bounded by the hits, since a match cannot extend a whole stride past its outermost sampled
k-gram) and every maximal run of equal tokens of at least ``min_tokens`` is a match. Hash collisions
only cost a comparison; they are never reported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from megatron.attribution.hashing import window_hashes

_CHUNK_WINDOWS = 1 << 20  # sampled windows hashed per step of the build
_SHARD_TARGET = 1 << 26  # postings per shard (1 GiB of hashes and positions)
_MAX_SHARD_BITS = 8  # 256 shard files open at once during the build
_POSTING = np.dtype([("hash", "<u8"), ("position", "<u8")])
_VERIFY_BATCH = 1 << 23  # query x corpus comparisons per verification batch


@dataclass(frozen=True)
class Match:
    """A verbatim match: query tokens ``query_start : query_start + length`` equal document
    ``document`` of dataset ``dataset`` (its index in the manifest) from token ``offset``."""

    dataset: int
    document: int
    offset: int
    length: int
    query_start: int


def num_windows(num_tokens: int, k: int, stride: int) -> int:
    """Windows of ``k`` tokens starting at multiples of ``stride`` in ``num_tokens`` tokens."""
    return 0 if num_tokens < k else (num_tokens - k) // stride + 1


def shard_bits_for(num_postings: int) -> int:
    """Top hash bits that pick a shard: shards of about ``_SHARD_TARGET`` postings."""
    bits = 0
    while bits < _MAX_SHARD_BITS and num_postings > _SHARD_TARGET << bits:
        bits += 1
    return bits


def _shard_of(hashes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(len(hashes), dtype=np.int64)
    return (hashes >> np.uint64(64 - bits)).astype(np.int64)


def shard_name(shard: int) -> str:
    return f"postings-{shard:04d}"


def iter_window_hashes(stream, k: int, stride: int, base):
    """(hashes, local positions) of the sampled windows of one dataset, a chunk at a time."""
    chunk_tokens = _CHUNK_WINDOWS * stride
    for start in range(0, stream.num_tokens, chunk_tokens):
        window = np.asarray(stream.tokens[start : start + chunk_tokens + k - 1])
        hashes = window_hashes(window, k, stride, base)
        positions = np.uint64(start) + np.uint64(stride) * np.arange(len(hashes), dtype=np.uint64)
        yield hashes, positions, min(chunk_tokens, stream.num_tokens - start)


def _write_buckets(streams, directory: str, k: int, stride: int, base, bits: int, bar) -> list:
    files = {}
    try:
        global_base = 0
        for stream in streams:
            for hashes, positions, num_tokens in iter_window_hashes(stream, k, stride, base):
                records = np.empty(len(hashes), dtype=_POSTING)
                records["hash"], records["position"] = hashes, positions + np.uint64(global_base)
                shards = _shard_of(hashes, bits)
                order = np.argsort(shards, kind="stable")
                bounds = np.searchsorted(shards[order], np.arange((1 << bits) + 1))
                for shard in np.flatnonzero(np.diff(bounds)):
                    if shard not in files:
                        files[shard] = open(os.path.join(directory, shard_name(shard) + ".raw"), "wb")  # noqa: SIM115
                    files[shard].write(records[order[bounds[shard] : bounds[shard + 1]]].tobytes())
                bar.update(num_tokens)
            global_base += stream.num_tokens
    finally:
        for stream_file in files.values():
            stream_file.close()
    return sorted(files)


def build_postings(streams, directory: str, k: int, stride: int, base, bar) -> dict:
    """Write the sorted postings of ``streams`` into ``directory``; returns the manifest's entry."""
    total = sum(num_windows(stream.num_tokens, k, stride) for stream in streams)
    bits = shard_bits_for(total)
    shards = _write_buckets(streams, directory, k, stride, base, bits, bar)
    for shard in shards:
        raw = os.path.join(directory, shard_name(shard) + ".raw")
        records = np.fromfile(raw, dtype=_POSTING)
        order = np.argsort(records["hash"], kind="stable")
        np.save(os.path.join(directory, shard_name(shard) + ".hashes.npy"), records["hash"][order])
        np.save(os.path.join(directory, shard_name(shard) + ".positions.npy"), records["position"][order])
        os.remove(raw)
    return {
        "k": k,
        "stride": stride,
        "shard_bits": bits,
        "shards": [int(s) for s in shards],
        "postings": total,
    }


class Postings:
    """The memory-mapped postings of an index directory."""

    def __init__(self, directory: str, entry: dict):
        self.k, self.stride, self.bits = entry["k"], entry["stride"], entry["shard_bits"]
        self._arrays = {}
        for shard in entry["shards"]:
            name = os.path.join(directory, shard_name(shard))
            self._arrays[shard] = (
                np.load(name + ".hashes.npy", mmap_mode="r"),
                np.load(name + ".positions.npy", mmap_mode="r"),
            )

    def lookup(self, hashes: np.ndarray, max_occurrences: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(query window index, global position) of every posting equal to a query hash; at most
        ``max_occurrences`` per window (the flag says whether any window had more)."""
        shards = _shard_of(hashes, self.bits)
        found_i, found_p, truncated = [], [], False
        for shard in np.unique(shards).tolist():
            if shard not in self._arrays:
                continue
            sorted_hashes, positions = self._arrays[shard]
            windows = np.flatnonzero(shards == shard)
            low = np.searchsorted(sorted_hashes, hashes[windows], side="left")
            counts = np.searchsorted(sorted_hashes, hashes[windows], side="right") - low
            truncated |= bool(np.any(counts > max_occurrences))
            counts = np.minimum(counts, max_occurrences)
            owner = np.repeat(np.arange(len(windows)), counts)
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            found_i.append(windows[owner])
            found_p.append(np.asarray(positions[low[owner] + within]))
        if not found_i:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64), truncated
        return np.concatenate(found_i), np.concatenate(found_p), truncated


def _diagonal_windows(stream, query_length: int, hit_i, hit_p, k: int, stride: int):
    """Per (document, diagonal): the diagonal, the document start and the query window to compare."""
    documents = stream.document_of(hit_p)
    diagonals = hit_p - hit_i
    order = np.lexsort((hit_i, diagonals, documents))
    documents, diagonals, hit_i = documents[order], diagonals[order], hit_i[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (documents[1:] != documents[:-1]) | (diagonals[1:] != diagonals[:-1])
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(order)) - 1
    documents, diagonals = documents[first], diagonals[first]
    doc_start, doc_end = stream.doc_starts[documents], stream.doc_starts[documents + 1]
    start = np.maximum(np.maximum(hit_i[first] - (stride - 1), 0), doc_start - diagonals)
    end = np.minimum(np.minimum(hit_i[last] + stride + k - 1, query_length), doc_end - diagonals)
    return documents, diagonals, doc_start, start, np.maximum(end, start)


def _runs(stream, query, documents, diagonals, doc_start, start, end, min_tokens, dataset):
    """Maximal runs of equal tokens of at least ``min_tokens`` along each diagonal window."""
    lengths = end - start
    total = int(lengths.sum())
    if total == 0:
        return []
    group = np.repeat(np.arange(len(lengths)), lengths)
    group_first = np.cumsum(lengths) - lengths
    j = start[group] + np.arange(total) - group_first[group]
    equal = np.asarray(stream.tokens[diagonals[group] + j]) == query[j]
    previous = np.concatenate(([False], equal[:-1]))
    following = np.concatenate((equal[1:], [False]))
    boundary_first = group_first[lengths > 0]
    previous[boundary_first] = False
    following[boundary_first[1:] - 1] = False
    run_starts = np.flatnonzero(equal & ~previous)
    run_ends = np.flatnonzero(equal & ~following) + 1
    keep = run_ends - run_starts >= min_tokens
    matches = []
    for first, stop in zip(run_starts[keep].tolist(), run_ends[keep].tolist()):
        g, query_start = int(group[first]), int(j[first])
        offset = int(diagonals[g]) + query_start - int(doc_start[g])
        matches.append(Match(dataset, int(documents[g]), offset, stop - first, query_start))
    return matches


def verify(streams, bases, query: np.ndarray, hit_i, hit_p, k: int, stride: int, min_tokens: int):
    """The verified matches of the hits (global positions ``hit_p``) in every dataset."""
    matches = []
    for dataset, (stream, base) in enumerate(zip(streams, bases)):
        inside = (hit_p >= base) & (hit_p < base + stream.num_tokens)
        if not inside.any():
            continue
        local = (hit_p[inside] - np.uint64(base)).astype(np.int64)
        windows = _diagonal_windows(stream, len(query), hit_i[inside].astype(np.int64), local, k, stride)
        documents, diagonals, doc_start, start, end = windows
        batch_ends = np.cumsum(end - start)
        first = 0
        while first < len(documents):
            limit = (batch_ends[first - 1] if first else 0) + _VERIFY_BATCH
            last = max(first + 1, int(np.searchsorted(batch_ends, limit, side="right")))
            part = slice(first, last)
            matches += _runs(
                stream, query, documents[part], diagonals[part], doc_start[part], start[part], end[part],
                min_tokens, dataset,
            )  # fmt: skip
            first = last
    return matches


def find_matches(postings: Postings, streams, bases, query, base, min_tokens, max_occurrences):
    """(matches longest first, truncated) of ``query`` (token ids) against the postings."""
    query = np.asarray(query, dtype=np.int64)
    hashes = window_hashes(query, postings.k, 1, base)
    hit_i, hit_p, truncated = postings.lookup(hashes, max_occurrences)
    matches = verify(streams, bases, query, hit_i, hit_p, postings.k, postings.stride, min_tokens)
    matches.sort(key=lambda m: (-m.length, m.query_start, m.dataset, m.document, m.offset))
    return matches, truncated
