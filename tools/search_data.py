"""Find where a piece of (generated) code occurs verbatim in the training data, for attribution.

    python tools/search_data.py --index search-index --file generated.py
    python tools/search_data.py --index search-index --text 'def fibonacci(n): ...' --json

Exact mode prints one line per span of at least --min-tokens tokens found verbatim, longest first:

    document <id> offset <token offset in the document> length <tokens> <source metadata as JSON>

(`dataset <prefix>` before the metadata when the index covers several datasets; `no metadata` when the
dataset has no metadata sidecar) and exits 0 with no such line when nothing matches. Sketch mode prints
whether spans of the text were in the training data and the chance that the answer is a false positive.
A missing or stale index, or a tokenizer other than the data's, exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megatron.attribution.index import SearchIndex


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--index", required=True, help="directory written by tools/build_search_index.py")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--file", help="text file to search for (e.g. a generated completion)")
    query.add_argument("--text", help="text to search for")
    parser.add_argument(
        "--tokenizer-file", default=None, help="tokenizer.json (default: the one recorded in the index)"
    )
    parser.add_argument(
        "--min-tokens", type=int, default=None, help="shortest span to report (default: the index's, 50)"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "exact", "sketch"),
        default="auto",
        help="auto: the exact locator when the index has one, else the sketch",
    )
    parser.add_argument("--max-results", type=int, default=50, help="spans to print at most (default 50)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    return parser


def _tokenizer(index: SearchIndex, path: str | None):
    from megatron.data.tokenizer import build_tokenizer

    recorded = index.manifest["tokenizer"]
    if path is None:
        if recorded is None or recorded["file"] is None:
            raise ValueError(
                "the index records no tokenizer: give --tokenizer-file (the data's tokenizer.json)"
            )
        path = recorded["file"]
        if not os.path.isfile(path):
            raise ValueError(
                f"the tokenizer recorded in the index, {path}, is missing: give --tokenizer-file"
            )
    tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=path)
    index.check_tokenizer(tokenizer)
    return tokenizer


def _query_text(args) -> str:
    if args.text is not None:
        return args.text
    try:
        with open(args.file, encoding="utf-8") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--file {args.file}: cannot read it as UTF-8 text ({error})") from error


def _exact_lines(index: SearchIndex, matches, limit: int) -> list[str]:
    several = len(index.streams) > 1
    lines = []
    for match in matches[:limit]:
        metadata = index.describe(match.dataset, match.document)
        where = f" dataset {index.streams[match.dataset].prefix}" if several else ""
        about = "no metadata" if metadata is None else json.dumps(metadata, ensure_ascii=False)
        lines.append(f"document {match.document} offset {match.offset} length {match.length}{where} {about}")
    return lines


def _sketch_lines(spans, ngram: int) -> list[str]:
    if not spans:
        return ["sketch: not in the training data (no chain of n-grams long enough)"]
    return [
        f"sketch: query tokens {span.query_start}-{span.query_start + span.length} ({span.chain} consecutive "
        f"{ngram}-grams) in the training data; chance of a false positive <= {span.false_positive:.2g}"
        for span in spans
    ]


def _as_json(index, args, tokens, matches, truncated, spans) -> dict:
    result = {"query_tokens": len(tokens), "min_tokens": args.min_tokens or index.min_tokens}
    if matches is not None:
        result["truncated"] = truncated
        result["matches"] = [
            {
                "dataset": index.streams[m.dataset].prefix, "document": m.document, "offset": m.offset,
                "length": m.length, "query_start": m.query_start,
                "metadata": index.describe(m.dataset, m.document),
            }
            for m in matches[: args.max_results]
        ]  # fmt: skip
    if spans is not None:
        result["sketch"] = {
            "ngram": index.sketch.ngram,
            "fpr": index.sketch.fpr,
            "spans": [s.__dict__ for s in spans],
        }
    return result


def search(args) -> None:
    """Run one search as ``args`` say; prints the result."""
    index = SearchIndex(args.index)
    tokens = _tokenizer(index, args.tokenizer_file).encode(_query_text(args))
    mode = args.mode if args.mode != "auto" else ("exact" if index.postings is not None else "sketch")
    matches = truncated = spans = None
    if mode == "exact":
        matches, truncated = index.find(tokens, min_tokens=args.min_tokens)
    else:
        spans = index.membership(tokens, min_tokens=args.min_tokens)
    if args.json:
        print(json.dumps(_as_json(index, args, tokens, matches, truncated, spans), ensure_ascii=False))
        return
    lines = _exact_lines(index, matches, args.max_results) if matches is not None else []
    lines += _sketch_lines(spans, index.sketch.ngram) if spans is not None else []
    for line in lines:
        print(line)
    if matches is not None and len(matches) > args.max_results:
        print(
            f"search_data: {len(matches) - args.max_results} more spans (raise --max-results)",
            file=sys.stderr,
        )
    if truncated:
        print(
            "search_data: some k-grams occur over 10,000 times; only their first occurrences were checked",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.max_results < 1:
            raise ValueError(f"--max-results must be at least 1, got {args.max_results}")
        search(args)
    except ValueError as error:
        print(f"search_data: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `search_data ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
    return 0


if __name__ == "__main__":
    sys.exit(main())
