"""A search index over the token stream of indexed datasets: a directory holding

``manifest.json``
    the datasets (absolute prefixes, token and document counts, sizes, modification times and digests of
    their files, to detect a stale index), ``min_tokens``, the hash seed, the exact locator's ``k``,
    ``stride`` and shards, the sketch's n-gram length, design false-positive rate and size, and the
    tokenizer recorded at build time (path, vocabulary size, digest of its vocabulary);
``postings-NNNN.hashes.npy`` / ``postings-NNNN.positions.npy``
    the exact locator (``exact.py``);
``sketch.bloom``
    the membership sketch (``sketch.py``).

The directory is built under a temporary name beside ``--output`` and renamed into place at the end, so
an interrupted build leaves no index (and an older index at that path stays until the new one is whole).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np

from megatron.attribution.corpus import DatasetStream, fingerprint, stale_reason
from megatron.attribution.exact import Postings, build_postings, find_matches
from megatron.attribution.hashing import hash_base
from megatron.attribution.sketch import Sketch, build_sketch

FORMAT = "megatron-search-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SKETCH_FILE = "sketch.bloom"
MODES = ("exact", "sketch", "both")


def default_kgram(min_tokens: int) -> tuple[int, int]:
    """(k, stride) for ``min_tokens``: half the span hashed, sampled every ``min_tokens - k + 1``."""
    k = max(1, min_tokens // 2)
    return k, min_tokens - k + 1


def default_sketch_ngram(min_tokens: int) -> int:
    """Tiles of a third of ``min_tokens``, so a span holds two whole tiles: fpr**2 per span."""
    return max(1, min_tokens // 3)


def tokenizer_record(tokenizer, path: str | None) -> dict:
    """What identifies a vocabulary: its size and a digest of every token's bytes."""
    digest = hashlib.sha256()
    for token in tokenizer.token_bytes:
        digest.update(len(token).to_bytes(4, "little") + token)
    return {
        "file": None if path is None else os.path.abspath(path),
        "vocab_size": int(tokenizer.vocab_size),
        "vocab_sha256": digest.hexdigest(),
    }


def _dataset_entry(stream: DatasetStream) -> dict:
    entry = fingerprint(stream.prefix)
    maximum = 0
    for start in range(0, stream.num_tokens, 1 << 26):
        maximum = max(maximum, int(np.max(stream.tokens[start : start + (1 << 26)])))
    entry.update(
        tokens=stream.num_tokens, documents=stream.num_documents, dtype=str(stream.dtype),
        max_token_id=maximum, has_metadata=stream.metadata is not None,
    )  # fmt: skip
    return entry


def _replace_directory(temporary: str, output: str) -> None:
    """Move the finished ``temporary`` to ``output``; an older index there is removed only afterwards."""
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(temporary, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(output: str) -> None:
    """``ValueError`` unless ``output`` is free or holds an index (which a build may replace)."""
    if os.path.exists(output) and not os.path.isfile(os.path.join(output, MANIFEST)):
        raise ValueError(f"--output {output} exists and is not a search index; choose another path")


def build_index(
    prefixes, output: str, *, min_tokens: int = 50, mode: str = "both", sketch_fpr: float = 0.01,
    tokenizer=None, tokenizer_path: str | None = None, seed: int = 1234, progress=None,
) -> dict:  # fmt: skip
    """Build the index of ``prefixes`` at ``output``; returns the manifest."""
    from megatron.log import progress_bar

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if min_tokens < 2:
        raise ValueError(f"--min-tokens must be at least 2, got {min_tokens}")
    if not 0.0 < sketch_fpr < 1.0:
        raise ValueError(f"--sketch-fpr must be in (0, 1), got {sketch_fpr}")
    check_output(output)
    streams = [DatasetStream(prefix) for prefix in prefixes]
    start = time.perf_counter()
    base = hash_base(seed)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "min_tokens": min_tokens, "hash_seed": seed}
    manifest["datasets"] = [_dataset_entry(stream) for stream in streams]
    manifest["tokenizer"] = None if tokenizer is None else tokenizer_record(tokenizer, tokenizer_path)
    manifest["exact"] = manifest["sketch"] = None
    temporary = f"{output.rstrip(os.sep)}.tmp-{os.getpid()}"
    os.makedirs(temporary)
    try:
        total = sum(stream.num_tokens for stream in streams)
        if mode in ("exact", "both"):
            k, stride = default_kgram(min_tokens)
            with progress_bar(total=total, desc="exact index", unit="tok", enabled=progress) as bar:
                manifest["exact"] = build_postings(streams, temporary, k, stride, base, bar)
        if mode in ("sketch", "both"):
            ngram = default_sketch_ngram(min_tokens)
            path = os.path.join(temporary, SKETCH_FILE)
            with progress_bar(total=total, desc="sketch", unit="tok", enabled=progress) as bar:
                manifest["sketch"] = build_sketch(streams, path, ngram, sketch_fpr, base, bar)
        manifest["build_seconds"] = round(time.perf_counter() - start, 3)
        with open(os.path.join(temporary, MANIFEST), "w") as stream:
            json.dump(manifest, stream, indent=1)
        _replace_directory(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return manifest


def index_bytes(directory: str, mode: str) -> int:
    """Bytes on disk of one part of an index: ``exact`` (postings) or ``sketch``."""
    names = os.listdir(directory)
    wanted = [n for n in names if n.startswith("postings-")] if mode == "exact" else [SKETCH_FILE]
    return sum(os.path.getsize(os.path.join(directory, n)) for n in wanted if n in names)


class SearchIndex:
    """An opened index; ``ValueError`` naming the problem when it is missing, unreadable or stale."""

    def __init__(self, directory: str, *, check_stale: bool = True):
        path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(path):
            raise ValueError(f"--index {directory}: no search index there (no {MANIFEST})")
        try:
            with open(path) as stream:
                self.manifest = json.load(stream)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: unreadable manifest ({error})") from error
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a version {FORMAT_VERSION} {FORMAT} manifest")
        if check_stale:
            for entry in self.manifest["datasets"]:
                reason = stale_reason(entry)
                if reason is not None:
                    raise ValueError(f"stale index {directory}: {reason}; rebuild it with build_search_index")
        self.directory = directory
        self.min_tokens = self.manifest["min_tokens"]
        self.base = hash_base(self.manifest["hash_seed"])
        self.streams = [DatasetStream(entry["prefix"]) for entry in self.manifest["datasets"]]
        self.bases = np.cumsum([0] + [s.num_tokens for s in self.streams])[:-1].tolist()
        exact, sketch = self.manifest["exact"], self.manifest["sketch"]
        self.postings = None if exact is None else Postings(directory, exact)
        self.sketch = None if sketch is None else Sketch(os.path.join(directory, SKETCH_FILE), sketch)

    def check_tokenizer(self, tokenizer) -> None:
        """``ValueError`` when ``tokenizer`` is not the vocabulary the indexed data was made with."""
        recorded = self.manifest["tokenizer"]
        if recorded is not None:
            mine = tokenizer_record(tokenizer, None)
            if mine["vocab_sha256"] != recorded["vocab_sha256"]:
                raise ValueError(
                    f"the tokenizer's vocabulary ({mine['vocab_size']} tokens) differs from the one the "
                    f"index was built with ({recorded['vocab_size']} tokens, {recorded['file']})"
                )
        largest = max((entry["max_token_id"] for entry in self.manifest["datasets"]), default=0)
        if largest >= tokenizer.vocab_size:
            raise ValueError(
                f"the indexed data holds token id {largest} but the tokenizer has {tokenizer.vocab_size} "
                "tokens: it is not the data's tokenizer"
            )

    def _check_min_tokens(self, min_tokens: int | None) -> int:
        min_tokens = self.min_tokens if min_tokens is None else min_tokens
        if min_tokens < self.min_tokens:
            raise ValueError(
                f"--min-tokens {min_tokens}: the index finds spans of at least {self.min_tokens} tokens "
                f"(rebuild it with --min-tokens {min_tokens} for shorter ones)"
            )
        return min_tokens

    def find(self, tokens, *, min_tokens: int | None = None, max_occurrences: int = 10000):
        """Exact matches of ``tokens`` (``exact.Match``, longest first) and whether the candidates of
        some k-gram were capped at ``max_occurrences``."""
        if self.postings is None:
            raise ValueError(f"index {self.directory} has no exact locator (built with --mode sketch)")
        min_tokens = self._check_min_tokens(min_tokens)
        return find_matches(
            self.postings, self.streams, self.bases, tokens, self.base, min_tokens, max_occurrences
        )

    def membership(self, tokens, *, min_tokens: int | None = None):
        """Sketch spans (``sketch.SketchSpan``, longest first) of ``tokens``."""
        if self.sketch is None:
            raise ValueError(f"index {self.directory} has no membership sketch (built with --mode exact)")
        return self.sketch.spans(np.asarray(tokens), self.base, self._check_min_tokens(min_tokens))

    def describe(self, dataset: int, document: int) -> dict | None:
        """Source metadata of a document (None: its dataset has no sidecar)."""
        return self.streams[dataset].describe(document)
