"""Train a tokenizer with StarCoder's recipe and write it as a Hugging Face `tokenizer.json`.

The recipe: byte-level BPE (lossless on any UTF-8 text), digits split one by one, no prefix space,
and StarCoder's 19 special tokens at ids 0-18 in StarCoder's order.

    python tools/train_tokenizer.py --input demo.jsonl --output tokenizer.json --vocab-size 49152

Bad lines (malformed JSON, a missing or non-string key, lone surrogates, empty documents) are skipped
and counted by reason; `--strict` stops at the first one with its file and line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from megatron.data.tokenizer import STARCODER_SPECIAL_TOKENS
from megatron.fileio import create_temporary
from megatron.log import progress_bar

NUM_BYTE_TOKENS = 256


def build_untrained_tokenizer() -> Tokenizer:
    """An empty byte-level BPE tokenizer with StarCoder's pre-tokenization and decoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    # trim_offsets=False keeps offsets exact; the processor adds no tokens.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def parse_line(raw_line: bytes, json_key: str) -> tuple[str | None, str]:
    """Return (document, "") for a usable JSONL line, else (None, reason it is unusable)."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"invalid UTF-8 ({error})"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"malformed JSON ({error})"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    if json_key not in record:
        return None, f"missing key {json_key!r}"
    text = record[json_key]
    if not isinstance(text, str):
        return None, f"key {json_key!r} is {type(text).__name__}, not a string"
    if not text:
        return None, "empty document"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None, "invalid UTF-8 (lone surrogate escape)"
    return text, ""


class DocumentReader:
    """Iterates the documents of JSONL files with a byte-based progress bar, counting skipped lines."""

    def __init__(self, paths: list[Path], json_key: str, *, max_documents=None, strict=False, progress=None):
        self.paths = paths
        self.json_key = json_key
        self.max_documents = max_documents
        self.strict = strict
        self.progress = progress
        self.num_documents = 0
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[str]:
        total_bytes = sum(path.stat().st_size for path in self.paths)
        with progress_bar(total=total_bytes, unit="B", desc="reading", enabled=self.progress) as bar:
            for path in self.paths:
                for text in self._read_file(path, bar):
                    yield text
                    self.num_documents += 1
                    if self.max_documents is not None and self.num_documents >= self.max_documents:
                        return

    def _read_file(self, path: Path, bar) -> Iterator[str]:
        with open(path, "rb") as file:
            for line_number, raw_line in enumerate(file, start=1):
                bar.update(len(raw_line))
                if not raw_line.strip():
                    continue
                text, reason = parse_line(raw_line, self.json_key)
                if text is not None:
                    yield text
                elif self.strict:
                    raise ValueError(f"{path}:{line_number}: {reason}")
                else:
                    # Count by reason without the per-line detail so the summary stays short.
                    self.skipped[reason.split(" (")[0]] += 1


def train(
    reader: DocumentReader, vocab_size: int, min_frequency: int = 0, progress: bool | None = None
) -> Tokenizer:
    """Train the StarCoder-recipe tokenizer on the documents of `reader` (progress: None shows the
    trainer's bar only on a terminal)."""
    tokenizer = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(STARCODER_SPECIAL_TOKENS),
        # Every byte is in the vocabulary, so no text is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() if progress is None else progress,
    )
    tokenizer.train_from_iterator(reader, trainer=trainer)
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer) -> None:
    """Programmer invariant: the trainer put StarCoder's special tokens at ids 0-18."""
    for token_id, token in enumerate(STARCODER_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))


def save_atomically(tokenizer: Tokenizer, output: Path) -> None:
    """Write tokenizer.json through a temporary file renamed at the end, so no partial file is left."""
    output.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = create_temporary(output.parent, f".{output.name}.")  # umask mode
    os.close(file_descriptor)
    try:
        tokenizer.save(temporary_name, pretty=True)
        os.replace(temporary_name, output)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a StarCoder-recipe tokenizer (byte-level BPE, digits split, no prefix space, "
        "19 special tokens at ids 0-18) from JSONL files and write tokenizer.json.",
    )
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="JSONL files to read")
    parser.add_argument("--output", required=True, type=Path, help="tokenizer.json to write")
    parser.add_argument(
        "--vocab-size", required=True, type=int, help="vocabulary size, special tokens included"
    )
    parser.add_argument("--json-key", default="content", help="JSON key holding the text (default: content)")
    parser.add_argument(
        "--max-documents", type=int, default=None, help="train on at most this many documents"
    )
    parser.add_argument(
        "--min-frequency", type=int, default=0, help="minimum count of a merged pair (default: 0)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad line instead of skipping it"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (same as --no-progress)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (default: shown on a terminal)"
    )
    return parser


def validate_arguments(args: argparse.Namespace) -> None:
    """Check user-given values before any work starts."""
    minimum_vocab_size = len(STARCODER_SPECIAL_TOKENS) + NUM_BYTE_TOKENS
    if args.vocab_size < minimum_vocab_size:
        raise ValueError(
            f"--vocab-size {args.vocab_size} is too small: it must be at least {minimum_vocab_size} "
            f"({len(STARCODER_SPECIAL_TOKENS)} special tokens + {NUM_BYTE_TOKENS} byte tokens)"
        )
    if args.max_documents is not None and args.max_documents < 1:
        raise ValueError(f"--max-documents must be at least 1, got {args.max_documents}")
    for path in args.input:
        if not path.is_file():
            raise ValueError(f"--input file {str(path)!r} does not exist or is not a file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reader = DocumentReader(
        args.input,
        args.json_key,
        max_documents=args.max_documents,
        strict=args.strict,
        progress=False if args.quiet or args.no_progress else None,
    )
    try:
        validate_arguments(args)
        tokenizer = train(reader, args.vocab_size, args.min_frequency, progress=reader.progress)
        if reader.num_documents == 0:
            raise ValueError(
                f"no usable documents with key {args.json_key!r} in {', '.join(map(str, args.input))}"
            )
    except ValueError as error:
        print(f"train_tokenizer: error: {error}", file=sys.stderr)
        return 2
    check_special_tokens(tokenizer)
    save_atomically(tokenizer, args.output)
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reader.skipped.items())) or "none"
    print(
        f"trained on {reader.num_documents} documents; vocabulary {tokenizer.get_vocab_size()}; "
        f"wrote {args.output}; skipped lines: {skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
