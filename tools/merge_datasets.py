"""Concatenate several Megatron ``.bin/.idx`` datasets into one (same flags as Megatron-LM's tool).

``--input`` takes dataset prefixes or directories (every ``*.idx`` with its ``.bin`` inside, sorted by
name); datasets are appended in the order given, pointers and document indices rebased. All inputs must
share one token dtype. Source-metadata sidecars (``PREFIX.meta.jsonl`` / ``.meta.offsets``, see
docs/attribution.md) are concatenated alongside, so document ids keep their metadata. The output is
written under temporary names and renamed at the end.

Example::

    python tools/merge_datasets.py --input out/part1_content_document out/part2_content_document \\
        --output-prefix out/all_content_document
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

from megatron.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    data_file_path,
    index_file_path,
    strip_suffix,
)
from megatron.data.metadata import merged_metadata
from megatron.log import progress_bar


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description="Merge Megatron .bin/.idx datasets into one.")
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="dataset prefixes (path without .bin/.idx) or directories holding them",
    )
    parser.add_argument("--output-prefix", required=True, help="prefix of the merged dataset")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)"
    )
    return parser


def expand_inputs(inputs: list[str]) -> list[str]:
    """Dataset prefixes named by ``--input`` (a directory contributes every prefix inside it)."""
    prefixes = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(strip_suffix(path) for path in glob.glob(os.path.join(item, "*.idx")))
            if not found:
                raise ValueError(f"--input directory {item} holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(strip_suffix(item))
    return prefixes


def open_inputs(prefixes: list[str]) -> list[IndexedDataset]:
    """Open and validate every input; all must share one dtype."""
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    first = datasets[0]
    for dataset in datasets[1:]:
        if dataset.dtype != first.dtype:
            raise ValueError(
                f"cannot merge datasets with different token dtypes: {first.path_prefix} is {first.dtype}, "
                f"{dataset.path_prefix} is {dataset.dtype}"
            )
    return datasets


def merge(prefixes: list[str], output_prefix: str, *, progress: bool | None = None) -> IndexedDataset:
    """Write the concatenation of ``prefixes`` to ``output_prefix`` and return it opened. ``progress``:
    a bar over the input bytes (None: only on a terminal)."""
    output_prefix = strip_suffix(output_prefix)
    resolved_output = os.path.abspath(output_prefix)
    if any(os.path.abspath(prefix) == resolved_output for prefix in prefixes):
        raise ValueError(f"--output-prefix {output_prefix} is also an input")
    datasets = open_inputs(prefixes)
    total = sum(os.path.getsize(data_file_path(dataset.path_prefix)) for dataset in datasets)
    bar = progress_bar(total=total, desc="merging", unit="B", enabled=progress)
    # The metadata sidecars (document sources) are concatenated in the same order, renamed in last.
    with (
        merged_metadata(datasets, output_prefix),
        bar,
        IndexedDatasetWriter(output_prefix, datasets[0].dtype) as writer,
    ):
        for dataset in datasets:
            writer.append_dataset(dataset.path_prefix)
            bar.update(os.path.getsize(data_file_path(dataset.path_prefix)))
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; user errors exit with status 2 and a message."""
    args = build_parser().parse_args(argv)
    try:
        prefixes = expand_inputs(args.input)
        merged = merge(prefixes, args.output_prefix, progress=False if args.no_progress else None)
    except ValueError as error:
        print(f"merge_datasets: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    print(
        f"merged {len(prefixes)} datasets: {merged.num_documents:,} documents, {len(merged):,} items, "
        f"{int(merged.sizes.sum()):,} tokens ({merged.dtype})"
    )
    print(f"wrote {data_file_path(merged.path_prefix)} and {index_file_path(merged.path_prefix)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
