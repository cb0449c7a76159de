"""tools/make_demo_corpus.py and tools/train_tokenizer.py: output shape, determinism, recipe, bad input."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer as Backend

from megatron.data.tokenizer import STARCODER_SPECIAL_TOKENS
from tests.helpers import load_tool

make_demo_corpus = load_tool("make_demo_corpus")
train_tokenizer = load_tool("train_tokenizer")

STACK_FIELDS = {"content", "lang", "path", "size", "ext", "hexsha", "max_stars_repo_name", "max_stars_count"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def source_tree(tmp_path) -> Path:
    root = tmp_path / "project"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "b.py").write_text("print('b')\n", encoding="utf-8")
    (root / "a.py").write_text("x = 'é😀'\n", encoding="utf-8")
    (root / "pkg" / "z.py").write_text("z = 1\n", encoding="utf-8")
    (root / "pkg" / "c.c").write_text("int main(void) { return 0; }\n", encoding="utf-8")
    (root / "pkg" / "latin1.py").write_bytes(b"s = '\xe9'\n")
    (root / "pkg" / "empty.py").write_text("", encoding="utf-8")
    (root / "pkg" / "big.py").write_text("#" * 5000 + "\n", encoding="utf-8")
    (root / "pkg" / "__pycache__" / "cached.py").write_text("no = 1\n", encoding="utf-8")
    (root / "site-packages" / "installed.py").write_text("no = 2\n", encoding="utf-8")
    return root


def test_demo_corpus_records_have_the_stacks_shape(source_tree, tmp_path, capsys):
    output = tmp_path / "out" / "corpus.jsonl"
    assert (
        make_demo_corpus.main([str(source_tree), "--output", str(output), "--max-bytes-per-file", "1000"])
        == 0
    )
    records = read_jsonl(output)
    assert [record["path"] for record in records] == ["a.py", "b.py", "pkg/z.py"]
    first = records[0]
    assert set(first) >= STACK_FIELDS
    assert first["content"] == "x = 'é😀'\n"
    assert first["size"] == len(first["content"].encode("utf-8"))
    assert (first["lang"], first["ext"], first["max_stars_repo_name"]) == ("Python", "py", "local/project")
    summary = capsys.readouterr().out
    assert "wrote 3 files" in summary
    assert (
        "1 not valid UTF-8" in summary
        and "1 empty" in summary
        and "1 larger than --max-bytes-per-file" in summary
    )
    assert sorted(p.name for p in output.parent.iterdir()) == ["corpus.jsonl"]  # no temporary left behind


def test_demo_corpus_extensions_and_max_files(source_tree, tmp_path):
    output = tmp_path / "corpus.jsonl"
    argv = [str(source_tree), "--output", str(output), "--extensions", "c", ".py", "--max-files", "4"]
    assert make_demo_corpus.main(argv) == 0
    records = read_jsonl(output)
    assert [record["path"] for record in records] == ["a.py", "b.py", "pkg/big.py", "pkg/c.c"]
    assert records[3]["lang"] == "C"


def test_demo_corpus_defaults_to_the_standard_library_deterministically(demo_corpus_path, tmp_path):
    again = tmp_path / "again.jsonl"
    assert make_demo_corpus.main(["--output", str(again), "--max-files", "60"]) == 0
    assert again.read_bytes() == demo_corpus_path.read_bytes()
    records = read_jsonl(demo_corpus_path)
    assert len(records) == 60
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all((stdlib / record["path"]).is_file() for record in records)
    assert not any("site-packages" in record["path"] for record in records)


def test_demo_corpus_rejects_a_missing_directory(tmp_path, capsys):
    output = tmp_path / "corpus.jsonl"
    assert make_demo_corpus.main([str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not output.exists()


def test_trained_tokenizer_follows_the_starcoder_recipe(tiny_tokenizer_path):
    configuration = json.loads(tiny_tokenizer_path.read_text(encoding="utf-8"))
    added = [(token["id"], token["content"], token["special"]) for token in configuration["added_tokens"]]
    assert added == [(i, token, True) for i, token in enumerate(STARCODER_SPECIAL_TOKENS)]
    assert configuration["model"]["type"] == "BPE"
    assert configuration["decoder"]["type"] == "ByteLevel"
    digits, byte_level = configuration["pre_tokenizer"]["pretokenizers"]
    assert digits == {"type": "Digits", "individual_digits": True}
    assert byte_level["type"] == "ByteLevel" and byte_level["add_prefix_space"] is False
    backend = Backend.from_file(str(tiny_tokenizer_path))
    text = "  x = 42 != 'é😀' .\n"
    assert backend.decode(backend.encode(text).ids) == text


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


BAD_LINES = [
    json.dumps({"content": "def ok():\n    return 1\n"}),
    "{not json",
    json.dumps({"text": "wrong key"}),
    json.dumps({"content": 3}),
    '{"content": "\\ud800 lone surrogate"}',
    json.dumps({"content": ""}),
    json.dumps(["a list"]),
]


def test_bad_lines_are_skipped_and_counted(tmp_path, capsys):
    source = write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    with source.open("ab") as file:
        file.write(b'{"content": "latin-1 \xe9"}\n')
    output = tmp_path / "tokenizer.json"
    argv = ["--input", str(source), "--output", str(output), "--vocab-size", "300", "--quiet"]
    assert train_tokenizer.main(argv) == 0
    summary = capsys.readouterr().out
    assert "trained on 1 documents" in summary
    for reason in [
        "1 malformed JSON",
        "1 missing key 'content'",
        "1 key 'content' is int",
        "2 invalid UTF-8",
    ]:
        assert reason in summary
    assert "1 empty document" in summary and "1 not a JSON object" in summary
    assert Backend.from_file(str(output)).token_to_id("<reponame>") == 18


@pytest.mark.parametrize(
    "line_number, message",
    [(2, "malformed JSON"), (3, "missing key 'content'"), (5, "invalid UTF-8 (lone surrogate")],
)
def test_strict_fails_on_the_first_bad_line(tmp_path, capsys, line_number, message):
    good = BAD_LINES[:1] * (line_number - 1)
    source = write_lines(tmp_path / "bad.jsonl", [*good, BAD_LINES[line_number - 1], *BAD_LINES[1:]])
    output = tmp_path / "tokenizer.json"
    argv = ["--input", str(source), "--output", str(output), "--vocab-size", "300", "--quiet", "--strict"]
    assert train_tokenizer.main(argv) == 2
    assert f"bad.jsonl:{line_number}: {message}" in capsys.readouterr().err
    assert not output.exists()


def test_json_key_max_documents_and_several_inputs(tmp_path, capsys):
    first = write_lines(tmp_path / "one.jsonl", [json.dumps({"text": f"alpha_{i} = {i}"}) for i in range(5)])
    second = write_lines(tmp_path / "two.jsonl", [json.dumps({"text": "beta = 2"})])
    output = tmp_path / "tokenizer.json"
    argv = ["--input", str(first), str(second), "--output", str(output), "--vocab-size", "300", "--quiet"]
    assert train_tokenizer.main([*argv, "--json-key", "text", "--max-documents", "3"]) == 0
    assert "trained on 3 documents" in capsys.readouterr().out
    assert train_tokenizer.main([*argv, "--json-key", "text"]) == 0
    assert "trained on 6 documents" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vocab-size", "100"], "--vocab-size 100 is too small"),
        (["--vocab-size", "300", "--max-documents", "0"], "--max-documents must be at least 1"),
        (["--vocab-size", "300", "--json-key", "missing"], "no usable documents with key 'missing'"),
    ],
)
def test_bad_arguments(tmp_path, capsys, extra, message):
    source = write_lines(tmp_path / "in.jsonl", BAD_LINES[:1])
    output = tmp_path / "tokenizer.json"
    assert train_tokenizer.main(["--input", str(source), "--output", str(output), "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_missing_input_file_is_named(tmp_path, capsys):
    argv = [
        "--input",
        str(tmp_path / "absent.jsonl"),
        "--output",
        str(tmp_path / "t.json"),
        "--vocab-size",
        "300",
    ]
    assert train_tokenizer.main(argv) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_progress_bar_is_shown_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    source = write_lines(tmp_path / "in.jsonl", BAD_LINES[:1])
    argv = ["--input", str(source), "--output", str(tmp_path / "t.json"), "--vocab-size", "300"]
    assert train_tokenizer.main(argv) == 0
    assert "reading" not in capsys.readouterr().err  # not a terminal: logs stay free of bars
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert train_tokenizer.main(argv) == 0
    assert "reading" in capsys.readouterr().err
    assert train_tokenizer.main([*argv, "--no-progress"]) == 0
    assert "reading" not in capsys.readouterr().err


@pytest.mark.parametrize("tool", [make_demo_corpus, train_tokenizer])
def test_help(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    assert "--output" in capsys.readouterr().out
