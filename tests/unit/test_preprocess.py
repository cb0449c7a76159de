"""tools/preprocess_data.py and tools/merge_datasets.py: exact tokens, byte-compatible files, bad input."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import load_tool

preprocess = load_tool("preprocess_data")
merge_tool = load_tool("merge_datasets")

SPEC_MAGIC = b"MMIDIDX\x00\x00"


# ---------------------------------------------------------------------------------------------------------
# Independent writer/reader of the format, from docs/data-format.md only (one item per document).


def spec_write(prefix, documents, dtype) -> None:
    dtype = np.dtype(dtype)
    code = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}[dtype]
    sizes = [len(document) for document in documents]
    pointers = [sum(sizes[:i]) * dtype.itemsize for i in range(len(sizes))]
    with open(f"{prefix}.bin", "wb") as stream:
        for document in documents:
            stream.write(np.asarray(document, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as stream:
        stream.write(SPEC_MAGIC + struct.pack("<QBQQ", 1, code, len(sizes), len(sizes) + 1))
        stream.write(struct.pack(f"<{len(sizes)}i", *sizes))
        stream.write(struct.pack(f"<{len(sizes)}q", *pointers))
        stream.write(struct.pack(f"<{len(sizes) + 1}q", *range(len(sizes) + 1)))


def spec_read(prefix) -> list[list[int]]:
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == SPEC_MAGIC and raw[17] == 8  # uint16 tokens for the tiny vocabulary
    num_items, num_entries = struct.unpack_from("<QQ", raw, 18)
    sizes = struct.unpack_from(f"<{num_items}i", raw, 34)
    pointers = struct.unpack_from(f"<{num_items}q", raw, 34 + 4 * num_items)
    assert struct.unpack_from(f"<{num_entries}q", raw, 34 + 12 * num_items) == tuple(range(num_items + 1))
    data = Path(f"{prefix}.bin").read_bytes()
    return [np.frombuffer(data, "<u2", count=s, offset=p).tolist() for s, p in zip(sizes, pointers)]


def read_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Helpers


def run_tool(tokenizer_path, inputs, prefix, *extra) -> preprocess.Summary:
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--json-keys", "content"]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tokenizer_path), "--quiet"]
    return preprocess.run(preprocess.parse_args([*argv, *map(str, extra)]))


def write_jsonl(path, records) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(path)


def demo_documents(demo_corpus_path) -> list[str]:
    records = [json.loads(line) for line in Path(demo_corpus_path).read_text(encoding="utf-8").splitlines()]
    return [record["content"] for record in records if record["content"]]


TRICKY = [
    "tokenizer code: EOS = '<|endoftext|>'\nFIM = ['<fim_prefix>', '<fim_middle>', '<fim_suffix>']\n",
    "numbers 0 12 345.6e-7 and unicode numerics ² ½ Ⅻ ٣ ① 一 mixed x²+y² = 10²\n",
    "emoji 😀 and accents é ü and spaces  \t\n\n   end",
    "<reponame>fake/repo<filename>a.py<gh_stars>5\nliteral metadata markers\n",
    # Assigned in Unicode 16: a letter to gigatoken's tables, punctuation to tokenizers' (Oniguruma).
    'table = [\n    "\ua7cf",\n    None,\n]\n',
]


# ---------------------------------------------------------------------------------------------------------
# Exact tokens and byte compatibility


def test_output_is_byte_identical_to_independent_writer(
    tmp_path, demo_corpus_path, tiny_tokenizer_path, tiny_tokenizer
):
    summary = run_tool(
        tiny_tokenizer_path, [demo_corpus_path], tmp_path / "out", "--append-eod", "--chunk-mb", "0.2"
    )
    if _gigatoken_available():
        assert summary.engine.startswith("gigatoken"), summary.engine  # the fast path is the one tested
    expected = [
        tiny_tokenizer.encode(text) + [tiny_tokenizer.eod] for text in demo_documents(demo_corpus_path)
    ]
    spec_write(tmp_path / "spec", expected, np.uint16)
    assert read_bytes(tmp_path / "out_content_document") == read_bytes(tmp_path / "spec")
    assert summary.documents == len(expected)
    assert summary.tokens == sum(map(len, expected))


def _gigatoken_available() -> bool:
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("engine", ["auto", "tokenizers"])
def test_every_token_equals_tokenizer_encoding(tmp_path, tiny_tokenizer_path, tiny_tokenizer, engine):
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": text} for text in TRICKY])
    run_tool(tiny_tokenizer_path, [path], tmp_path / "out", "--append-eod", "--tokenizer-engine", engine)
    documents = spec_read(tmp_path / "out_content_document")
    assert documents == [tiny_tokenizer.encode(text) + [tiny_tokenizer.eod] for text in TRICKY]


def test_literal_special_tokens_stay_ordinary_text(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": TRICKY[0]}, {"content": TRICKY[3]}])
    run_tool(tiny_tokenizer_path, [path], tmp_path / "out", "--append-eod")
    specials = set(tiny_tokenizer.special_token_ids.values())
    for document in spec_read(tmp_path / "out_content_document"):
        assert document[-1] == tiny_tokenizer.eod
        assert not specials & set(document[:-1]), "a literal special token became its special id"
        assert "<|endoftext|>" in tiny_tokenizer.decode(
            document[:-1]
        ) or "<reponame>" in tiny_tokenizer.decode(document[:-1])


def test_allow_special_tokens_flag_encodes_them_as_ids(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": "a <|endoftext|> b <fim_middle> c"}])
    run_tool(tiny_tokenizer_path, [path], tmp_path / "out", "--allow-special-tokens")
    (document,) = spec_read(tmp_path / "out_content_document")
    assert tiny_tokenizer.eod in document and tiny_tokenizer.fim_middle in document


def test_no_eod_without_append_eod(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": "x = 1\n"}, {"content": "y = 2\n"}])
    run_tool(tiny_tokenizer_path, [path], tmp_path / "out")
    assert spec_read(tmp_path / "out_content_document") == [
        tiny_tokenizer.encode("x = 1\n"),
        tiny_tokenizer.encode("y = 2\n"),
    ]


def test_several_json_keys_give_one_output_each(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"content": "a = 1", "docstring": "adds"}, {"content": "b", "docstring": "x"}]
    )
    argv = [
        "--input",
        str(path),
        "--output-prefix",
        str(tmp_path / "out"),
        "--json-keys",
        "content",
        "docstring",
    ]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tiny_tokenizer_path), "--quiet"]
    preprocess.run(preprocess.parse_args(argv))
    assert spec_read(tmp_path / "out_docstring_document") == [
        tiny_tokenizer.encode("adds"),
        tiny_tokenizer.encode("x"),
    ]
    assert spec_read(tmp_path / "out_content_document")[0] == tiny_tokenizer.encode("a = 1")


# ---------------------------------------------------------------------------------------------------------
# Input formats and workers


def test_workers_one_and_two_give_identical_files(tmp_path, demo_corpus_path, tiny_tokenizer_path):
    for workers in (1, 2):
        run_tool(
            tiny_tokenizer_path,
            [demo_corpus_path],
            tmp_path / f"w{workers}",
            "--append-eod",
            "--workers",
            workers,
            "--chunk-mb",
            "0.1",
        )
    assert read_bytes(tmp_path / "w1_content_document") == read_bytes(tmp_path / "w2_content_document")


def test_gzip_and_parquet_inputs_match_jsonl(tmp_path, demo_corpus_path, tiny_tokenizer_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = Path(demo_corpus_path).read_bytes()
    (tmp_path / "in.jsonl.gz").write_bytes(gzip.compress(raw))
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    table = pa.table({"content": [r["content"] for r in records], "path": [r["path"] for r in records]})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    run_tool(tiny_tokenizer_path, [demo_corpus_path], tmp_path / "plain", "--append-eod")
    run_tool(tiny_tokenizer_path, [tmp_path / "in.jsonl.gz"], tmp_path / "gz", "--append-eod")
    run_tool(
        tiny_tokenizer_path, [tmp_path / "in.parquet"], tmp_path / "pq", "--append-eod", "--chunk-mb", "0.05"
    )
    expected = read_bytes(tmp_path / "plain_content_document")
    assert read_bytes(tmp_path / "gz_content_document") == expected
    assert read_bytes(tmp_path / "pq_content_document") == expected


def test_megatron_flags_are_accepted(tmp_path, tiny_tokenizer_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "print(1)\n"}])
    argv = [
        "--input",
        str(path),
        "--output-prefix",
        str(tmp_path / "out"),
        "--tokenizer-type",
        "TokenizerFromFile",
    ]
    argv += [
        "--tokenizer-file",
        str(tiny_tokenizer_path),
        "--append-eod",
        "--workers",
        "1",
        "--partitions",
        "1",
    ]
    argv += ["--log-interval", "10", "--keep-newlines", "--dataset-impl", "mmap", "--lang", "english"]
    assert preprocess.main(argv) == 0
    assert (tmp_path / "out_text_document.idx").is_file()  # --json-keys defaults to text


# ---------------------------------------------------------------------------------------------------------
# StarCoder metadata


def test_metadata_prefix_uses_special_ids(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    record = {
        "content": "x = 1\n",
        "max_stars_repo_name": "org/repo",
        "max_stars_repo_path": "src/a.py",
        "max_stars_count": 42.0,
    }
    path = write_jsonl(tmp_path / "in.jsonl", [record])
    run_tool(
        tiny_tokenizer_path,
        [path],
        tmp_path / "out",
        "--append-eod",
        "--add-metadata",
        "--metadata-probability",
        "1",
    )
    (document,) = spec_read(tmp_path / "out_content_document")
    t = tiny_tokenizer
    expected = [
        t.token_to_id("<reponame>"),
        *t.encode("org/repo"),
        t.token_to_id("<filename>"),
        *t.encode("src/a.py"),
    ]
    expected += [t.token_to_id("<gh_stars>"), *t.encode("42\nx = 1\n"), t.eod]
    assert document == expected


def test_metadata_is_seeded_per_document_and_independent_of_workers(
    tmp_path, demo_corpus_path, tiny_tokenizer_path, tiny_tokenizer
):
    outputs = []
    for workers, seed in ((1, 7), (2, 7), (1, 8)):
        prefix = tmp_path / f"w{workers}s{seed}"
        run_tool(
            tiny_tokenizer_path,
            [demo_corpus_path],
            prefix,
            "--add-metadata",
            "--seed",
            seed,
            "--workers",
            workers,
            "--chunk-mb",
            "0.1",
        )
        outputs.append(read_bytes(f"{prefix}_content_document"))
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]
    markers = {tiny_tokenizer.token_to_id(m) for m in ("<reponame>", "<filename>", "<gh_stars>")}
    documents = spec_read(tmp_path / "w1s7_content_document")
    assert any(markers & set(d) for d in documents) and not all(markers & set(d) for d in documents)


def test_metadata_draw_rate():
    draws = preprocess._uniform(1234, np.arange(20000), 0)
    assert abs((draws < 0.2).mean() - 0.2) < 0.015  # 5 sigma for n=20000
    assert not np.array_equal(draws, preprocess._uniform(1234, np.arange(20000), 1))


# ---------------------------------------------------------------------------------------------------------
# Bad input


BAD_LINES = [
    ({"content": "good = 1\n"}, None),
    ('{"content": "unterminated', "malformed JSON"),
    ({"text": "no content key"}, "missing key 'content'"),
    ({"content": 5}, "'content' is int, not a string"),
    ({"content": None}, "'content' is NoneType, not a string"),
    ('{"content": "lone \\ud800 surrogate"}', "lone surrogate"),
    ({"content": ""}, "empty document"),
    ("[1, 2]", "malformed JSON"),
    ({"content": "also good\n"}, None),
]


def test_bad_lines_are_skipped_counted_and_named(tmp_path, tiny_tokenizer_path, tiny_tokenizer, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES])
    with open(path, "ab") as stream:
        stream.write(b'{"content": "bad \xff utf8"}\n')
    summary = run_tool(tiny_tokenizer_path, [path], tmp_path / "out", "--append-eod")
    assert summary.documents == 2
    assert dict(summary.skipped) == {
        "malformed_json": 2,
        "missing_key": 1,
        "not_string": 2,
        "invalid_utf8": 2,
        "empty": 1,
    }
    errors = capsys.readouterr().err
    for number, (_, problem) in enumerate(BAD_LINES, start=1):
        if problem is not None:
            assert f"{path}:{number}: " in errors and problem in errors
    assert f"{path}:{len(BAD_LINES) + 1}: invalid UTF-8" in errors
    assert "skipped lines: 8" in "\n".join(summary.lines())
    assert spec_read(tmp_path / "out_content_document") == [
        tiny_tokenizer.encode("good = 1\n") + [tiny_tokenizer.eod],
        tiny_tokenizer.encode("also good\n") + [tiny_tokenizer.eod],
    ]


def test_strict_fails_at_first_bad_line(tmp_path, tiny_tokenizer_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [line for line, _ in BAD_LINES])
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        run_tool(tiny_tokenizer_path, [path], tmp_path / "out", "--strict", "--workers", "2")
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_main_reports_errors_with_exit_status_2(tmp_path, tiny_tokenizer_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"content": 1}])
    argv = [
        "--input",
        str(path),
        "--output-prefix",
        str(tmp_path / "out"),
        "--json-keys",
        "content",
        "--strict",
    ]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tiny_tokenizer_path)]
    with pytest.raises(SystemExit) as exit_info:
        preprocess.main(argv)
    assert exit_info.value.code == 2
    assert f"{path}:1: 'content' is int, not a string" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.gz"])
def test_empty_input_file_is_an_error_naming_it(tmp_path, tiny_tokenizer_path, name):
    path = tmp_path / name
    path.write_bytes(gzip.compress(b"") if name.endswith(".gz") else b"")
    with pytest.raises(ValueError, match=rf"{path}: input file is empty"):
        run_tool(tiny_tokenizer_path, [path], tmp_path / "out")


def test_missing_input_is_an_error_naming_it(tmp_path, tiny_tokenizer_path):
    with pytest.raises(ValueError, match="nothere.jsonl: no such file"):
        run_tool(tiny_tokenizer_path, [tmp_path / "nothere.jsonl"], tmp_path / "out")


def test_all_lines_bad_writes_nothing(tmp_path, tiny_tokenizer_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(ValueError, match="no valid documents"):
        run_tool(tiny_tokenizer_path, [path], tmp_path / "out")
    assert os.listdir(tmp_path) == ["bad.jsonl"]


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_run_leaves_no_complete_looking_output(
    tmp_path, demo_corpus_path, tiny_tokenizer_path, monkeypatch, workers
):
    calls = []
    original = preprocess.IndexedDatasetWriter.add_documents

    def interrupt_on_second_chunk(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, tokens, lengths)

    monkeypatch.setattr(preprocess.IndexedDatasetWriter, "add_documents", interrupt_on_second_chunk)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_tool(
            tiny_tokenizer_path, [demo_corpus_path], out / "data", "--workers", workers, "--chunk-mb", "0.05"
        )
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------------------
# Merge


def test_merge_tool_concatenates_outputs(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    first = write_jsonl(tmp_path / "a.jsonl", [{"content": "a = 1\n"}, {"content": "b = 2\n"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"content": "c = 3\n"}])
    run_tool(tiny_tokenizer_path, [first], tmp_path / "parts" / "a", "--append-eod")
    run_tool(tiny_tokenizer_path, [second], tmp_path / "parts" / "b", "--append-eod")
    merge_tool.main(["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "merged")])
    expected = [
        tiny_tokenizer.encode(text) + [tiny_tokenizer.eod] for text in ("a = 1\n", "b = 2\n", "c = 3\n")
    ]
    spec_write(tmp_path / "spec", expected, np.uint16)
    assert read_bytes(tmp_path / "merged") == read_bytes(tmp_path / "spec")
    merge_tool.main(
        [
            "--input",
            str(tmp_path / "parts" / "b_content_document"),
            str(tmp_path / "merged"),
            "--output-prefix",
            str(tmp_path / "again"),
        ]
    )
    assert spec_read(tmp_path / "again") == expected[2:] + expected


def test_merge_tool_rejects_mixed_dtypes(tmp_path, capsys):
    spec_write(tmp_path / "small", [[1, 2]], np.uint16)
    spec_write(tmp_path / "wide", [[70000]], np.int32)
    with pytest.raises(SystemExit):
        merge_tool.main(
            [
                "--input",
                str(tmp_path / "small"),
                str(tmp_path / "wide"),
                "--output-prefix",
                str(tmp_path / "m"),
            ]
        )
    assert "different token dtypes" in capsys.readouterr().err
    assert not (tmp_path / "m.idx").exists()


def test_gpt2_vocab_and_merges_files(tmp_path, tiny_tokenizer_path):
    from megatron.data.tokenizer import build_tokenizer

    config = json.loads(Path(tiny_tokenizer_path).read_text(encoding="utf-8"))
    (tmp_path / "vocab.json").write_text(json.dumps(config["model"]["vocab"]), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in config["model"]["merges"]]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    files = {"vocab_file": str(tmp_path / "vocab.json"), "merge_file": str(tmp_path / "merges.txt")}
    tokenizer = build_tokenizer("GPT2BPETokenizer", **files)
    path = write_jsonl(tmp_path / "in.jsonl", [{"content": text} for text in TRICKY])
    argv = [
        "--input",
        str(path),
        "--output-prefix",
        str(tmp_path / "out"),
        "--json-keys",
        "content",
        "--quiet",
    ]
    argv += ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", files["vocab_file"]]
    argv += ["--merge-file", files["merge_file"], "--append-eod"]
    summary = preprocess.run(preprocess.parse_args(argv))
    if _gigatoken_available():
        assert summary.engine.startswith("gigatoken"), summary.engine
    assert spec_read(tmp_path / "out_content_document") == [
        tokenizer.encode(t) + [tokenizer.eod] for t in TRICKY
    ]


def test_characters_newer_than_tokenizers_tables_go_to_the_reference(tiny_tokenizer_path, tiny_tokenizer):
    pytest.importorskip("gigatoken")
    args = preprocess.parse_args(
        [
            "--input",
            "x",
            "--output-prefix",
            "y",
            "--tokenizer-type",
            "TokenizerFromFile",
            "--tokenizer-file",
            str(tiny_tokenizer_path),
        ]
    )
    kwargs = {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": str(tiny_tokenizer_path)}
    spec, _ = preprocess.select_engine(args, tiny_tokenizer, kwargs, [])
    engine = preprocess.make_engine(spec, parallel=False)
    texts = ["plain", "new letter \ua7cf here", "x\u00b2 + y\u00b2", "caf\u00e9"]
    _, group_sizes, reference_rows = engine._pieces(texts)
    assert reference_rows == [1]
    assert group_sizes.tolist() == [1, 1, 4, 1]  # "x", "\u00b2", " + y", "\u00b2" split out
    flat, counts = engine.encode(texts)
    assert np.split(flat, np.cumsum(counts)[:-1])[1].tolist() == tiny_tokenizer.encode(texts[1])
    assert flat.tolist() == [t for text in texts for t in tiny_tokenizer.encode(text)]


def test_chunks_without_valid_lines_are_fine(tmp_path, tiny_tokenizer_path, tiny_tokenizer):
    path = write_jsonl(
        tmp_path / "in.jsonl", [{"content": "a = 1\n"}, {"content": ""}, "{", {"content": "b\n"}]
    )
    # A 10-byte chunk size puts every line in its own chunk, so some chunks have no documents.
    summary = run_tool(
        tiny_tokenizer_path,
        [path],
        tmp_path / "out",
        "--add-metadata",
        "--append-eod",
        "--chunk-mb",
        "0.00001",
    )
    assert summary.documents == 2 and sum(summary.skipped.values()) == 2
    assert len(spec_read(tmp_path / "out_content_document")) == 2
