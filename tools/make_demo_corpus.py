"""Write a small code corpus as JSONL in The Stack's shape, from local source trees.

By default it reads the Python standard library of the running interpreter, so the quickstart has a
corpus on any machine with Python and no downloads. Files are visited in sorted order, so the output
is the same on every run for the same source trees.

    python tools/make_demo_corpus.py --output demo.jsonl
    python tools/make_demo_corpus.py --output c.jsonl ~/src/project --extensions .c .h --max-files 500
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from megatron.fileio import create_temporary

# The Stack's `lang` names for common extensions; anything else gets the extension without its dot.
LANGUAGE_BY_EXTENSION = {
    ".py": "Python",
    ".pyi": "Python",
    ".c": "C",
    ".h": "C",
    ".cc": "C++",
    ".cpp": "C++",
    ".hpp": "C++",
    ".cu": "Cuda",
    ".java": "Java",
    ".js": "JavaScript",
    ".ts": "TypeScript",
    ".go": "Go",
    ".rs": "Rust",
    ".rb": "Ruby",
    ".sh": "Shell",
    ".md": "Markdown",
    ".rst": "reStructuredText",
    ".toml": "TOML",
    ".yaml": "YAML",
    ".yml": "YAML",
    ".json": "JSON",
}

# Directories never part of a source tree's own code (installed packages, caches, VCS data).
SKIPPED_DIRECTORIES = {"site-packages", "dist-packages", "__pycache__", ".git", ".hg", ".svn", ".venv"}


def default_source_directory() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_files(root: Path, extensions: tuple[str, ...]) -> Iterator[Path]:
    """Yield files under `root` with one of `extensions`, depth first in sorted name order."""
    for directory, subdirectories, filenames in os.walk(root):
        # Sorting in place fixes os.walk's visiting order, which is otherwise filesystem dependent.
        subdirectories[:] = sorted(d for d in subdirectories if d not in SKIPPED_DIRECTORIES)
        for filename in sorted(filenames):
            if filename.endswith(extensions):
                path = Path(directory) / filename
                if path.is_file():
                    yield path


def make_record(path: Path, root: Path, text: str, num_bytes: int) -> dict:
    """One JSON record with The Stack's field names for the file at `path`."""
    relative_path = path.relative_to(root).as_posix()
    lines = text.splitlines() or [""]
    num_alphanumeric = sum(character.isalnum() for character in text)
    # git's blob hash, as The Stack's `hexsha` is.
    blob_hash = hashlib.sha1(b"blob %d\0" % num_bytes + text.encode("utf-8")).hexdigest()
    return {
        "hexsha": blob_hash,
        "size": num_bytes,
        "ext": path.suffix.lstrip("."),
        "lang": LANGUAGE_BY_EXTENSION.get(path.suffix, path.suffix.lstrip(".")),
        "path": relative_path,
        "max_stars_repo_path": relative_path,
        "max_stars_repo_name": f"local/{root.name}",
        "max_stars_repo_head_hexsha": None,
        "max_stars_repo_licenses": [],
        "max_stars_count": 0,
        "content": text,
        "avg_line_length": sum(len(line) for line in lines) / len(lines),
        "max_line_length": max(len(line) for line in lines),
        "alphanum_fraction": num_alphanumeric / max(len(text), 1),
    }


def read_source(path: Path, max_bytes_per_file: int) -> tuple[str | None, str]:
    """Return (text, "") for a usable file, else (None, reason it is skipped)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, "unreadable"
    if not data.strip():
        return None, "empty"
    if len(data) > max_bytes_per_file:
        return None, "larger than --max-bytes-per-file"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "not valid UTF-8"


def iter_records(
    roots: list[Path],
    extensions: tuple[str, ...],
    max_files: int | None,
    max_bytes_per_file: int,
    skipped: Counter,
) -> Iterator[dict]:
    """Yield records for every usable file under `roots`, counting skipped files by reason in `skipped`."""
    num_files = 0
    for root in roots:
        for path in iter_source_files(root, extensions):
            if max_files is not None and num_files >= max_files:
                return
            text, reason = read_source(path, max_bytes_per_file)
            if text is None:
                skipped[reason] += 1
                continue
            num_files += 1
            yield make_record(path, root, text, len(text.encode("utf-8")))


def write_jsonl_atomically(records: Iterator[dict], output: Path) -> tuple[int, int]:
    """Write records to `output` through a temporary file renamed at the end; return (records, bytes of content)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    file_descriptor, temporary_name = create_temporary(output.parent, f".{output.name}.")  # umask mode
    num_records = num_content_bytes = 0
    try:
        with os.fdopen(file_descriptor, "w", encoding="utf-8") as file:
            for record in records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                num_records += 1
                num_content_bytes += record["size"]
        os.replace(temporary_name, output)
    except BaseException:
        Path(temporary_name).unlink(missing_ok=True)
        raise
    return num_records, num_content_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write source files as JSONL in The Stack's shape (content, lang, path, size, ...). "
        "Defaults to the running interpreter's standard library.",
    )
    parser.add_argument(
        "sources",
        nargs="*",
        type=Path,
        help="source directories to read (default: the Python standard library of this interpreter)",
    )
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument(
        "--extensions", nargs="+", default=[".py"], help="file name endings to include (default: .py)"
    )
    parser.add_argument("--max-files", type=int, default=None, help="stop after this many files")
    parser.add_argument(
        "--max-bytes-per-file",
        type=int,
        default=1_000_000,
        help="skip files larger than this many bytes (default: 1000000)",
    )
    return parser


def validate_arguments(args: argparse.Namespace) -> list[Path]:
    """Check user-given values; return the source directories to read."""
    if args.max_files is not None and args.max_files < 1:
        raise ValueError(f"--max-files must be at least 1, got {args.max_files}")
    if args.max_bytes_per_file < 1:
        raise ValueError(f"--max-bytes-per-file must be at least 1, got {args.max_bytes_per_file}")
    roots = args.sources or [default_source_directory()]
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"source directory {str(root)!r} does not exist or is not a directory")
    return [root.resolve() for root in roots]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        roots = validate_arguments(args)
    except ValueError as error:
        print(f"make_demo_corpus: error: {error}", file=sys.stderr)
        return 2
    # "py" and ".py" both mean the extension .py, never a name merely ending in "py".
    extensions = tuple(
        extension if extension.startswith(".") else f".{extension}" for extension in args.extensions
    )
    skipped: Counter = Counter()
    records = iter_records(roots, extensions, args.max_files, args.max_bytes_per_file, skipped)
    num_records, num_bytes = write_jsonl_atomically(records, args.output)
    skipped_text = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "none"
    print(
        f"wrote {num_records} files ({num_bytes / 1e6:.2f} MB of content) to {args.output}; "
        f"skipped: {skipped_text}"
    )
    if num_records == 0:
        print(f"make_demo_corpus: warning: no files with {', '.join(extensions)} found", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
