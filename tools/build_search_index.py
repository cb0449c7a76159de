"""Build an attribution search index over preprocessed training data (Megatron .bin/.idx datasets).

    python tools/build_search_index.py --data-path data/python_content_document --output search-index \\
        --tokenizer-file tokenizer.json

Two modes (docs/attribution.md has their costs): `exact` hashes k-grams sampled every few tokens and
finds every verbatim span of at least --min-tokens tokens with its document and offset; `sketch` is a
Bloom filter over token n-grams that answers "was this in the training data" at a stated
false-positive rate, in a fraction of the space. `both` (the default) builds the two. Search it with
tools/search_data.py. The index is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import sys

from megatron.attribution.index import MODES, build_index, index_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--data-path", nargs="+", required=True, help="dataset prefixes (path without .bin/.idx) to index"
    )
    parser.add_argument(
        "--output", required=True, help="index directory to write (an older index is replaced)"
    )
    parser.add_argument(
        "--min-tokens",
        type=int,
        default=50,
        help="shortest span, in tokens, that a search must find (default 50); searches may ask for longer",
    )
    parser.add_argument("--mode", choices=MODES, default="both", help="what to build (default both)")
    parser.add_argument(
        "--sketch-fpr",
        type=float,
        default=0.01,
        help="design false-positive rate of the sketch per n-gram (default 0.01); the filter is sized "
        "for it from the n-gram count",
    )
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        help="tokenizer.json the data was made with: recorded so that searches use it by default and "
        "refuse another vocabulary",
    )
    parser.add_argument("--seed", type=int, default=1234, help="hash seed (default 1234)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer = None
        if args.tokenizer_file is not None:
            from megatron.data.tokenizer import build_tokenizer

            tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=args.tokenizer_file)
        manifest = build_index(
            args.data_path, args.output, min_tokens=args.min_tokens, mode=args.mode,
            sketch_fpr=args.sketch_fpr, tokenizer=tokenizer, tokenizer_path=args.tokenizer_file,
            seed=args.seed, progress=False if args.no_progress else None,
        )  # fmt: skip
    except ValueError as error:
        print(f"build_search_index: error: {error}", file=sys.stderr)
        return 2
    tokens = sum(entry["tokens"] for entry in manifest["datasets"])
    documents = sum(entry["documents"] for entry in manifest["datasets"])
    seconds = manifest["build_seconds"]
    print(
        f"indexed {documents:,} documents, {tokens:,} tokens of {len(manifest['datasets'])} dataset(s) in "
        f"{seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    if manifest["exact"] is not None:
        exact, size = manifest["exact"], index_bytes(args.output, "exact")
        print(
            f"exact: {exact['postings']:,} postings (k={exact['k']}, every {exact['stride']} tokens), "
            f"{size:,} bytes ({size / max(tokens, 1):.3f} bytes/token)"
        )
    if manifest["sketch"] is not None:
        sketch, size = manifest["sketch"], index_bytes(args.output, "sketch")
        print(
            f"sketch: {sketch['items']:,} {sketch['ngram']}-grams at false-positive rate {sketch['fpr']}, "
            f"{size:,} bytes ({size / max(tokens, 1):.3f} bytes/token)"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
