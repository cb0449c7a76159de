"""Property tests (hypothesis) of preprocessing: the JSONL reader and the tokenizer round trip.

- reading: any bytes, read in blocks of any size (plain or gzip), come back whole, split only after
  line ends;
- records: any mix of valid documents (any Unicode, lone surrogates included), blank lines, CRLF,
  missing keys, non-string values and garbage becomes documents or counted skips, never a crash: the
  documents are exactly the valid texts in order, and documents + skips = non-blank lines, for any
  chunk size; long documents split into pieces give the same bytes back;
- tokenizer: decode(encode(text)) == text for the byte-level BPE tokenizer, literal special-token text
  (FIM markers, end-of-text) never becomes a special id, and the gigatoken engine gives the reference's
  ids on any text.
And two invariants the fault handling rests on: Ctrl-C is held until an engine call returns, and a
document tokenized in pieces decodes to its text.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron.data.tokenizer import STARCODER_SPECIAL_TOKENS
from tests.helpers import load_tool

preprocess = load_tool("preprocess_data")

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class BytesEngine:
    """A stand-in engine whose ids are the UTF-8 bytes of the text: documents can be read back."""

    def encode(self, texts):
        data = [text.encode("utf-8") for text in texts]
        counts = np.asarray([len(item) for item in data], dtype=np.int64)
        return np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.int64), counts


def _job(**overrides):
    values = dict(
        keys=["text"], engine_spec=(), dtype="uint16", vocab_size=256, eod=0, append_eod=False, strict=False
    )
    return preprocess.Job(**{**values, **overrides})


def _documents(result) -> list[str]:
    tokens, lengths = result.tokens["text"]
    ends = np.cumsum(lengths)
    return [
        bytes(tokens[end - length : end].astype(np.uint8)).decode("utf-8")
        for end, length in zip(ends, lengths)
    ]


# ----------------------------------------------------------------------------------------------------------
# Reading blocks


@SETTINGS
@given(content=st.binary(max_size=400), chunk_bytes=st.integers(1, 64), compressed=st.booleans())
def test_blocks_give_the_bytes_back_cut_after_line_ends(tmp_path, content, chunk_bytes, compressed):
    path = tmp_path / ("in.jsonl.gz" if compressed else "in.jsonl")
    path.write_bytes(gzip.compress(content) if compressed else content)
    blocks = list(preprocess._read_jsonl_blocks(str(path), chunk_bytes))
    assert b"".join(blocks) == content
    assert all(block.endswith(b"\n") for block in blocks[:-1]) and all(blocks)


# ----------------------------------------------------------------------------------------------------------
# Records

VALUES = st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.integers(), max_size=2), st.floats())
# Text with lone surrogates now and then (JSON can spell them; they are not valid UTF-8).
TEXTS = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)


@st.composite
def lines(draw):
    """(line bytes, the document it holds or None, whether the line is blank)."""
    kind = draw(st.sampled_from(["valid", "valid_raw", "missing", "not_string", "garbage", "blank"]))
    if kind in ("valid", "valid_raw"):
        text = draw(TEXTS)
        extra = draw(st.dictionaries(st.sampled_from(["path", "size"]), VALUES, max_size=2))
        line = json.dumps({**extra, "text": text}, ensure_ascii=kind == "valid")
        data = line.encode("utf-8", "surrogatepass")
        valid = bool(text) and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return data, (text if valid else None), False
    if kind == "missing":
        return json.dumps({"other": draw(TEXTS)}, ensure_ascii=True).encode(), None, False
    if kind == "not_string":
        return json.dumps({"text": draw(VALUES)}).encode(), None, False
    if kind == "garbage":
        data = draw(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b and b.strip()))
        try:  # bytes that happen to be a JSON object with a string 'text' are a document
            record = json.loads(data)
            text = record.get("text") if isinstance(record, dict) else None
            text = text if isinstance(text, str) and text and text.encode("utf-8", "strict") else None
        except (ValueError, UnicodeError):
            text = None
        return data, text, False
    return draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])), None, True


@SETTINGS
@given(
    records=st.lists(lines(), max_size=25),
    crlf=st.booleans(),
    chunk_bytes=st.integers(1, 200),
    split_over=st.sampled_from([0, 1, 7]),
)
def test_records_become_documents_or_counted_skips(tmp_path, records, crlf, chunk_bytes, split_over):
    ending = b"\r\n" if crlf else b"\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(data + ending for data, _, _ in records))
    job = _job(max_document_bytes=split_over)
    documents, skipped, engine = [], 0, BytesEngine()
    if records:
        for chunk in preprocess.iter_chunks([str(path)], ["text"], chunk_bytes):
            result = preprocess.process_chunk(chunk, job, engine)
            documents += _documents(result)
            skipped += sum(result.skipped.values())
            assert result.num_documents == len(_documents(result))
    expected = [text for _, text, _ in records if text is not None]
    assert documents == expected  # split documents (split_over > 0) come back whole
    assert len(documents) + skipped == sum(not blank for _, _, blank in records)


@SETTINGS
@given(text=st.text(min_size=1, max_size=200), max_bytes=st.integers(1, 50))
def test_split_long_text_cuts_into_bounded_pieces(text, max_bytes):
    pieces = preprocess.split_long_text(text, max_bytes)
    assert "".join(pieces) == text and all(pieces)
    # Only a single character longer than the limit (a 4-byte one, say) may exceed it.
    assert all(len(piece.encode("utf-8")) <= max_bytes or len(piece) == 1 for piece in pieces)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer

PLAIN_AND_SPECIAL = st.lists(
    st.one_of(st.text(max_size=30), st.sampled_from(STARCODER_SPECIAL_TOKENS)), max_size=8
).map("".join)


@SETTINGS
@given(text=PLAIN_AND_SPECIAL)
def test_byte_level_round_trip_and_no_special_ids(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    specials = set(tiny_tokenizer.special_token_ids.values())
    assert specials and not specials & set(ids)  # '<fim_prefix>' in a file is text, not a FIM marker
    assert b"".join(tiny_tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")


@pytest.fixture(scope="module")
def engines(tiny_tokenizer, tiny_tokenizer_path):
    """(gigatoken engine, reference engine) as preprocess_data selects them for the tiny tokenizer."""
    pytest.importorskip("gigatoken")
    config, split_numerics, note = preprocess.gigatoken_config(tiny_tokenizer, allow_special=False)
    assert config is not None, note
    kwargs = dict(tokenizer_type="TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path))
    kwargs |= dict(vocab_file=None, merge_file=None, tokenizer_model=None)
    reference_spec = ("tokenizers", kwargs, False)
    fast = preprocess.make_engine(("gigatoken", config, split_numerics, reference_spec), parallel=False)
    return fast, preprocess.make_engine(reference_spec, tokenizer=tiny_tokenizer)


@SETTINGS
@given(texts=st.lists(PLAIN_AND_SPECIAL.filter(bool), min_size=1, max_size=4))
def test_gigatoken_gives_the_reference_ids(engines, texts):
    fast, reference = engines
    flat, counts = fast.encode(texts)
    got = [part.tolist() for part in np.split(flat, np.cumsum(counts)[:-1])]
    assert got == reference.encode_lists(texts)


# ----------------------------------------------------------------------------------------------------------
# Invariants of the pieces the fault handling rests on


def test_ctrl_c_is_held_until_an_engine_call_returns():
    """Ctrl-C inside a Rust tokenizer call gave panics or half-built results: it waits for the call."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    returned = []

    class InterruptedEngine(BytesEngine):
        def encode(self, texts):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered during the call
            returned.append(True)
            return super().encode(texts)

    with pytest.raises(KeyboardInterrupt):
        preprocess.encode_bounded(InterruptedEngine(), ["a", "bc"], 0)
    assert returned == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_split_document_decodes_to_its_text(tiny_tokenizer, tiny_tokenizer_path, demo_corpus_path):
    text = json.loads(demo_corpus_path.read_text(encoding="utf-8").splitlines()[0])["content"] * 3
    kwargs = dict(tokenizer_type="TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path))
    engine = preprocess.make_engine(("tokenizers", kwargs, False), tokenizer=tiny_tokenizer)
    max_bytes = len(text.encode("utf-8")) // 5
    flat, counts = preprocess.encode_bounded(engine, ["short", text, "tail"], max_bytes)
    short, long, tail = np.split(flat, np.cumsum(counts)[:-1])
    assert len(preprocess.split_long_text(text, max_bytes)) >= 5
    assert tiny_tokenizer.decode(long.tolist()) == text
    assert short.tolist() == tiny_tokenizer.encode("short") and tail.tolist() == tiny_tokenizer.encode("tail")


def test_an_in_process_run_leaves_the_signal_handlers_as_it_found_them(tmp_path, tiny_tokenizer_path):
    """The CLI ignores Ctrl-C once its outputs are in place; a caller of run() (tests, benchmarks) must
    get its handlers back."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "def f():\n    return 1\n"}) + "\n", encoding="utf-8")
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    argv = ["--input", str(source), "--output-prefix", str(tmp_path / "out"), "--quiet"]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tiny_tokenizer_path)]
    assert preprocess.run(preprocess.parse_args(argv)).documents == 1
    assert preprocess.main([*argv, "--overwrite"]) == 0
    assert {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)} == before
