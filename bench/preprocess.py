"""Benchmark: preprocessing end to end (read JSONL, tokenize, write .bin/.idx) against the original design.

The original design (Megatron-LM's and BigCode's ``preprocess_data.py``) reads the JSONL line by line
into a ``multiprocessing.Pool`` that calls Hugging Face ``tokenizers``' ``encode`` once per document,
and the parent adds each document to the indexed-dataset writer. Both run here, in the same process
and with the same worker count, on a corpus of Python files (the .py files of the installed
site-packages, about 170 MB by default), with a StarCoder-recipe tokenizer trained on part of it.
The two outputs must be byte-identical.

    python bench/preprocess.py                # full size (about 170 MB)
    python bench/preprocess.py --quick        # 20 MB
    python bench/preprocess.py --max-mb 50 --workers 2 --vocab-size 49152
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from megatron.data.indexed import IndexedDatasetWriter, best_dtype
from megatron.data.tokenizer import STARCODER_SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    """Import ``tools/<name>.py`` (a script folder, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------
# Corpus and tokenizer (cached)


def _atomic_write_lines(path: Path, lines) -> None:
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as stream:
        for line in lines:
            stream.write(line + "\n")
    os.replace(temporary, path)


def _python_records(source_dir: Path, max_bytes: int):
    total = 0
    for path in sorted(source_dir.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text:
            continue
        relative = path.relative_to(source_dir)
        record = {"content": text, "max_stars_repo_name": relative.parts[0], "path": str(relative)}
        yield json.dumps(record, ensure_ascii=False)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            return


def build_corpus(source_dir: Path, cache_dir: Path, max_mb: float) -> Path:
    """JSONL (key ``content``) of the .py files under ``source_dir`` until ``max_mb`` MB of code."""
    path = cache_dir / f"python_{max_mb:g}mb.jsonl"
    if not path.exists():
        print(f"building corpus {path} from {source_dir} ...", flush=True)
        _atomic_write_lines(path, _python_records(source_dir, int(max_mb * 1e6)))
    return path


def _head_lines(corpus: Path, max_bytes: int):
    total = 0
    with open(corpus, encoding="utf-8") as stream:
        for line in stream:
            yield line.rstrip("\n")
            total += len(line)
            if total >= max_bytes:
                return


def _train_directly(sample: Path, output: Path, vocab_size: int) -> None:
    """The StarCoder recipe with ``tokenizers`` (used when tools/train_tokenizer.py is unavailable)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(STARCODER_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open(sample, encoding="utf-8") as lines:
        tokenizer.train_from_iterator((json.loads(line)["content"] for line in lines), trainer)
    tokenizer.save(str(output))


def build_tokenizer_file(corpus: Path, cache_dir: Path, vocab_size: int, train_mb: float) -> Path:
    """StarCoder-recipe tokenizer trained on the first ``train_mb`` MB of the corpus (cached)."""
    path = cache_dir / f"tokenizer_{corpus.stem}_{vocab_size}_{train_mb:g}mb.json"
    if path.exists():
        return path
    sample = cache_dir / f"train_sample_{train_mb:g}mb.jsonl"
    _atomic_write_lines(sample, _head_lines(corpus, int(train_mb * 1e6)))
    print(f"training a {vocab_size}-token tokenizer on {train_mb:g} MB ...", flush=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}.json")
    try:
        trainer = load_tool("train_tokenizer")
        argv = [
            "--input",
            str(sample),
            "--output",
            str(temporary),
            "--vocab-size",
            str(vocab_size),
            "--quiet",
        ]
        trainer.main(argv)
    except (FileNotFoundError, ImportError, AttributeError, SystemExit) as error:
        print(f"tools/train_tokenizer.py unusable ({error!r}); training directly", flush=True)
        _train_directly(sample, temporary, vocab_size)
    os.replace(temporary, path)
    return path


# ----------------------------------------------------------------------------------------------------------
# The original design: per-document encode in a Pool, one writer call per document

_BASELINE: dict = {}


def _baseline_init(tokenizer_path: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    # Same ids as ours: literal special-token text is ordinary text (this does not change the speed).
    tokenizer.encode_special_tokens = True
    _BASELINE.update(tokenizer=tokenizer, eod=tokenizer.token_to_id("<|endoftext|>"))


def _baseline_encode(line: str):
    text = json.loads(line)["content"]
    ids = _BASELINE["tokenizer"].encode(text, add_special_tokens=False).ids
    ids.append(_BASELINE["eod"])
    return ids


def run_baseline(corpus: Path, tokenizer_path: Path, prefix: str, workers: int, vocab_size: int) -> float:
    """Seconds taken by the original design."""
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    writer = IndexedDatasetWriter(prefix, best_dtype(vocab_size))
    with (
        open(corpus, encoding="utf-8") as lines,
        context.Pool(workers, initializer=_baseline_init, initargs=(str(tokenizer_path),)) as pool,
    ):
        for ids in pool.imap(_baseline_encode, lines, 32):
            writer.add_document(ids)
    writer.finalize()
    return time.perf_counter() - start


def run_ours(corpus: Path, tokenizer_path: Path, prefix: str, workers: int):
    """(seconds, summary) of tools/preprocess_data.py, in process, timed end to end."""
    preprocess = load_tool("preprocess_data")
    argv = ["--input", str(corpus), "--output-prefix", prefix, "--json-keys", "content", "--append-eod"]
    argv += ["--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", str(tokenizer_path)]
    argv += ["--workers", str(workers), "--quiet"]
    start = time.perf_counter()
    summary = preprocess.run(preprocess.parse_args(argv))
    return time.perf_counter() - start, summary


def _same_files(prefix_a: str, prefix_b: str) -> bool:
    return all(Path(prefix_a + s).read_bytes() == Path(prefix_b + s).read_bytes() for s in (".bin", ".idx"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-mb", type=float, default=170.0, help="corpus size in MB of code (default 170)")
    parser.add_argument("--quick", action="store_true", help="a 20 MB corpus")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both designs")
    parser.add_argument("--vocab-size", type=int, default=49152, help="tokenizer vocabulary (default 49152)")
    parser.add_argument(
        "--train-mb", type=float, default=24.0, help="MB of the corpus to train the tokenizer on"
    )
    parser.add_argument("--source-dir", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "megatron_bench_preprocess",
        help="where the corpus and tokenizer are cached",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.max_mb = 20.0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both designs, print MB/s and the ratio; exit status 1 if the outputs differ."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Pool forks after tokenizers ran
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(args.source_dir, args.cache_dir, args.max_mb)
    tokenizer_path = build_tokenizer_file(corpus, args.cache_dir, args.vocab_size, args.train_mb)
    megabytes = corpus.stat().st_size / 1e6
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as out:
        ours_seconds, summary = run_ours(corpus, tokenizer_path, f"{out}/ours", args.workers)
        vocab_size = len(json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]["vocab"])
        base_seconds = run_baseline(corpus, tokenizer_path, f"{out}/original", args.workers, vocab_size)
        identical = _same_files(f"{out}/ours_content_document", f"{out}/original")
    ours_rate, base_rate = megabytes / ours_seconds, megabytes / base_seconds
    print(
        f"corpus: {corpus} ({megabytes:.1f} MB JSONL, {summary.documents:,} documents, {summary.tokens:,} tokens)"
    )
    print(f"tokenizer: {tokenizer_path.name}; workers: {args.workers}; engine: {summary.engine}")
    print(
        f"original design (per-document tokenizers.encode in a Pool): {base_rate:6.1f} MB/s ({base_seconds:.1f} s)"
    )
    print(
        f"tools/preprocess_data.py:                                  {ours_rate:6.1f} MB/s ({ours_seconds:.1f} s)"
    )
    print(f"ratio: {ours_rate / base_rate:.1f}x   outputs identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
