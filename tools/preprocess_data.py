"""Tokenize JSONL, JSONL.gz or Parquet documents into Megatron's indexed format (``.bin/.idx``).

Drop-in for Megatron-LM's ``tools/preprocess_data.py`` (same flag names, same output names
``{output_prefix}_{key}_document.bin/.idx``, byte-compatible files), built for throughput:

- input is read in multi-megabyte chunks and handed to ``--workers`` forked processes, each of which
  parses JSON and tokenizes a whole chunk in one batch call; results are written in input order with
  large buffered writes, so the output does not depend on the worker count;
- the tokenizer engine is ``gigatoken`` when it can load the tokenizer (checked at start-up to give ids
  identical to Hugging Face ``tokenizers`` on tricky strings and on a sample of the input), else the
  team's ``tokenizers``-based tokenizer (the reference);
- literal special-token text inside a document (``<|endoftext|>`` in tokenizer code, say) is encoded as
  ordinary text unless ``--allow-special-tokens`` is given; the EOD and metadata markers added by this
  tool are the real special ids;
- bad lines (malformed JSON, missing key, non-string value, invalid UTF-8 or lone surrogates, empty
  document) are skipped and counted, or with ``--strict`` fail at the first one with ``file:line``;
- output is written under temporary names and renamed at the end: an interrupted run leaves nothing
  that looks complete; an existing dataset is replaced only with ``--overwrite``;
- a document over ``--max-document-bytes`` is tokenized in pieces (or skipped), so memory follows the
  piece size; ``--workers`` is capped at the usable cores;
- every failure is one line and an exit status (2: the input or a flag, 1: a failed write, 130:
  Ctrl-C), and workers never outlive the parent (docs/data-format.md lists the cases).

Example::

    python tools/preprocess_data.py --input data.jsonl --output-prefix out/python \\
        --json-keys content --tokenizer-type TokenizerFromFile --tokenizer-file tokenizer.json \\
        --append-eod --workers 2
"""

# Ctrl-C is handled before the libraries load (below), so imports follow code:
# ruff: noqa: E402
import os
import signal
import sys

INTERRUPTED = "preprocess_data: interrupted; no output was written"


def _interrupted_while_loading(signum, frame) -> None:
    print(INTERRUPTED, file=sys.stderr)
    os._exit(130)


RUNNING_AS_SCRIPT = __name__ == "__main__"
if RUNNING_AS_SCRIPT and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while the libraries below load: one line and status 130 instead of an import traceback;
    # main() hands Ctrl-C back to Python once they are loaded.
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import argparse
import collections
import contextlib
import errno
import functools
import glob
import gzip
import json
import multiprocessing
import multiprocessing.connection
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field, fields

import numpy as np

from megatron.data.indexed import (
    IndexedDatasetWriter,  # noqa: F401 - tests patch the class here; writes go through DocumentWriter
    best_dtype,
    data_file_path,
    index_file_path,
)
from megatron.data.metadata import DocumentWriter, add_metadata_keys_argument, metadata_line
from megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer
from megatron.log import progress_bar

# Reason key -> text used in messages and the summary.
SKIP_REASONS = {
    "malformed_json": "malformed JSON",
    "missing_key": "missing key",
    "not_string": "non-string value",
    "invalid_utf8": "invalid UTF-8 / lone surrogate",
    "empty": "empty document",
    "too_long": "longer than --max-document-bytes",
}
PARQUET_SUFFIXES = (".parquet", ".pq")
# Compressed inputs this tool cannot read, with what to do instead.
UNSUPPORTED_SUFFIXES = (".zst", ".zstd", ".bz2", ".xz", ".lz4", ".zip", ".tar", ".tgz")
# The Stack drops files over 1 MB, so its documents are never split; the reference tokenizer needs
# about 125 bytes of memory per input byte, so a piece of this size stays near 130 MB per worker.
DEFAULT_MAX_DOCUMENT_BYTES = 1 << 20
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies
SAMPLE_TEXT_CHARS = 64 << 10  # engine check: the start of each sample document is enough
INPUT_PATTERNS = ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz", "*.parquet")

# The Stack's metadata columns, in order of preference.
METADATA_SOURCES = {
    "<reponame>": ("max_stars_repo_name",),
    "<filename>": ("max_stars_repo_path", "path"),
    "<gh_stars>": ("max_stars_count",),
}
_METADATA_COLUMNS = tuple(name for names in METADATA_SOURCES.values() for name in names)

# Strings on which the gigatoken engine must match the reference before it is used.
ENGINE_CHECK_TEXTS = (
    "def f(x):\n    return x + 12345  # é 😀 \u00a0\n",
    "literal <|endoftext|> and <fim_prefix><fim_middle><fim_suffix><fim_pad> <reponame>r<filename>f",
    "digits 0 1 23 456.789e-10 0x1F '12' ² ½ Ⅻ ٣ 一二三 ①",
    'characters newer than some Unicode tables: \ua7cf",\n \U0001fae8 \u0897x \U00011f00 ',
    "control and rare spaces: a\x1cb\x1d c\x1e\x1f d\x85e \u180e f\ufeffg \u2000\u200a|",
    "it's they're we've I'm you'll he'd  's 'S",
    "  \n\n\t \r\n  trailing   ",
    "\u3000全角 空白 日本語テキスト 한국어 العربية\u200b\u2028\u2029",
    "x" * 3000 + " " * 100 + "y",
    "a != b; c . d ; e->f; g::h; i==j; /* */ // # <!-- -->",
)


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's preprocessing flags plus this tool's own (metadata, strictness, engine)."""
    parser = argparse.ArgumentParser(
        description="Tokenize JSONL / JSONL.gz / Parquet into Megatron .bin/.idx files "
        "({output_prefix}_{key}_document.bin/.idx).",
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="input files (.jsonl, .json, .jsonl.gz, .parquet), globs or directories (all such files in it)",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="keys (Parquet: columns) to tokenize (default: text)"
    )
    group.add_argument(
        "--split-sentences", action="store_true", help="Megatron's sentence splitting: not supported here"
    )
    group.add_argument(
        "--keep-newlines",
        action="store_true",
        help="accepted for compatibility (only matters when splitting)",
    )
    group.add_argument("--lang", default="english", help="accepted for compatibility (sentence splitting)")
    group.add_argument(
        "--strict", action="store_true", help="fail at the first bad line instead of skipping it"
    )
    group.add_argument(
        "--max-document-bytes",
        type=int,
        default=DEFAULT_MAX_DOCUMENT_BYTES,
        help="documents longer than this (UTF-8 bytes) are handled as --long-documents says; 0: no limit "
        f"(default {DEFAULT_MAX_DOCUMENT_BYTES:,}, above The Stack's 1 MB file limit)",
    )
    group.add_argument(
        "--long-documents",
        choices=("split", "skip"),
        default="split",
        help="split: tokenize a long document in pieces of at most --max-document-bytes cut at line "
        "ends, kept as one document (ids may differ from whole-document tokenization at the cuts); "
        "skip: leave it out and count it (default: split)",
    )

    _add_tokenizer_arguments(parser)
    _add_output_arguments(parser)
    return parser


def _add_tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES, help="tokenizer kind")
    group.add_argument("--tokenizer-file", help="Hugging Face tokenizer.json (TokenizerFromFile)")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--tokenizer-model", help="SentencePiece model (SentencePieceTokenizer)")
    group.add_argument(
        "--append-eod", action="store_true", help="append the end-of-document token to each document"
    )
    group.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="encode literal special-token text in documents (e.g. '<|endoftext|>') as the special id; "
        "by default it is ordinary text",
    )
    group.add_argument(
        "--tokenizer-engine",
        choices=("auto", "gigatoken", "tokenizers"),
        default="auto",
        help="auto: gigatoken when it loads the tokenizer and matches the reference on a sample, else the "
        "reference tokenizer; gigatoken: fail if it cannot be used; tokenizers: always the reference",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("StarCoder metadata")
    group.add_argument(
        "--add-metadata",
        action="store_true",
        help="prefix documents with '<reponame>REPO<filename>PATH<gh_stars>STARS\\n' read from The Stack's "
        "max_stars_repo_name, max_stars_repo_path (or path), max_stars_count; each part kept with "
        "--metadata-probability, drawn per document from (--seed, document index)",
    )
    group.add_argument(
        "--metadata-probability", type=float, default=0.2, help="keep probability of each part"
    )
    group.add_argument("--seed", type=int, default=1234, help="seed of the metadata draws")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="output path prefix, without key or suffix")
    add_metadata_keys_argument(group)
    group.add_argument(
        "--overwrite", action="store_true", help="replace outputs that already exist (default: refuse)"
    )
    group.add_argument(
        "--dataset-impl", default="mmap", choices=("mmap",), help="accepted for compatibility; always mmap"
    )

    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizer processes (default 1); at most the usable CPU cores, and no more than there are "
        "input chunks to share",
    )
    group.add_argument(
        "--partitions", type=int, default=1, help="accepted for compatibility; one pass is used"
    )
    group.add_argument("--log-interval", type=int, default=1000, help="documents between log lines (no TTY)")
    group.add_argument("--chunk-mb", type=float, default=4.0, help="input megabytes per worker task")
    group.add_argument("--quiet", action="store_true", help="no progress bar or log lines, summary only")
    group.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (log lines every --log-interval documents instead, as when not on a terminal)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and validate the command line (``ValueError`` naming the flag on bad values)."""
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        raise ValueError("--split-sentences is not supported (code corpora are tokenized whole)")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    if args.partitions < 1:
        raise ValueError(f"--partitions must be at least 1, got {args.partitions}")
    if args.chunk_mb <= 0:
        raise ValueError(f"--chunk-mb must be positive, got {args.chunk_mb}")
    if args.max_document_bytes < 0:
        raise ValueError(
            f"--max-document-bytes must be 0 (no limit) or positive, got {args.max_document_bytes}"
        )
    if not 0.0 <= args.metadata_probability <= 1.0:
        raise ValueError(f"--metadata-probability must be in [0, 1], got {args.metadata_probability}")
    if len(set(args.json_keys)) != len(args.json_keys):
        raise ValueError(f"--json-keys has duplicates: {args.json_keys}")
    if args.allow_special_tokens and args.tokenizer_type != "TokenizerFromFile":
        raise ValueError("--allow-special-tokens needs --tokenizer-type TokenizerFromFile")
    return args


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named by ``--input``: paths, globs, or directories (their data files, sorted)."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                {p for glob_pattern in INPUT_PATTERNS for p in glob.glob(os.path.join(pattern, glob_pattern))}
            )
            if not found:
                raise ValueError(f"--input directory {pattern} has no {', '.join(INPUT_PATTERNS)} files")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not found:
                raise ValueError(f"--input {pattern}: no such file")
        files.extend(found)
    for path in files:
        if path.lower().endswith(UNSUPPORTED_SUFFIXES):
            raise ValueError(
                f"{path}: {os.path.splitext(path)[1]} input is not supported; decompress it first, or give "
                ".jsonl, .jsonl.gz or .parquet files"
            )
        if not path.endswith(PARQUET_SUFFIXES) and os.path.getsize(path) == 0:
            raise ValueError(f"{path}: input file is empty")
    return files


# ----------------------------------------------------------------------------------------------------------
# Reading input in chunks


@dataclass
class Chunk:
    """A run of consecutive input records: raw JSONL bytes, or Parquet columns."""

    sequence: int
    path: str
    first_line: int  # 1-based line (JSONL) or row (Parquet) of the first record in its file
    first_record: int  # 0-based index of the first record over all inputs (seeds metadata draws)
    jsonl: bytes | None = None
    columns: dict | None = None
    num_records: int = 0


def _read_jsonl_blocks(path: str, chunk_bytes: int):
    """Yield blocks of whole lines of about ``chunk_bytes`` (the last may lack a final newline).

    A line longer than ``chunk_bytes`` is gathered in parts and joined once (no quadratic copying).
    A damaged gzip stream raises ``ValueError`` naming the file and how far it could be read.
    """
    compressed = path.endswith(".gz")
    pending: list[bytes] = []  # read but not yet yielded: complete lines, then the start of one
    pending_bytes = lines_done = bytes_done = 0
    try:
        with (gzip.open if compressed else open)(path, "rb") as stream:
            # gzip: read1 returns what one step decompresses, so a damaged stream loses little.
            read = stream.read1 if compressed else stream.read
            while piece := read(chunk_bytes):
                bytes_done += len(piece)
                cut = piece.rfind(b"\n") + 1
                if cut == 0 or pending_bytes + cut < chunk_bytes // 2:
                    pending.append(piece)
                    pending_bytes += len(piece)
                    continue
                data = b"".join([*pending, piece[:cut]]) if pending else piece[:cut]
                pending = [piece[cut:]] if cut < len(piece) else []
                pending_bytes = len(piece) - cut
                lines_done += data.count(b"\n")
                yield data
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        what = "truncated (the file ends inside the gzip stream)"
        if not isinstance(error, EOFError):
            what = f"not a valid gzip file ({error})"
        lines_done += sum(part.count(b"\n") for part in pending)
        raise ValueError(
            f"{path}: {what} after line {lines_done:,} ({bytes_done:,} bytes decompressed); recompress or "
            "download it again"
        ) from None
    if pending:
        yield b"".join(pending)


def _jsonl_chunks(path: str, chunk_bytes: int, counters: dict):
    line = 1
    empty = True
    for block in _read_jsonl_blocks(path, chunk_bytes):
        empty = False
        num_lines = block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
        yield Chunk(0, path, line, counters["record"], jsonl=block, num_records=num_lines)
        line += num_lines
        counters["record"] += num_lines
    if empty:
        raise ValueError(f"{path}: input file is empty")


def _parquet_chunks(path: str, columns_wanted: list[str], chunk_bytes: int, counters: dict):
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ValueError(
            f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)"
        ) from error
    try:
        parquet_file = parquet.ParquetFile(path)
    except Exception as error:
        raise ValueError(f"{path}: not a readable Parquet file: {error}") from error
    if parquet_file.metadata.num_rows == 0:
        raise ValueError(f"{path}: input file is empty (no rows)")
    present = [name for name in columns_wanted if name in parquet_file.schema_arrow.names]
    row = 1
    rows_per_batch = max(1, min(65536, chunk_bytes // 4096))
    batches = parquet_file.iter_batches(batch_size=rows_per_batch, columns=present)
    while True:
        try:
            batch = next(batches, None)
        except Exception as error:  # pyarrow raises OSError or ArrowInvalid on damaged pages
            raise ValueError(f"{path}: damaged Parquet data after row {row - 1:,}: {error}") from None
        if batch is None:
            break
        columns = {name: batch.column(name).to_pylist() for name in present}
        yield Chunk(0, path, row, counters["record"], columns=columns, num_records=batch.num_rows)
        row += batch.num_rows
        counters["record"] += batch.num_rows


def iter_chunks(files: list[str], keys: list[str], chunk_bytes: int):
    """All input records as numbered chunks, in input order."""
    counters = {"record": 0}
    sequence = 0
    for path in files:
        if path.endswith(PARQUET_SUFFIXES):
            chunks = _parquet_chunks(path, [*keys, *_METADATA_COLUMNS], chunk_bytes, counters)
        else:
            chunks = _jsonl_chunks(path, chunk_bytes, counters)
        for chunk in chunks:
            chunk.sequence = sequence
            sequence += 1
            yield chunk


# ----------------------------------------------------------------------------------------------------------
# Parsing records (runs in the workers)


class BadRecord(Exception):
    """A record that cannot be tokenized; ``reason`` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _parse_json_line(line: bytes, is_first_line: bool) -> dict:
    if is_first_line and line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        record = json.loads(line)
    except UnicodeDecodeError as error:
        raise BadRecord("invalid_utf8", f"invalid UTF-8 ({error.reason} at byte {error.start})") from None
    except ValueError as error:
        raise BadRecord("malformed_json", f"malformed JSON ({error})") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed_json", f"malformed JSON (a {type(record).__name__}, not an object)")
    return record


def _utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _is_long(text: str, max_bytes: int) -> bool:
    """Whether ``text`` has more than ``max_bytes`` UTF-8 bytes (0: no limit); cheap for short texts."""
    return bool(max_bytes) and len(text) > max_bytes // 4 and _utf8_length(text) > max_bytes


def _checked_text(record: dict, key: str, skip_over_bytes: int = 0) -> str:
    """The document under ``key``, or ``BadRecord``; longer than ``skip_over_bytes`` (if set) is bad."""
    if key not in record:
        raise BadRecord("missing_key", f"missing key '{key}'")
    value = record[key]
    if isinstance(value, bytes):  # Parquet binary columns
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRecord("invalid_utf8", f"'{key}' is not valid UTF-8 ({error.reason})") from None
    if not isinstance(value, str):
        raise BadRecord("not_string", f"'{key}' is {type(value).__name__}, not a string")
    if not value:
        raise BadRecord("empty", f"'{key}' is an empty document")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise BadRecord(
                "invalid_utf8",
                f"'{key}' has a lone surrogate {value[error.start]!r} at character {error.start}",
            ) from None
    if _is_long(value, skip_over_bytes):
        raise BadRecord(
            "too_long",
            f"'{key}' has {_utf8_length(value):,} bytes, more than --max-document-bytes {skip_over_bytes:,}",
        )
    return value


def split_long_text(text: str, max_bytes: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_bytes`` UTF-8 bytes: after the last line end that fits,
    else after the last space, else at the last character boundary."""
    data = text.encode("utf-8")
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        cut = data.rfind(b"\n", start, end) + 1
        if cut <= start:
            cut = data.rfind(b" ", start, end) + 1
        if cut <= start:
            cut = end
            while cut > start and data[cut] & 0xC0 == 0x80:  # inside a character: back to its start
                cut -= 1
            while cut == start or (cut < len(data) and data[cut] & 0xC0 == 0x80):  # one character over
                cut += 1
        pieces.append(data[start:cut].decode("utf-8"))
        start = cut
    if start < len(data):
        pieces.append(data[start:].decode("utf-8"))
    return pieces


def _records(chunk: Chunk):
    """Yield (line number, record index, dict or BadRecord) for every non-blank record of a chunk."""
    if chunk.columns is not None:
        names = list(chunk.columns)
        for offset in range(chunk.num_records):
            record = {name: chunk.columns[name][offset] for name in names}
            yield chunk.first_line + offset, chunk.first_record + offset, record
        return
    for offset, line in enumerate(chunk.jsonl.split(b"\n")[: chunk.num_records]):
        if not line.strip():
            continue
        try:
            record = _parse_json_line(line, chunk.first_line + offset == 1)
        except BadRecord as bad:
            record = bad
        yield chunk.first_line + offset, chunk.first_record + offset, record


# ----------------------------------------------------------------------------------------------------------
# Metadata prefix


def _uniform(seed: int, indices: np.ndarray, stream: int) -> np.ndarray:
    """Uniform [0, 1) draws that are a pure function of (seed, index, stream): splitmix64 finaliser."""
    with np.errstate(over="ignore"):
        x = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = x + indices.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(stream + 1)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _metadata_value(record: dict, names: tuple[str, ...]) -> str | None:
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)
    return None


def _metadata_parts(records: list[dict], indices: np.ndarray, seed: int, probability: float):
    """Per record: the kept (marker, value) pairs, each kept with ``probability``."""
    draws = [_uniform(seed, indices, stream) < probability for stream in range(len(METADATA_SOURCES))]
    parts = []
    for row, record in enumerate(records):
        kept = []
        for stream, (marker, names) in enumerate(METADATA_SOURCES.items()):
            value = _metadata_value(record, names) if draws[stream][row] else None
            if value is not None:
                kept.append((marker, value))
        parts.append(kept)
    return parts


# ----------------------------------------------------------------------------------------------------------
# Tokenizer engines


class _ReferenceEngine:
    """The team tokenizer (Hugging Face ``tokenizers``); the definition of correct ids."""

    name = "tokenizers"

    def __init__(self, tokenizer_kwargs: dict, allow_special: bool, tokenizer=None):
        self._tokenizer = tokenizer if tokenizer is not None else build_tokenizer(**tokenizer_kwargs)
        self._backend = None
        if allow_special:
            from tokenizers import Tokenizer as Backend

            self._backend = Backend.from_file(tokenizer_kwargs["tokenizer_file"])
            self._backend.encode_special_tokens = False

    def encode_lists(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self._tokenizer.encode_batch(texts)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode_lists(texts)
        counts = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((i for row in ids for i in row), dtype=np.int64, count=int(counts.sum()))
        return flat, counts


UNASSIGNED, NUMERIC = 1, 2  # bits of _character_flags


@functools.cache
def _character_flags() -> np.ndarray:
    """Per code point: UNASSIGNED in this Python's Unicode database, NUMERIC (category N, not ASCII).

    Hugging Face ``tokenizers`` classifies characters with Oniguruma's Unicode tables (14.0), gigatoken
    with newer ones; a character assigned in between (U+A7CF, say) is a letter to one and punctuation
    to the other. Every character assigned in Python 3.11's database (also 14.0) was checked to give
    identical ids, so documents holding an unassigned one go to the reference tokenizer.
    """
    import unicodedata

    flag_of = collections.defaultdict(int, Cn=UNASSIGNED, Nd=NUMERIC, Nl=NUMERIC, No=NUMERIC)
    categories = map(unicodedata.category, map(chr, range(128, 0x110000)))
    return np.frombuffer(bytes(128) + bytes(map(flag_of.__getitem__, categories)), dtype=np.uint8)


class _GigatokenEngine:
    """gigatoken on a tokenizer.json adapted so that it computes exactly what ``tokenizers`` does.

    StarCoder's pre-tokenizer isolates every numeric character before the byte-level regex; gigatoken
    has no such step, so ASCII digits become added tokens (same ids: an added token is cut out before
    pre-tokenization, which is exactly what isolating it does) and documents holding other numeric
    characters are cut at those characters here and encoded piece by piece. Documents with characters
    the two libraries may classify differently (see ``_character_flags``) use the reference.
    """

    name = "gigatoken"

    def __init__(
        self, tokenizer_json: str, split_numerics: bool, parallel: bool | None, reference_spec: tuple
    ):
        import gigatoken

        with interrupts_deferred():
            self._tokenizer = gigatoken.Tokenizer.from_json(tokenizer_json)
        self._split_numerics = split_numerics
        self._flags = _character_flags()
        self._parallel = parallel
        self._reference_spec = reference_spec
        self._reference = None

    def _pieces(self, texts: list[str]):
        """(texts to encode here, pieces per text or None, rows left to the reference)."""
        pieces, group_sizes, split_any, reference_rows = [], [], False, []
        for row, text in enumerate(texts):
            kinds = 0
            if not text.isascii():  # O(1) in CPython; most code is ASCII
                found = self._flags[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
                kinds = int(np.bitwise_or.reduce(found))
            if kinds & UNASSIGNED:
                reference_rows.append(row)
                pieces.append("")
                group_sizes.append(1)
            elif kinds & NUMERIC and self._split_numerics:
                split_any = True
                parts = _split_around(text, np.flatnonzero(found & NUMERIC))
                pieces.extend(parts)
                group_sizes.append(len(parts))
            else:
                pieces.append(text)
                group_sizes.append(1)
        return pieces, (np.asarray(group_sizes, dtype=np.int64) if split_any else None), reference_rows

    def _encode_rows(self, texts, rows, flat, counts):
        """Splice the reference's ids of ``rows`` (encoded here as empty texts) into the output."""
        if self._reference is None:
            self._reference = make_engine(self._reference_spec)
        ids = self._reference.encode_lists([texts[row] for row in rows])
        lengths = np.asarray([len(row_ids) for row_ids in ids], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[rows]
        flat = np.insert(
            flat.astype(np.int64), np.repeat(starts, lengths), np.concatenate(ids).astype(np.int64)
        )
        counts = counts.copy()
        counts[rows] = lengths
        return flat, counts

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        pieces, group_sizes, reference_rows = self._pieces(texts)
        result = self._tokenizer.encode_batch(pieces, parallel=self._parallel)
        offsets = np.asarray(result.layout.offsets.data, dtype=np.int64)
        flat = np.asarray(result.layout.content.data)[offsets[0] : offsets[-1]]
        counts = np.diff(offsets)
        if group_sizes is not None:
            starts = np.concatenate(([0], np.cumsum(group_sizes)[:-1]))
            counts = np.add.reduceat(counts, starts) if counts.size else counts
        if reference_rows:
            flat, counts = self._encode_rows(texts, reference_rows, flat, counts)
        return flat, counts


def _split_around(text: str, positions: np.ndarray) -> list[str]:
    """``text`` cut before and after each character at ``positions``; no empty pieces."""
    pieces, start = [], 0
    for position in positions.tolist():
        pieces += [text[start:position], text[position]]
        start = position + 1
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


def gigatoken_config(tokenizer, allow_special: bool) -> tuple[str | None, bool, str]:
    """(tokenizer.json text adapted for gigatoken or None, whether numerics are split here, note)."""
    backend = getattr(tokenizer, "backend", None)
    if not callable(getattr(backend, "to_str", None)):
        return None, False, f"{tokenizer.name} is not a Hugging Face tokenizers model"
    config = json.loads(backend.to_str())
    if (config.get("model") or {}).get("type") != "BPE":
        return None, False, "gigatoken supports BPE models only"
    added = config.get("added_tokens") or []
    if not allow_special:
        # gigatoken always matches added special tokens in text; ours must stay ordinary text.
        added = [token for token in added if not token.get("special")]
    pre_tokenizer = config.get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers") or []
    split_numerics = (
        pre_tokenizer.get("type") == "Sequence"
        and len(steps) == 2
        and steps[0] == {"type": "Digits", "individual_digits": True}
        and steps[1].get("type") == "ByteLevel"
    )
    if split_numerics:
        config["pre_tokenizer"] = steps[1]
        vocab = config["model"]["vocab"]
        if any(digit not in vocab for digit in "0123456789"):
            return None, False, "the vocabulary lacks single-digit tokens"
        added += [
            {"id": vocab[digit], "content": digit, "single_word": False, "lstrip": False, "rstrip": False}
            | {"normalized": False, "special": False}
            for digit in "0123456789"
        ]
    config["added_tokens"] = added
    return json.dumps(config), split_numerics, "gigatoken"


def make_engine(spec: tuple, parallel: bool | None = None, tokenizer=None):
    """Build the engine a spec from ``select_engine`` names (in the process that will use it)."""
    if spec[0] == "gigatoken":
        return _GigatokenEngine(spec[1], spec[2], parallel, spec[3])
    return _ReferenceEngine(spec[1], spec[2], tokenizer)


def _first_mismatch(texts: list[str], expected: list[list[int]], actual: list[list[int]]) -> str | None:
    for text, want, got in zip(texts, expected, actual):
        if want != got:
            where = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            return f"text {text[:60]!r}...: token {where} differs (tokenizers {want[where : where + 5]}, gigatoken {got[where : where + 5]})"
    return None


def select_engine(args, tokenizer, tokenizer_kwargs: dict, sample: list[str]) -> tuple[tuple, str]:
    """Pick the engine: gigatoken if it loads and matches the reference on checks and a sample."""
    reference_spec = ("tokenizers", tokenizer_kwargs, args.allow_special_tokens)
    if args.tokenizer_engine == "tokenizers":
        return reference_spec, "tokenizers (requested)"
    problem = None
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        problem = "the gigatoken package is not installed"
    if problem is None:
        config, split_numerics, problem = gigatoken_config(tokenizer, args.allow_special_tokens)
        problem = None if config is not None else problem
    if problem is None:
        spec = ("gigatoken", config, split_numerics, reference_spec)
        try:
            fast = make_engine(spec, parallel=False)
        except Exception as error:  # a tokenizer.json gigatoken does not understand
            problem = f"gigatoken cannot load it ({str(error).splitlines()[0]})"
    if problem is None:
        texts = [*ENGINE_CHECK_TEXTS, *sample]
        reference = make_engine(reference_spec, tokenizer=tokenizer)
        with interrupts_deferred():  # Ctrl-C inside the engines' calls gives panics or half results
            flat, counts = fast.encode(texts)
            expected = reference.encode_lists(texts)
        got = [part.tolist() for part in np.split(flat, np.cumsum(counts)[:-1])]
        problem = _first_mismatch(texts, expected, got)
        if problem is None:
            return (
                spec,
                f"gigatoken (ids identical to tokenizers on {len(texts)} check texts and sample documents)",
            )
        problem = f"gigatoken differs from tokenizers: {problem}"
    if args.tokenizer_engine == "gigatoken":
        raise ValueError(f"--tokenizer-engine gigatoken: {problem}")
    print(f"preprocess_data: using the tokenizers engine: {problem}", file=sys.stderr)
    return reference_spec, f"tokenizers ({problem})"


# ----------------------------------------------------------------------------------------------------------
# Chunk processing (runs in the workers)


@dataclass
class Job:
    """What a worker needs besides the chunk; picklable."""

    keys: list[str]
    engine_spec: tuple
    dtype: str
    vocab_size: int
    eod: int
    append_eod: bool
    strict: bool
    metadata_ids: dict[str, int] = field(default_factory=dict)
    metadata_probability: float = 0.2
    seed: int = 1234
    max_document_bytes: int = 0
    long_documents: str = "split"
    metadata_keys: tuple = ()  # input fields recorded in the metadata sidecar

    @property
    def split_over_bytes(self) -> int:
        """Documents over this many bytes are tokenized in pieces (0: none)."""
        return self.max_document_bytes if self.long_documents == "split" else 0

    @property
    def skip_over_bytes(self) -> int:
        """Documents over this many bytes are skipped (0: none)."""
        return self.max_document_bytes if self.long_documents == "skip" else 0


@dataclass
class ChunkResult:
    """Tokens of one chunk per key, with counts."""

    sequence: int
    tokens: dict
    num_documents: int = 0
    num_bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: list = field(default_factory=list)
    error: str | None = None
    num_split: int = 0  # documents tokenized in pieces (longer than --max-document-bytes)
    metadata: list = field(default_factory=list)  # one sidecar line per document (metadata_keys)


def _insert_markers(flat, counts, doc_sizes, specials, eod):
    """Tokens of documents made of pieces: each piece may start with a special id, documents may end
    with EOD (``eod`` None: no EOD). Returns (tokens, tokens per document)."""
    piece_starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    doc_first_piece = np.concatenate(([0], np.cumsum(doc_sizes)[:-1])).astype(np.int64)
    has_special = specials >= 0
    doc_counts = np.add.reduceat(counts + has_special, doc_first_piece) if counts.size else counts
    positions, values = [], []
    if eod is not None:
        # EODs first: for equal positions np.insert keeps the given order (a stable sort).
        positions.append(np.cumsum(np.add.reduceat(counts, doc_first_piece)))
        values.append(np.full(len(doc_sizes), eod, dtype=np.int64))
        doc_counts = doc_counts + 1
    positions.append(piece_starts[has_special])
    values.append(specials[has_special])
    tokens = np.insert(flat.astype(np.int64), np.concatenate(positions), np.concatenate(values))
    return tokens, doc_counts


def _append_eod(flat: np.ndarray, counts: np.ndarray, eod: int) -> np.ndarray:
    """``flat`` with ``eod`` after each document (np.insert is several times slower)."""
    eod_positions = np.cumsum(counts + 1) - 1
    keep = np.ones(flat.size + counts.size, dtype=bool)
    keep[eod_positions] = False
    tokens = np.empty(keep.size, dtype=np.int64 if flat.dtype.kind == "i" else flat.dtype)
    tokens[keep] = flat
    tokens[eod_positions] = eod
    return tokens


def _metadata_pieces(texts, parts, metadata_ids):
    pieces, specials, doc_sizes = [], [], []
    for text, kept in zip(texts, parts):
        if not kept:
            pieces.append(text)
            specials.append(-1)
            doc_sizes.append(1)
            continue
        for position, (marker, value) in enumerate(kept):
            specials.append(metadata_ids[marker])
            pieces.append(value + "\n" + text if position == len(kept) - 1 else value)
        doc_sizes.append(len(kept))
    return pieces, np.asarray(specials, dtype=np.int64), np.asarray(doc_sizes, dtype=np.int64)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (and SIGTERM, under ``main``) until the block ends, then raise what they raise.

    A KeyboardInterrupt raised inside a Rust tokenizer's call (it polls for signals) surfaces as a
    panic message or a half-built result; here it waits the fraction of a second the call takes.
    Only the main thread can handle signals; a signal ignored or handled otherwise stays as it is.
    """
    raising = {signal.SIGINT: (signal.default_int_handler, KeyboardInterrupt)}
    raising[signal.SIGTERM] = (_raise_terminated, Terminated)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {
        number: signal.signal(number, lambda signum, frame: received.append(signum))
        for number, (handler, _) in raising.items()
        if signal.getsignal(number) is handler
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise raising[received[0]][1]


def encode_bounded(engine, texts: list[str], max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``engine.encode(texts)``, but a text over ``max_bytes`` (0: no limit) is encoded piece by piece
    (``split_long_text``), one piece per call, so memory follows the piece size, not the document's."""
    long_rows = [row for row, text in enumerate(texts) if _is_long(text, max_bytes)]
    if not long_rows:
        with interrupts_deferred():
            return engine.encode(texts)
    flats, counts, start = [], np.zeros(len(texts), dtype=np.int64), 0
    for row in [*long_rows, len(texts)]:
        if row > start:
            with interrupts_deferred():
                flat, counts[start:row] = engine.encode(texts[start:row])
            flats.append(flat)
        for piece in split_long_text(texts[row], max_bytes) if row < len(texts) else ():
            with interrupts_deferred():
                flat, piece_count = engine.encode([piece])
            flats.append(flat)
            counts[row] += piece_count[0]
        start = row + 1
    return np.concatenate(flats), counts


def encode_documents(texts: list[str], parts, job: Job, engine) -> tuple[np.ndarray, np.ndarray]:
    """Token array (``job.dtype``) and per-document lengths of ``texts`` (with metadata and EOD)."""
    eod = job.eod if job.append_eod else None
    if not texts:
        return np.zeros(0, dtype=job.dtype), np.zeros(0, dtype=np.int64)
    if parts is None:
        flat, counts = encode_bounded(engine, texts, job.split_over_bytes)
        if eod is not None:
            flat, counts = _append_eod(flat, counts, eod), counts + 1
    else:
        pieces, specials, doc_sizes = _metadata_pieces(texts, parts, job.metadata_ids)
        flat, counts = encode_bounded(engine, pieces, job.split_over_bytes)
        flat, counts = _insert_markers(flat, counts, doc_sizes, specials, eod)
    if flat.size and int(flat.max()) >= job.vocab_size:
        raise AssertionError(f"token id {int(flat.max())} outside the vocabulary of {job.vocab_size}")
    return flat.astype(job.dtype), counts.astype(np.int64)


def _location(chunk: Chunk, line: int) -> str:
    return f"{chunk.path}: row {line}" if chunk.columns is not None else f"{chunk.path}:{line}"


def _safe_metadata(record: dict) -> dict:
    """Metadata values that cannot be encoded (lone surrogates) count as absent."""
    cleaned = {}
    for name in _METADATA_COLUMNS:
        value = record.get(name)
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                value = None
        cleaned[name] = value
    return cleaned


def process_chunk(chunk: Chunk, job: Job, engine) -> ChunkResult:
    """Parse, check and tokenize one chunk; bad records are counted (or, strict, reported)."""
    result = ChunkResult(chunk.sequence, {})
    texts = {key: [] for key in job.keys}
    records, indices = [], []
    for line, index, record in _records(chunk):
        try:
            if isinstance(record, BadRecord):
                raise record
            values = [_checked_text(record, key, job.skip_over_bytes) for key in job.keys]
        except BadRecord as bad:
            message = f"{_location(chunk, line)}: {bad}"
            if job.strict:
                result.error = message
                return result
            result.skipped[bad.reason] += 1
            if result.skipped[bad.reason] <= 5:
                result.examples.append((bad.reason, message))
            continue
        for key, value in zip(job.keys, values):
            texts[key].append(value)
        if job.metadata_keys:
            result.metadata.append(metadata_line(record, job.metadata_keys))
        result.num_split += any(_is_long(value, job.split_over_bytes) for value in values)
        if job.metadata_ids:
            records.append(_safe_metadata(record))
            indices.append(index)
    parts = None
    if job.metadata_ids:
        indices = np.asarray(indices, dtype=np.int64)
        parts = _metadata_parts(records, indices, job.seed, job.metadata_probability)
    for key in job.keys:
        result.tokens[key] = encode_documents(texts[key], parts, job, engine)
    result.num_documents = len(texts[job.keys[0]])
    result.num_bytes = (
        len(chunk.jsonl)
        if chunk.jsonl is not None
        else sum(len(text) for key in job.keys for text in texts[key])
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# Worker processes


def _to_wire(record) -> tuple:
    """A dataclass as a plain tuple: queues must not pickle classes of a module that may not be
    importable by name (this script is ``__main__`` or loaded from a path)."""
    return tuple(getattr(record, item.name) for item in fields(record))


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _die_with_parent(parent_pid: int) -> None:
    """End this process when its parent dies, even by SIGKILL: the kernel's parent-death signal on
    Linux, and everywhere a thread polling the parent's pid (a worker may be blocked reading a task
    that the dead parent wrote only half of, where no timeout helps)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="watch-parent").start()


def _worker_main(tasks, results, job: Job, parent_pid: int) -> None:
    """Take chunks from ``tasks`` until terminated; send each result (or a failure) on ``results``, this
    worker's own pipe."""
    # The parent handles Ctrl-C and stops the workers; a worker must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The parent's SIGTERM handler (inherited through fork) would unwind with a traceback: die at once.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    try:
        engine = make_engine(job.engine_spec, parallel=False)
        while True:
            chunk = Chunk(*tasks.get())
            results.send(("ok", chunk.sequence, _to_wire(process_chunk(chunk, job, engine))))
    except Exception:
        results.send(("error", -1, traceback.format_exc()))


class WorkerError(Exception):
    """A worker died (killed, out of memory) or failed: the environment's or the program's fault."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class WorkerPool:
    """Forked processes that turn chunks into ``ChunkResult``s, yielded in input order.

    Fork (not spawn) so that nothing has to be importable by name; at most ``2 * max_workers`` chunks
    are in flight, so memory stays bounded however large the input. Workers start as chunks arrive,
    so a small input never starts more processes than it has chunks. Each worker dies with the
    parent (even a SIGKILLed one); ``close`` ends them at once.

    Tasks share one queue; each worker sends its results on a pipe of its own whose write end only it
    holds, so a worker that dies (killed, out of memory), even half-way through a message, shows as
    an end of file there at once, instead of a reader blocked on a shared pipe for ever.
    """

    def __init__(self, job: Job, max_workers: int):
        self._context = multiprocessing.get_context("fork")
        self._tasks = self._context.Queue()
        self._results = {}  # the parent's read end of each worker's pipe -> the worker
        self._ready = []  # results received but not yet returned
        self._job = job
        self._max_workers = max_workers
        self._max_in_flight = 2 * max_workers
        self._processes = []

    @property
    def num_started(self) -> int:
        return len(self._processes)

    def _start_worker(self) -> None:
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        # tokenizers warns after a fork once its thread pool has been used; workers are single-threaded.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        reader, writer = self._context.Pipe(duplex=False)
        try:
            process = self._context.Process(
                target=_worker_main, args=(self._tasks, writer, self._job, os.getpid()), daemon=True
            )
            # Ctrl-C during fork would be swallowed by an at-fork hook (logging's) or hit the new worker
            # before it ignores SIGINT: hold it until the worker exists.
            with interrupts_deferred():
                process.start()
            self._processes.append(process)
            self._results[reader] = process
        finally:
            writer.close()  # the worker's copy is the only one: its death is an end of file here
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    @staticmethod
    def _died(process) -> WorkerError:
        process.join(timeout=5.0)
        code = process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with {code}"
        if code == -signal.SIGKILL:  # what the kernel's out-of-memory killer sends
            how += " (out of memory? try fewer --workers or a smaller --chunk-mb)"
        return WorkerError(f"worker process {process.pid} {how}; no output was written")

    def _receive(self):
        """The next (sequence, result) from any worker; ``WorkerError`` when one died or failed."""
        while not self._ready:
            for reader in multiprocessing.connection.wait(list(self._results)):
                try:
                    status, sequence, payload = reader.recv()
                except (EOFError, OSError):
                    raise self._died(self._results[reader]) from None
                if status == "error":
                    raise WorkerError(f"a worker process failed; no output was written:\n{payload}")
                self._ready.append((sequence, payload))
        return self._ready.pop()

    def map(self, chunks):
        """Results of ``chunks`` in input order."""
        pending, next_sequence, in_flight = {}, 0, 0
        chunk_iter = iter(chunks)
        exhausted = False
        while True:
            while not exhausted and in_flight < self._max_in_flight:
                chunk = next(chunk_iter, None)
                if chunk is None:
                    exhausted = True
                else:
                    if in_flight >= self.num_started and self.num_started < self._max_workers:
                        self._start_worker()
                    self._tasks.put(_to_wire(chunk))
                    in_flight += 1
            if in_flight == 0:
                return
            sequence, result = self._receive()
            pending[sequence] = ChunkResult(*result)
            in_flight -= 1
            while next_sequence in pending:
                yield pending.pop(next_sequence)
                next_sequence += 1

    def close(self) -> None:
        """Stop the workers at once (SIGTERM, which they take without clean-up: results travel on
        pipes the parent has read; a dead worker may hold the task queue's lock, so no stop message
        is sent), then SIGKILL any left after two seconds."""
        for process in self._processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + 2.0
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.exitcode is None:
                process.kill()
                process.join(timeout=1.0)
        self._tasks.cancel_join_thread()
        self._tasks.close()
        for reader in self._results:
            reader.close()


# ----------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class Summary:
    """What a run did; ``main`` prints it."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    shown: collections.Counter = field(default_factory=collections.Counter)
    engine: str = ""
    outputs: list = field(default_factory=list)
    split: int = 0  # documents tokenized in pieces
    max_document_bytes: int = 0
    workers: int = 1  # processes that tokenized

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def lines(self) -> list[str]:
        rate = f"{self.megabytes_per_second:.1f} MB/s, {self.documents / max(self.seconds, 1e-9):,.0f} docs/s"
        lines = [
            f"documents: {self.documents:,}  tokens: {self.tokens:,}  input: {self.bytes / 1e6:,.1f} MB",
            f"time: {self.seconds:.1f} s ({rate})",
        ]
        if self.skipped:
            detail = ", ".join(
                f"{count:,} {SKIP_REASONS[reason]}" for reason, count in sorted(self.skipped.items())
            )
            lines.append(f"skipped lines: {sum(self.skipped.values()):,} ({detail})")
        else:
            lines.append("skipped lines: 0")
        if self.split:
            lines.append(
                f"long documents: {self.split:,} tokenized in pieces of at most {self.max_document_bytes:,} "
                "bytes (--max-document-bytes)"
            )
        lines.append(f"engine: {self.engine}, workers: {self.workers}")
        lines += [f"wrote {data_file_path(p)} and {index_file_path(p)}" for p in self.outputs]
        return lines


def _sample_texts(files: list[str], keys: list[str], limit_bytes: int = 128 << 10) -> list[str]:
    """Valid documents from the start of the first input, for checking the engine."""
    chunk = next(iter_chunks(files[:1], keys, 1 << 20))
    sample, total = [], 0
    for _, _, record in _records(chunk):
        if isinstance(record, BadRecord):
            continue
        for key in keys:
            try:
                text = _checked_text(record, key)
            except BadRecord:
                continue
            sample.append(text[:SAMPLE_TEXT_CHARS])
            total += len(sample[-1])
        if total >= limit_bytes:
            break
    return sample


def _metadata_ids(tokenizer) -> dict[str, int]:
    ids = {marker: tokenizer.token_to_id(marker) for marker in METADATA_SOURCES}
    missing = [marker for marker, token_id in ids.items() if token_id is None]
    if missing:
        raise ValueError(f"--add-metadata: the tokenizer {tokenizer.name} has no {', '.join(missing)} token")
    return ids


class _Progress:
    """tqdm bar (TTY) or a log line every ``log_interval`` documents."""

    def __init__(self, args, files: list[str]):
        plain = all(not f.endswith((".gz", *PARQUET_SUFFIXES)) for f in files)
        total = sum(os.path.getsize(f) for f in files) if plain else None
        enabled = False if args.quiet or args.no_progress else None
        self._bar = progress_bar(total=total, unit="B", desc="preprocess", enabled=enabled)
        self._log = not args.quiet and self._bar.disable
        self._interval, self._next_log, self._start = (
            args.log_interval,
            args.log_interval,
            time.perf_counter(),
        )

    def update(self, summary: Summary, num_bytes: int) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.update(num_bytes)
        self._bar.set_postfix_str(
            f"{summary.documents:,} docs, {summary.documents / elapsed:,.0f} docs/s", refresh=False
        )
        if self._log and summary.documents >= self._next_log:
            self._next_log = (summary.documents // self._interval + 1) * self._interval
            print(
                f"processed {summary.documents:,} documents ({summary.documents / elapsed:,.0f} docs/s, "
                f"{summary.bytes / 1e6 / elapsed:.1f} MB/s)",
                file=sys.stderr,
            )

    def close(self) -> None:
        self._bar.close()


def _warn_skipped(result: ChunkResult, shown: collections.Counter, limit: int = 5) -> None:
    """Show the first ``limit`` skipped lines of each reason (file:line and the problem)."""
    for reason, message in result.examples:
        if shown[reason] < limit:
            print(f"warning: skipped {message}", file=sys.stderr)
            shown[reason] += 1
            if shown[reason] == limit:
                print(f"warning: further '{SKIP_REASONS[reason]}' lines are only counted", file=sys.stderr)


class OutputError(Exception):
    """Writing an output failed (a full disk, say): the environment's fault, not the input's."""


def _os_reason(error: OSError) -> str:
    """'No space left on device (ENOSPC)': the reason and the errno's name."""
    code = errno.errorcode.get(error.errno, "") if error.errno else ""
    return f"{error.strerror or error} ({code})" if code else str(error)


def _write_step(writer, method: str, *args) -> None:
    """``writer.method(*args)``; an OSError becomes one ``OutputError`` line naming the file."""
    try:
        getattr(writer, method)(*args)
    except OSError as error:
        target = data_file_path(writer.path_prefix)
        raise OutputError(
            f"cannot write {target}: {_os_reason(error)}; the partial output was removed"
        ) from None


def _consume(results, writers: dict, summary: Summary, progress: _Progress) -> None:
    for result in results:
        if result.error is not None:
            raise ValueError(f"{result.error} (--strict stops at the first bad line)")
        _warn_skipped(result, summary.shown)
        for key, (tokens, lengths) in result.tokens.items():
            _write_step(writers[key], "add_documents", tokens, lengths, result.metadata)
        summary.documents += result.num_documents
        summary.tokens += sum(int(tokens.size) for tokens, _ in result.tokens.values())
        summary.bytes += result.num_bytes
        summary.skipped.update(result.skipped)
        summary.split += result.num_split
        progress.update(summary, result.num_bytes)


def check_output(args: argparse.Namespace) -> list[str]:
    """The output prefixes, checked before any work: the directory exists (or is created) and takes
    new files, and no output exists unless ``--overwrite``."""
    prefixes = [f"{args.output_prefix}_{key}_document" for key in args.json_keys]
    directory = os.path.dirname(os.path.abspath(args.output_prefix))
    flag = f"--output-prefix {args.output_prefix}"
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{flag}: {directory} is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{flag}: cannot create the directory {directory}: {_os_reason(error)}") from None
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".preprocess-probe-"):
            pass
    except OSError as error:
        raise ValueError(f"{flag}: cannot create files in {directory}: {_os_reason(error)}") from None
    existing = [
        path for prefix in prefixes for path in (data_file_path(prefix), index_file_path(prefix))
        if os.path.exists(path)
    ]  # fmt: skip
    if existing and not args.overwrite:
        raise ValueError(
            f"{flag}: {', '.join(existing)} already exist; pass --overwrite to replace them, or choose "
            "another prefix"
        )
    return prefixes


def worker_count(requested: int) -> int:
    """``requested`` capped at the usable cores (more only add memory and contention), saying so."""
    cores = usable_cores()
    if requested > cores:
        print(
            f"preprocess_data: --workers {requested} is more than the {cores} usable CPU cores; "
            f"using at most {cores}",
            file=sys.stderr,
        )
    return min(requested, cores)


def _prepare(args: argparse.Namespace, files: list[str]) -> tuple[Job, object, str]:
    """(job, tokenizer, engine note): the tokenizer loaded and the engine chosen and checked."""
    tokenizer_kwargs = {
        "tokenizer_type": args.tokenizer_type,
        "tokenizer_file": args.tokenizer_file,
        "vocab_file": args.vocab_file,
        "merge_file": args.merge_file,
        "tokenizer_model": args.tokenizer_model,
    }
    with interrupts_deferred():
        tokenizer = build_tokenizer(**tokenizer_kwargs)
    metadata_ids = _metadata_ids(tokenizer) if args.add_metadata else {}
    sample = _sample_texts(files, args.json_keys)
    spec, engine_note = select_engine(args, tokenizer, tokenizer_kwargs, sample)
    job = Job(
        list(args.json_keys), spec, best_dtype(tokenizer.vocab_size).str, tokenizer.vocab_size,
        tokenizer.eod, args.append_eod, args.strict, metadata_ids, args.metadata_probability, args.seed,
        args.max_document_bytes, args.long_documents, tuple(args.metadata_keys),
    )  # fmt: skip
    return job, tokenizer, engine_note


def run(args: argparse.Namespace) -> Summary:
    """Preprocess as ``args`` say; on any failure or interruption no output is left in place."""
    start = time.perf_counter()
    files = expand_inputs(args.input)
    prefixes = check_output(args)
    max_workers = worker_count(args.workers)
    job, tokenizer, engine_note = _prepare(args, files)
    summary = Summary(engine=engine_note, outputs=prefixes, max_document_bytes=job.split_over_bytes)
    writers, pool, progress, restore = {}, None, None, None
    try:
        writers = {
            key: DocumentWriter(p, np.dtype(job.dtype), job.metadata_keys)
            for key, p in zip(job.keys, prefixes)
        }
        progress = _Progress(args, files)
        chunks = iter_chunks(files, [*job.keys, *job.metadata_keys], int(args.chunk_mb * (1 << 20)))
        if max_workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            pool = WorkerPool(job, max_workers)
            results = pool.map(chunks)
        else:
            engine = make_engine(job.engine_spec, parallel=False, tokenizer=tokenizer)
            results = (process_chunk(chunk, job, engine) for chunk in chunks)
        _consume(results, writers, summary, progress)
        if summary.documents == 0:
            raise ValueError(f"no valid documents in {', '.join(files)} (every line was skipped)")
        restore = _completing()
        for writer in writers.values():
            _write_step(writer, "finalize")
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.close()
            summary.workers = pool.num_started
        if progress is not None:
            progress.close()
        if restore is not None and not RUNNING_AS_SCRIPT:  # a script keeps Ctrl-C ignored to its end
            restore()
    summary.seconds = time.perf_counter() - start
    return summary


def _completing():
    """From here the run completes (its outputs are renamed into place): Ctrl-C is ignored and SIGTERM
    ends the process without unwinding, so neither reports "no output was written" over a complete
    dataset. Returns what puts the previous handlers back (for in-process callers), or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return lambda: [signal.signal(number, handler) for number, handler in previous.items()]


class Terminated(BaseException):
    """SIGTERM arrived: unwind (removing partial outputs) like an interruption."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 on success. A user error exits with status 2 and one line,
    a write failure (a full disk) with 1, Ctrl-C with 130 and SIGTERM with 143, leaving no output."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # A killed run cleans up like an interrupted one (SIGTERM would otherwise skip the clean-up).
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        args = parse_args(argv)
        if args.partitions > 1:
            print(
                "preprocess_data: --partitions is ignored; the input is processed in one pass",
                file=sys.stderr,
            )
        summary = run(args)
    except ValueError as error:
        print(f"preprocess_data: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except (OutputError, WorkerError, OSError) as error:
        print(f"preprocess_data: error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    except (KeyboardInterrupt, Terminated) as interruption:
        interrupted = isinstance(interruption, KeyboardInterrupt)
        print(
            INTERRUPTED if interrupted else INTERRUPTED.replace("interrupted", "terminated"), file=sys.stderr
        )
        raise SystemExit(130 if interrupted else 143) from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
