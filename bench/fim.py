"""FIM throughput: ours vs a straightforward port of BigCode's `permute`, measured in the same run.

Both transform the same 8192-token packed samples of real code (the standard library's .py files
encoded with a StarCoder-recipe tokenizer, windows of seq_length + 1 tokens cut from the stream) with the
same draws, in one process (one loader worker). The port decodes each chosen segment, cuts it and
re-encodes every piece in full with the tokenizer's `encode`, as BigCode's Megatron did; ours re-encodes
only around the cuts. Every output of ours is checked token for token against the port's.

    python bench/fim.py            # ~8 MB of code, 200 samples
    python bench/fim.py --quick    # ~2 MB, 60 samples
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron.data.fim import FIMTransform, sample_rng, undecodable_edges
from megatron.data.tokenizer import build_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


def read_code(max_bytes: int) -> list[str]:
    """The standard library's .py files in sorted order, up to `max_bytes` of UTF-8 text."""
    documents, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text:
            documents.append(text)
            total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return documents


def train_tokenizer(documents: list[str], vocab_size: int, directory: Path) -> Path:
    """A StarCoder-recipe tokenizer.json trained with tools/train_tokenizer.py on `documents`."""
    corpus = directory / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as file:
        for text in documents:
            file.write(json.dumps({"content": text}) + "\n")
    spec = importlib.util.spec_from_file_location(
        "train_tokenizer", REPO_ROOT / "tools" / "train_tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = directory / "tokenizer.json"
    argv = ["--input", str(corpus), "--output", str(output), "--vocab-size", str(vocab_size), "--quiet"]
    if module.main(argv) != 0:
        raise SystemExit("tokenizer training failed")
    return output


def bigcode_permute(
    sample: np.ndarray, rng, tokenizer, transform: FIMTransform, fim_rate: float, spm_rate: float
):
    """Port of BigCode's per-segment `permute`: decode the segment, cut, re-encode each piece in full.

    Same draw order as ours; decoding is lossless and keeps partial characters at the edges (the rule of
    fim.md), so outputs can be compared token for token.
    """
    eod, pieces, start = tokenizer.eod, [], 0
    for end in [*np.flatnonzero(sample == eod).tolist(), len(sample)]:
        segment = sample[start:end]
        if len(segment) and rng.random() < fim_rate:
            lead, tail = undecodable_edges(segment, transform.token_bytes, transform.is_special)
            contents = tokenizer.decode(segment[lead : len(segment) - tail])
            low, high = sorted(rng.integers(0, len(contents) + 1, size=2).tolist())
            prefix = segment[:lead].tolist() + tokenizer.encode(contents[:low])
            middle = tokenizer.encode(contents[low:high])
            suffix = tokenizer.encode(contents[high:]) + segment[len(segment) - tail :].tolist()
            if rng.random() < spm_rate:
                segment = [
                    tokenizer.fim_prefix,
                    tokenizer.fim_suffix,
                    *suffix,
                    tokenizer.fim_middle,
                    *prefix,
                    *middle,
                ]
            else:
                segment = [
                    tokenizer.fim_prefix,
                    *prefix,
                    tokenizer.fim_suffix,
                    *suffix,
                    tokenizer.fim_middle,
                    *middle,
                ]
        pieces.extend(segment)
        if end < len(sample):
            pieces.append(eod)
        start = end + 1
    pieces = pieces[: len(sample)]
    return np.array(pieces + [tokenizer.fim_pad] * (len(sample) - len(pieces)), dtype=np.int64)


def time_pass(function, samples) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    outputs = [function(sample, sample_rng(1234, "bench", index)) for index, sample in enumerate(samples)]
    return time.perf_counter() - start, outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus and 60 samples (about 30 s)")
    parser.add_argument(
        "--tokenizer-file", default=None, help="use this tokenizer.json instead of training one"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the trained tokenizer")
    parser.add_argument(
        "--corpus-mb", type=float, default=None, help="MB of stdlib code (default 8; 2 with --quick)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="samples (default 200; 60 with --quick)"
    )
    parser.add_argument("--seq-length", type=int, default=8192, help="tokens per sample (default 8192)")
    parser.add_argument("--fim-rate", type=float, default=0.5, help="FIM rate (default 0.5)")
    parser.add_argument("--fim-spm-rate", type=float, default=0.5, help="SPM share (default 0.5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each side; best is kept")
    return parser


def make_samples(tokenizer, documents: list[str], num_samples: int, seq_length: int) -> list[np.ndarray]:
    stream = []
    for ids in tokenizer.encode_batch(documents):
        stream += ids + [tokenizer.eod]
    stream = np.array(stream, dtype=np.int64)
    if len(stream) <= seq_length + 1:
        raise SystemExit(f"corpus too small: {len(stream)} tokens for samples of {seq_length + 1}")
    starts = np.random.default_rng(0).integers(0, len(stream) - seq_length - 1, size=num_samples)
    return [stream[start : start + seq_length + 1] for start in starts]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    corpus_mb = args.corpus_mb or (2.0 if args.quick else 8.0)
    num_samples = args.num_samples or (60 if args.quick else 200)
    documents = read_code(int(corpus_mb * 1e6))
    with tempfile.TemporaryDirectory() as directory:
        path = args.tokenizer_file or train_tokenizer(documents, args.vocab_size, Path(directory))
        tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=str(path))
    samples = make_samples(tokenizer, documents, num_samples, args.seq_length)
    ours = FIMTransform(tokenizer, fim_rate=args.fim_rate, fim_spm_rate=args.fim_spm_rate)
    print(f"{len(documents)} files, {num_samples} samples of {args.seq_length + 1} tokens, {tokenizer.name}")
    print(f"fast path active: {ours.fast}")

    def port(sample, rng):
        return bigcode_permute(sample, rng, tokenizer, ours, args.fim_rate, args.fim_spm_rate)

    port_time = ours_time = float("inf")
    for _ in range(args.repeats):
        elapsed, port_outputs = time_pass(port, samples)
        port_time = min(port_time, elapsed)
        elapsed, our_outputs = time_pass(ours, samples)
        ours_time = min(ours_time, elapsed)
    identical = sum(np.array_equal(a, b) for a, b in zip(port_outputs, our_outputs))
    num_tokens = num_samples * args.seq_length
    port_rate, our_rate = num_tokens / port_time, num_tokens / ours_time
    print(f"BigCode permute port: {port_rate / 1e6:8.3f} M tokens/s")
    print(f"ours:                 {our_rate / 1e6:8.3f} M tokens/s")
    print(f"ratio: {our_rate / port_rate:.1f}x (target >= 5x)")
    print(f"token-identical to the full re-encode: {identical}/{num_samples} samples")
    return 0 if identical == num_samples else 1


if __name__ == "__main__":
    sys.exit(main())
