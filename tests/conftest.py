"""Session-wide fixtures shared by every test: a tiny code corpus and a tokenizer trained on it.

Other test files depend on these names; keep them stable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# W&B never goes online from a test (nor probes the network): the runs the tests start inherit it too
os.environ.setdefault("WANDB_MODE", "offline")
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.helpers import load_tool  # noqa: E402 - needs the repository root on sys.path first

DEMO_CORPUS_NUM_FILES = 60
TINY_VOCAB_SIZE = 1024


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run torch on one thread: two cores are shared by the suite, and timings stay comparable."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo_corpus_path(tmp_path_factory) -> Path:
    """JSONL (The Stack's shape, key `content`) of the first 60 .py files of the standard library."""
    path = tmp_path_factory.mktemp("demo_corpus") / "demo.jsonl"
    argv = ["--output", str(path), "--max-files", str(DEMO_CORPUS_NUM_FILES)]
    assert load_tool("make_demo_corpus").main(argv) == 0
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory, demo_corpus_path) -> Path:
    """tokenizer.json (StarCoder recipe, vocabulary 1024) trained on `demo_corpus_path`."""
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.json"
    argv = [
        "--input",
        str(demo_corpus_path),
        "--output",
        str(path),
        "--vocab-size",
        str(TINY_VOCAB_SIZE),
        "--quiet",
    ]
    assert load_tool("train_tokenizer").main(argv) == 0
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    """The `Tokenizer` built from `tiny_tokenizer_path` (TokenizerFromFile, padded to a multiple of 128)."""
    from megatron.data.tokenizer import build_tokenizer

    return build_tokenizer("TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path))


@pytest.fixture(scope="session")
def tiny_dataset_prefix(tmp_path_factory, demo_corpus_path, tiny_tokenizer_path) -> str:
    """`demo_corpus_path` preprocessed with the tiny tokenizer (EOD appended); the dataset prefix."""
    prefix = str(tmp_path_factory.mktemp("tiny_dataset") / "demo")
    argv = ["--input", str(demo_corpus_path), "--output-prefix", prefix, "--json-keys", "content"]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tiny_tokenizer_path)]
    argv += ["--append-eod", "--workers", "1", "--quiet"]
    assert load_tool("preprocess_data").main(argv) == 0
    return prefix + "_content_document"
