"""Attribution search: the exact locator against brute force on training and held-out spans, the
sketch's measured false-positive rate, and the index's checks (stale data, tokenizer, --min-tokens)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from megatron.attribution.hashing import hash_base, window_hashes
from megatron.attribution.index import SearchIndex, build_index
from megatron.data.tokenizer import build_tokenizer
from tests.attribution_corpus import BruteForce, make_corpus

MIN_TOKENS = 50
pytestmark = pytest.mark.slow  # preprocesses 150 files with two workers, then 600 searches


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_path):
    return make_corpus(tmp_path_factory.mktemp("attribution"), tiny_tokenizer_path)


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    return build_tokenizer("TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path))


@pytest.fixture(scope="module")
def index(corpus, tokenizer, tiny_tokenizer_path, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("index") / "index")
    build_index(
        [corpus["prefix"]], directory, min_tokens=MIN_TOKENS, tokenizer=tokenizer,
        tokenizer_path=str(tiny_tokenizer_path), progress=False,
    )  # fmt: skip
    return SearchIndex(directory)


@pytest.fixture(scope="module")
def brute_force(index):
    stream = index.streams[0]
    return BruteForce(np.asarray(stream.tokens), stream.doc_starts)


def _found(index, query) -> set[tuple[int, int, int, int]]:
    matches, truncated = index.find(query)
    assert not truncated
    return {(m.document, m.offset, m.length, m.query_start) for m in matches}


def test_training_spans_are_found_at_their_document_and_offset(index, brute_force):
    stream, rng = index.streams[0], np.random.default_rng(0)
    lengths = np.diff(stream.doc_starts)
    eligible = np.flatnonzero(lengths >= 200)
    for _ in range(200):
        document = int(rng.choice(eligible))
        length = int(rng.integers(MIN_TOKENS, 201))
        offset = int(rng.integers(0, lengths[document] - length + 1))
        start = int(stream.doc_starts[document]) + offset
        query = np.asarray(stream.tokens[start : start + length])
        found = _found(index, query)
        assert (document, offset, length, 0) in found
        assert found == brute_force.matches(query, MIN_TOKENS)


def _held_out_spans(corpus, tokenizer, count: int, rng) -> list[np.ndarray]:
    documents = [np.asarray(tokenizer.encode(r["content"])) for r in corpus["held_out"]]
    documents = [d for d in documents if len(d) >= 200]
    spans = []
    for _ in range(count):
        tokens = documents[int(rng.integers(len(documents)))]
        length = int(rng.integers(MIN_TOKENS, 201))
        offset = int(rng.integers(0, len(tokens) - length + 1))
        spans.append(tokens[offset : offset + length])
    return spans


def test_held_out_spans_agree_with_brute_force(index, brute_force, corpus, tokenizer):
    absent = 0
    for query in _held_out_spans(corpus, tokenizer, 200, np.random.default_rng(1)):
        truth = brute_force.matches(query, MIN_TOKENS)
        assert _found(index, query) == truth
        absent += not truth
    print(f"held-out spans truly absent from the training data: {absent} of 200")
    assert absent >= 150  # most held-out code is new; the rest (boilerplate) must be found exactly


def test_sketch_false_positive_rate_is_near_its_design(index, corpus, tokenizer):
    sketch, stream = index.sketch, index.streams[0]
    n, base = sketch.ngram, hash_base(index.manifest["hash_seed"])
    tokens = np.asarray(stream.tokens)
    tiles = {tokens[p : p + n].tobytes() for p in range(0, len(tokens) - n + 1, n)}
    assert sketch.contains(window_hashes(tokens.astype(np.int64), n, n, base)).all()  # no false negatives
    held_out = np.concatenate([np.asarray(tokenizer.encode(r["content"])) for r in corpus["held_out"]])
    held_out = held_out.astype(tokens.dtype)
    candidates = np.random.default_rng(2).permutation(len(held_out) - n + 1)
    absent = [p for p in candidates.tolist() if held_out[p : p + n].tobytes() not in tiles][:10_000]
    assert len(absent) == 10_000
    hashes = window_hashes(held_out.astype(np.int64), n, 1, base)[absent]
    rate = sketch.contains(hashes).mean()
    print(f"sketch false-positive rate on 10,000 absent {n}-grams: {rate:.4f} (design {sketch.fpr})")
    assert sketch.fpr / 2 <= rate <= sketch.fpr * 2


def test_sketch_marks_training_spans_and_not_new_code(index, corpus, tokenizer):
    stream = index.streams[0]
    start = int(stream.doc_starts[3])
    assert index.membership(np.asarray(stream.tokens[start : start + 120]))
    spans = _held_out_spans(corpus, tokenizer, 40, np.random.default_rng(3))
    flagged = sum(bool(index.membership(span)) for span in spans)
    assert flagged <= 10  # boilerplate shared with the training files only


def test_metadata_names_each_documents_source(index, corpus, tokenizer):
    stream = index.streams[0]
    assert stream.num_documents == len(corpus["training"])  # every training file is one document
    for document in range(0, stream.num_documents, 7):
        record = corpus["training"][document]
        metadata = index.describe(0, document)
        assert metadata["max_stars_repo_path"] == record["max_stars_repo_path"]
        assert metadata["max_stars_repo_name"] == record["max_stars_repo_name"]
        assert metadata["max_stars_repo_licenses"] == []
        assert "content" not in metadata and "max_stars_repo_head_hexsha" not in metadata  # null: left out
        begin, end = stream.doc_starts[document], stream.doc_starts[document + 1]
        assert stream.tokens[begin:end].tolist() == tokenizer.encode(record["content"]) + [tokenizer.eod]


def test_search_refuses_shorter_spans_than_built_for(index):
    with pytest.raises(ValueError, match="at least 50 tokens"):
        index.find(np.zeros(100, dtype=np.int64), min_tokens=20)
    assert index.find(np.zeros(10, dtype=np.int64))[0] == []


def test_stale_index_and_other_tokenizer_are_refused(index, tmp_path, tiny_tokenizer_path):
    from tests.helpers import load_tool

    prefix = index.streams[0].prefix
    copy = str(tmp_path / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, copy + suffix)
    build_index([copy], str(tmp_path / "index"), min_tokens=MIN_TOKENS, mode="exact", progress=False)
    SearchIndex(str(tmp_path / "index"))
    data = np.fromfile(copy + ".bin", dtype=np.uint8)
    data[-2:] ^= 1  # same size, other tokens
    data.tofile(copy + ".bin")
    with pytest.raises(ValueError, match="stale index.*changed since"):
        SearchIndex(str(tmp_path / "index"))
    other = tmp_path / "other.json"
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"content": "hello world"}\n{"content": "int main() { return 0; }"}\n')
    assert (
        load_tool("train_tokenizer").main(
            ["--input", str(texts), "--output", str(other), "--vocab-size", "300", "--quiet"]
        )
        == 0
    )
    with pytest.raises(ValueError, match="vocabulary"):
        index.check_tokenizer(build_tokenizer("TokenizerFromFile", tokenizer_file=str(other)))


def test_failed_build_leaves_the_old_index(index, corpus, tmp_path, monkeypatch):
    import megatron.attribution.index as index_module

    output = str(tmp_path / "index")
    build_index([corpus["prefix"]], output, mode="exact", progress=False)
    before = sorted(os.listdir(output))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(index_module, "build_sketch", fail)
    with pytest.raises(OSError):
        build_index([corpus["prefix"]], output, mode="both", progress=False)
    assert sorted(os.listdir(output)) == before
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temporary directory left
    with pytest.raises(ValueError, match="not a search index"):
        build_index([corpus["prefix"]], str(tmp_path), progress=False)
