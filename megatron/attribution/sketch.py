"""Membership sketch: a Bloom filter over hashed token n-grams (the Data Portraits / "Am I in The Stack"
approach), answering "was this span in the training data" at a stated false-positive rate.

Build: the n-grams tiling each dataset (starting at multiples of ``n``) are hashed (``hashing.py``) and
added to an ``rbloom`` filter (Rust) sized for their count and ``fpr``: about ``-ln(fpr) / ln(2)^2``
bits per n-gram (9.6 at 1%), so ``1.2 / n`` bytes per token at 1%.
Query: every n-gram of the query is tested. A span of ``L`` tokens copied from the corpus contains at
least ``(L - n + 1) // n`` whole tiles, seen as hits exactly ``n`` apart; a chain of ``c`` such hits
arises by chance with probability ``fpr ** c`` per start position, so requiring
``c_min = (min_tokens - n + 1) // n`` chained hits makes the per-span false-positive rate ``fpr ** c_min``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron.attribution.exact import iter_window_hashes, num_windows
from megatron.attribution.hashing import window_hashes


def _bloom_class():
    try:
        from rbloom import Bloom
    except ImportError as error:
        raise ValueError(
            "the membership sketch needs the rbloom package: pip install rbloom "
            "(or pip install -e '.[attribution]')"
        ) from error
    return Bloom


def min_chain(min_tokens: int, ngram: int) -> int:
    """Whole tiles of ``ngram`` tokens inside any span of ``min_tokens`` tokens."""
    return (min_tokens - ngram + 1) // ngram


def build_sketch(streams, path: str, ngram: int, fpr: float, base, bar) -> dict:
    """Write the filter of every tile of ``streams`` to ``path``; returns the manifest's entry."""
    Bloom = _bloom_class()
    items = sum(num_windows(stream.num_tokens, ngram, ngram) for stream in streams)
    bloom = Bloom(max(items, 1), fpr, hash_func=int)
    for stream in streams:
        for hashes, _, num_tokens in iter_window_hashes(stream, ngram, ngram, base):
            bloom.update(hashes.tolist())
            bar.update(num_tokens)
    bloom.save(path)
    return {"ngram": ngram, "fpr": fpr, "items": items, "bits": int(bloom.size_in_bits)}


@dataclass(frozen=True)
class SketchSpan:
    """Query tokens ``query_start : query_start + length`` are ``chain`` consecutive n-grams found in
    the sketch; ``false_positive`` bounds the chance of a chain this long anywhere in a query of this
    length that is not in the training data (query positions x ``fpr ** chain``)."""

    query_start: int
    length: int
    chain: int
    false_positive: float


class Sketch:
    """A saved filter with its parameters."""

    def __init__(self, path: str, entry: dict):
        self.bloom = _bloom_class().load(path, int)
        self.ngram, self.fpr = entry["ngram"], entry["fpr"]

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Membership of each n-gram hash (true members always; others with probability ``fpr``)."""
        bloom = self.bloom
        return np.fromiter((value in bloom for value in hashes.tolist()), dtype=bool, count=len(hashes))

    def spans(self, query: np.ndarray, base, min_tokens: int) -> list[SketchSpan]:
        """Chains of at least ``min_chain`` hits ``n`` apart, longest first."""
        n = self.ngram
        present = self.contains(window_hashes(np.asarray(query, dtype=np.int64), n, 1, base))
        needed = max(1, min_chain(min_tokens, n))
        spans = []
        for phase in range(min(n, len(present))):
            hits = np.concatenate(([False], present[phase::n], [False])).astype(np.int8)
            edges = np.diff(hits)
            for first, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
                if stop - first >= needed:
                    start = phase + int(first) * n
                    chain = int(stop - first)
                    bound = min(1.0, len(present) * self.fpr**chain)
                    spans.append(SketchSpan(start, chain * n, chain, bound))
        spans.sort(key=lambda span: (-span.length, span.query_start))
        return spans
