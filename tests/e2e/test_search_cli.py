"""tools/build_search_index.py and tools/search_data.py as a user runs them: a search for code copied
from a training file names that file's document, offset and source metadata; new code prints nothing;
merged datasets keep their metadata; a missing or stale index, another tokenizer or too short a
--min-tokens exit with status 2 and a message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e.runs import launch_env
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def _tool(name: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *map(str, args)]
    return subprocess.run(command, env=launch_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_dataset_prefix):
    """A copy of the tiny dataset (tests here rewrite it) with its metadata sidecar."""
    directory = tmp_path_factory.mktemp("search_cli")
    for suffix in (".bin", ".idx", ".meta.jsonl", ".meta.offsets"):
        shutil.copyfile(tiny_dataset_prefix + suffix, str(directory / "data") + suffix)
    return str(directory / "data")


@pytest.fixture(scope="module")
def index(dataset, tiny_tokenizer_path):
    output = dataset + "-index"
    result = _tool(
        "build_search_index", "--data-path", dataset, "--output", output, "--tokenizer-file",
        tiny_tokenizer_path, "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "bytes/token" in result.stdout and result.stderr == ""
    return output


def _training_excerpt(demo_corpus_path, document: int) -> tuple[str, str]:
    record = json.loads(demo_corpus_path.read_text(encoding="utf-8").splitlines()[document])
    lines = record["content"].splitlines(keepends=True)
    return "".join(lines[10:70]), record["max_stars_repo_path"]


def test_copied_code_names_its_document_and_source(index, demo_corpus_path, tmp_path):
    excerpt, path = _training_excerpt(demo_corpus_path, 5)
    generated = tmp_path / "generated.py"
    generated.write_text(excerpt, encoding="utf-8")
    result = _tool("search_data", "--index", index, "--file", generated)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0].split(" ", 6)
    assert first[:2] == ["document", "5"] and first[2] == "offset" and first[4] == "length"
    assert int(first[5]) >= 50
    assert json.loads(first[6])["max_stars_repo_path"] == path
    as_json = json.loads(_tool("search_data", "--index", index, "--file", generated, "--json").stdout)
    assert as_json["matches"][0]["document"] == 5 and as_json["matches"][0]["length"] == int(first[5])
    sketch = _tool("search_data", "--index", index, "--file", generated, "--mode", "sketch")
    assert sketch.returncode == 0 and sketch.stdout.startswith("sketch: query tokens")


def test_new_code_prints_nothing(index):
    rng = np.random.default_rng(0)
    text = "\n".join(f"zq_{rng.integers(1 << 30)} = wv_{rng.integers(1 << 30)} * {i}" for i in range(40))
    result = _tool("search_data", "--index", index, "--text", text)
    assert (result.returncode, result.stdout) == (0, "")
    sketch = _tool("search_data", "--index", index, "--text", text, "--mode", "sketch")
    assert sketch.stdout.startswith("sketch: not in the training data")


def test_merged_datasets_keep_their_metadata(dataset, tiny_tokenizer_path, demo_corpus_path, tmp_path):
    merged = str(tmp_path / "merged")
    result = _tool("merge_datasets", "--input", dataset, dataset, "--output-prefix", merged, "--no-progress")
    assert result.returncode == 0, result.stderr
    index = str(tmp_path / "index")
    build = (
        "--data-path",
        merged,
        "--output",
        index,
        "--tokenizer-file",
        tiny_tokenizer_path,
        "--mode",
        "exact",
    )
    assert _tool("build_search_index", *build, "--no-progress").returncode == 0
    excerpt, path = _training_excerpt(demo_corpus_path, 7)
    result = _tool("search_data", "--index", index, "--text", excerpt, "--json")
    matches = json.loads(result.stdout)["matches"]
    assert sorted(m["document"] for m in matches[:2]) == [7, 7 + 60]  # the file and its copy
    assert all(m["metadata"]["max_stars_repo_path"] == path for m in matches[:2])


def test_a_reader_that_stops_early_is_not_an_error(index, demo_corpus_path, tmp_path):
    """`search_data ... | head -1`: the pipe closes before the lines are written; no traceback, status 0."""
    generated = tmp_path / "generated.py"
    generated.write_text(_training_excerpt(demo_corpus_path, 5)[0], encoding="utf-8")
    command = [
        sys.executable,
        str(REPO_ROOT / "tools" / "search_data.py"),
        "--index",
        index,
        "--file",
        generated,
    ]
    process = subprocess.Popen(command, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # closed before the tool writes its first line
    _, stderr = process.communicate(timeout=120)
    assert (process.returncode, stderr.decode()) == (0, "")


def test_user_errors_exit_2_with_a_message(index, dataset, tmp_path, tiny_tokenizer_path):
    """Last in the file: it damages the module's dataset copy to test the stale-index check."""
    missing = _tool("search_data", "--index", tmp_path / "nowhere", "--text", "x")
    assert missing.returncode == 2 and "no search index there" in missing.stderr
    short = _tool("search_data", "--index", index, "--text", "x", "--min-tokens", "10")
    assert short.returncode == 2 and "at least 50 tokens" in short.stderr
    other = tmp_path / "other.json"
    (tmp_path / "t.jsonl").write_text('{"content": "print(1)"}\n{"content": "int x = 2;"}\n')
    trained = _tool(
        "train_tokenizer", "--input", tmp_path / "t.jsonl", "--output", other, "--vocab-size", "300"
    )
    assert trained.returncode == 0, trained.stderr
    wrong = _tool("search_data", "--index", index, "--text", "x", "--tokenizer-file", other)
    assert wrong.returncode == 2 and "vocabulary" in wrong.stderr
    not_index = _tool("build_search_index", "--data-path", dataset, "--output", tmp_path, "--no-progress")
    assert not_index.returncode == 2 and "not a search index" in not_index.stderr
    data = np.fromfile(dataset + ".bin", dtype=np.uint8)
    data[:2] ^= 1
    data.tofile(dataset + ".bin")  # last: the other tests read this dataset
    stale = _tool("search_data", "--index", index, "--text", "x")
    assert stale.returncode == 2 and "stale index" in stale.stderr and "Traceback" not in stale.stderr
