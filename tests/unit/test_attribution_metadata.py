"""The source-metadata sidecar: written with its dataset, aligned with document ids, replaced (never left
stale) by a new dataset at the same prefix, refused when it does not fit, concatenated by a merge."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron.data.indexed import IndexedDataset
from megatron.data.metadata import (
    DocumentWriter,
    SourceMetadata,
    jsonl_path,
    merged_metadata,
    metadata_line,
    offsets_path,
)

KEYS = ("max_stars_repo_name", "max_stars_repo_path", "max_stars_repo_licenses")


def _records(count: int, tag: str) -> list[dict]:
    return [
        {"max_stars_repo_name": f"org/{tag}", "max_stars_repo_path": f"src/{tag}{i}.py", "content": "x"}
        | ({"max_stars_repo_licenses": ["MIT", "Apache-2.0"]} if i % 2 else {"max_stars_repo_licenses": None})
        for i in range(count)
    ]


def _write(prefix: str, records: list[dict], keys=KEYS) -> None:
    writer = DocumentWriter(prefix, np.uint16, keys)
    lengths = np.arange(1, len(records) + 1)
    for part in (slice(0, len(records) // 2), slice(len(records) // 2, None)):  # several chunks
        writer.add_documents(
            np.ones(int(lengths[part].sum()), np.uint16),
            lengths[part],
            [metadata_line(r, keys) for r in records[part]],
        )
    writer.finalize()


def test_lookup_by_document_id(tmp_path):
    prefix = str(tmp_path / "a")
    records = _records(1001, "a")
    _write(prefix, records)
    metadata = SourceMetadata.open(prefix, IndexedDataset(prefix).num_documents)
    assert len(metadata) == 1001
    for document in (0, 1, 500, 1000):
        expected = {key: records[document][key] for key in KEYS if records[document][key] is not None}
        assert metadata[document] == expected
    with open(jsonl_path(prefix)) as stream:  # line d + 1 is document d, for people with sed
        assert json.loads(stream.readlines()[500]) == metadata[500]
    with pytest.raises(IndexError):
        metadata[1001]


def test_a_new_dataset_replaces_or_removes_the_old_sidecar(tmp_path):
    prefix = str(tmp_path / "a")
    _write(prefix, _records(10, "old"))
    _write(prefix, _records(4, "new"))
    assert SourceMetadata.open(prefix, 4)[3]["max_stars_repo_name"] == "org/new"
    _write(prefix, _records(6, "bare"), keys=())  # no metadata wanted: the old sidecar must not stay
    assert SourceMetadata.open(prefix) is None and IndexedDataset(prefix).num_documents == 6


def test_an_aborted_write_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "a")
    writer = DocumentWriter(prefix, np.uint16, KEYS)
    writer.add_documents(np.ones(3, np.uint16), [3], [b"{}"])
    with pytest.raises(ValueError, match="1 documents but 0 metadata lines"):
        writer.add_documents(np.ones(3, np.uint16), [3], [])
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_a_sidecar_that_does_not_fit_is_refused(tmp_path):
    prefix = str(tmp_path / "a")
    _write(prefix, _records(10, "a"))
    with pytest.raises(ValueError, match="describes 10 documents but the dataset has 9"):
        SourceMetadata.open(prefix, 9)
    with open(jsonl_path(prefix), "ab") as stream:
        stream.write(b"{}\n")
    with pytest.raises(ValueError, match="truncated or mismatched"):
        SourceMetadata.open(prefix)
    with open(offsets_path(prefix), "r+b") as stream:
        stream.write(b"NOTMETA!")
    with pytest.raises(ValueError, match="not a metadata offsets file"):
        SourceMetadata.open(prefix)


def _merge(prefixes, output):
    from megatron.data.indexed import IndexedDatasetWriter

    datasets = [IndexedDataset(p) for p in prefixes]
    with merged_metadata(datasets, output), IndexedDatasetWriter(output, np.uint16) as writer:
        for dataset in datasets:
            writer.append_dataset(dataset.path_prefix)


def test_merge_concatenates_and_fills_inputs_without_metadata(tmp_path):
    a, b, c, out = (str(tmp_path / name) for name in "abco")
    _write(a, _records(3, "a"))
    _write(b, _records(2, "b"), keys=())
    _write(c, _records(4, "c"))
    _merge([a, b, c], out)
    merged = SourceMetadata.open(out, 9)
    assert [merged[d].get("max_stars_repo_name") for d in range(9)] == ["org/a"] * 3 + [None] * 2 + [
        "org/c"
    ] * 4
    assert merged[8] == SourceMetadata.open(c)[3]
    _merge([b, b], out)  # no input has metadata: the output's old sidecar goes
    assert SourceMetadata.open(out) is None
