"""Benchmark: attribution search index build throughput, bytes per token, query latency, and the
projected size and build time of an index over 1e12 tokens.

By default the corpus is this interpreter's standard library (tools/make_demo_corpus.py) tokenized with
a 4,096-token tokenizer trained on it, both in a temporary directory; ``--data-path PREFIX
--tokenizer-file F`` measures a real dataset instead. Queries: 200 spans of 200 tokens taken from
training documents (all must be found) and 200 of random tokens (none may be), timed one at a time.
The projection is linear in tokens (the build is one pass over the tokens plus a bucketed sort, both
linear; the sketch's filter is sized by its n-gram count), for one process; datasets index in parallel
on separate processes. Sizes are compared with the token data itself (2 bytes per token, uint16).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import numpy as np

from megatron.attribution.index import SearchIndex, build_index, index_bytes
from megatron.data.tokenizer import build_tokenizer

PROJECTED_TOKENS = 1e12
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_tool_{name}", os.path.join(REPO_ROOT, "tools", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_dataset(directory: str, max_files: int | None) -> tuple[str, str]:
    """(dataset prefix, tokenizer.json) of the standard library."""
    corpus, tokenizer = os.path.join(directory, "corpus.jsonl"), os.path.join(directory, "tokenizer.json")
    files = [] if max_files is None else ["--max-files", str(max_files)]
    load_tool("make_demo_corpus").main(["--output", corpus, *files])
    load_tool("train_tokenizer").main(
        ["--input", corpus, "--output", tokenizer, "--vocab-size", "4096", "--quiet"]
    )
    prefix = os.path.join(directory, "stdlib")
    argv = ["--input", corpus, "--output-prefix", prefix, "--json-keys", "content", "--append-eod"]
    argv += [
        "--tokenizer-type",
        "TokenizerFromFile",
        "--tokenizer-file",
        tokenizer,
        "--workers",
        "2",
        "--quiet",
    ]
    load_tool("preprocess_data").main(argv)
    return prefix + "_content_document", tokenizer


def time_queries(index: SearchIndex, queries, method: str) -> tuple[float, int]:
    """(ms per query, queries with a result)."""
    found = 0
    start = time.perf_counter()
    for query in queries:
        result = index.find(query)[0] if method == "exact" else index.membership(query)
        found += bool(result)
    return (time.perf_counter() - start) * 1e3 / len(queries), found


def queries(index: SearchIndex, count: int, length: int, seed: int):
    stream, rng = index.streams[0], np.random.default_rng(seed)
    lengths = np.diff(stream.doc_starts)
    eligible = np.flatnonzero(lengths >= length)
    inside = []
    for document in rng.choice(eligible, count).tolist():
        start = int(stream.doc_starts[document] + rng.integers(0, lengths[document] - length + 1))
        inside.append(np.asarray(stream.tokens[start : start + length], dtype=np.int64))
    vocab = int(index.manifest["datasets"][0]["max_token_id"]) + 1
    outside = [rng.integers(0, vocab, length) for _ in range(count)]
    return inside, outside


def report(name: str, tokens: int, seconds: float, size: int) -> None:
    rate, per_token = tokens / seconds, size / tokens
    print(
        f"{name}: build {rate / 1e6:,.1f} M tokens/s, {per_token:.3f} bytes/token "
        f"({per_token / 2:.1%} of the uint16 token data); 1e12 tokens: "
        f"{per_token * PROJECTED_TOKENS / 1e12:,.2f} TB, {PROJECTED_TOKENS / rate / 3600:,.1f} h on one process"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data-path", default=None, help="dataset prefix (default: the standard library)")
    parser.add_argument("--tokenizer-file", default=None, help="its tokenizer (recorded in the index)")
    parser.add_argument("--quick", action="store_true", help="300 files of the standard library")
    parser.add_argument("--min-tokens", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        prefix, tokenizer_path = args.data_path, args.tokenizer_file
        if prefix is None:
            prefix, tokenizer_path = make_dataset(directory, 300 if args.quick else None)
        tokenizer = (
            None
            if tokenizer_path is None
            else build_tokenizer("TokenizerFromFile", tokenizer_file=tokenizer_path)
        )
        timings = {}
        for mode in ("exact", "sketch"):
            output = os.path.join(directory, f"index-{mode}")
            start = time.perf_counter()
            manifest = build_index(
                [prefix], output, min_tokens=args.min_tokens, mode=mode, tokenizer=tokenizer,
                tokenizer_path=tokenizer_path, progress=False,
            )  # fmt: skip
            timings[mode] = (time.perf_counter() - start, index_bytes(output, mode))
        tokens = manifest["datasets"][0]["tokens"]
        print(f"corpus: {tokens:,} tokens, {manifest['datasets'][0]['documents']:,} documents ({prefix})")
        for mode, (seconds, size) in timings.items():
            report(mode, tokens, seconds, size)
        index = SearchIndex(os.path.join(directory, "index-exact"))
        sketch_index = SearchIndex(os.path.join(directory, "index-sketch"))
        inside, outside = queries(index, 200, 200, seed=0)
        for name, searched, method in (("exact", index, "exact"), ("sketch", sketch_index, "sketch")):
            hit_ms, hits = time_queries(searched, inside, method)
            miss_ms, false_hits = time_queries(searched, outside, method)
            print(
                f"{name} query (200 tokens): {hit_ms:.2f} ms when present ({hits}/200 found), "
                f"{miss_ms:.2f} ms when absent ({false_hits}/200 reported)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
