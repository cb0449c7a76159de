"""The corpus the attribution tests search: 200 standard-library files in The Stack's shape, the first
150 preprocessed (two workers, small chunks, so documents come back from several processes) as the
training data, the last 50 held out; and a brute-force matcher that is the ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.helpers import load_tool

NUM_FILES, NUM_TRAINING = 200, 150


def make_corpus(directory: Path, tokenizer_path: Path) -> dict:
    """Write the JSONL files and the training dataset; returns their paths and the records."""
    directory.mkdir(parents=True, exist_ok=True)
    everything = directory / "all.jsonl"
    assert (
        load_tool("make_demo_corpus").main(["--output", str(everything), "--max-files", str(NUM_FILES)]) == 0
    )
    lines = everything.read_text(encoding="utf-8").splitlines(keepends=True)
    training, held_out = directory / "train.jsonl", directory / "heldout.jsonl"
    training.write_text("".join(lines[:NUM_TRAINING]), encoding="utf-8")
    held_out.write_text("".join(lines[NUM_TRAINING:]), encoding="utf-8")
    prefix = str(directory / "train")
    argv = ["--input", str(training), "--output-prefix", prefix, "--json-keys", "content"]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tokenizer_path)]
    argv += ["--append-eod", "--workers", "2", "--chunk-mb", "0.05", "--quiet"]
    assert load_tool("preprocess_data").main(argv) == 0
    return {
        "prefix": prefix + "_content_document",
        "training": [json.loads(line) for line in lines[:NUM_TRAINING]],
        "held_out": [json.loads(line) for line in lines[NUM_TRAINING:]],
        "training_jsonl": training,
        "held_out_jsonl": held_out,
    }


class BruteForce:
    """Every maximal verbatim match of a query inside one document, found by scanning the tokens
    (through an index of token trigrams, then extending each candidate token by token)."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        keys = self._trigrams(self.tokens)
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]

    @staticmethod
    def _trigrams(tokens: np.ndarray) -> np.ndarray:
        return (tokens[:-2] << 40) | (tokens[1:-1] << 20) | tokens[2:]

    def matches(self, query, min_tokens: int) -> set[tuple[int, int, int, int]]:
        """{(document, offset, length, query start)} of the maximal matches of at least ``min_tokens``."""
        query = np.asarray(query, dtype=np.int64)
        found = set()
        for start, key in enumerate(self._trigrams(query)[: max(0, len(query) - min_tokens + 1)].tolist()):
            low, high = np.searchsorted(self.sorted_keys, [key, key + 1])
            positions = self.order[low:high]
            documents = np.searchsorted(self.doc_starts, positions, side="right") - 1
            doc_start, doc_end = self.doc_starts[documents], self.doc_starts[documents + 1]
            # Left-maximal only: the previous token differs, or the query or the document starts here.
            left = (start == 0) | (positions == doc_start)
            if start > 0:
                left |= self.tokens[np.maximum(positions - 1, 0)] != query[start - 1]
            positions, documents, doc_start, doc_end = (
                a[left] for a in (positions, documents, doc_start, doc_end)
            )
            length = np.zeros(len(positions), dtype=np.int64)
            alive = np.ones(len(positions), dtype=bool)
            for step in range(len(query) - start):
                inside = alive & (positions + step < doc_end)
                alive = inside.copy()
                alive[inside] = self.tokens[positions[inside] + step] == query[start + step]
                length += alive
                if not alive.any():
                    break
            for document, position, first, size in zip(documents, positions, doc_start, length):
                if size >= min_tokens:
                    found.add((int(document), int(position - first), int(size), start))
        return found
