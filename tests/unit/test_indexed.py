"""megatron/data/indexed.py against an independent reader/writer written here from docs/data-format.md."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    best_dtype,
    data_file_path,
    index_file_path,
)

# ---------------------------------------------------------------------------------------------------------
# Independent implementation of the format, from the spec only (struct + numpy, no megatron code).

SPEC_MAGIC = b"MMIDIDX\x00\x00"
# Integer codes from the spec's table (token data is always integer).
SPEC_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4}
SPEC_CODES |= {np.dtype(np.int64): 5, np.dtype(np.uint16): 8}


def spec_write(prefix, documents, dtype) -> None:
    """Write documents (each a list of items, each a list of token ids) exactly as the spec lays out."""
    dtype = np.dtype(dtype)
    items = [item for document in documents for item in document]
    sizes = [len(item) for item in items]
    pointers, offset = [], 0
    for size in sizes:
        pointers.append(offset)
        offset += size * dtype.itemsize
    document_index = [0]
    for document in documents:
        document_index.append(document_index[-1] + len(document))
    with open(f"{prefix}.bin", "wb") as stream:
        for item in items:
            stream.write(np.asarray(item, dtype=dtype).astype(dtype.newbyteorder("<")).tobytes())
    with open(f"{prefix}.idx", "wb") as stream:
        stream.write(SPEC_MAGIC)
        stream.write(struct.pack("<Q", 1))
        stream.write(struct.pack("<B", SPEC_CODES[dtype]))
        stream.write(struct.pack("<Q", len(items)))
        stream.write(struct.pack("<Q", len(document_index)))
        stream.write(struct.pack(f"<{len(sizes)}i", *sizes))
        stream.write(struct.pack(f"<{len(pointers)}q", *pointers))
        stream.write(struct.pack(f"<{len(document_index)}q", *document_index))


def spec_read(prefix):
    """(dtype, documents as lists of items as lists of ints) read per the spec."""
    with open(f"{prefix}.idx", "rb") as stream:
        raw = stream.read()
    assert raw[:9] == SPEC_MAGIC
    assert struct.unpack_from("<Q", raw, 9)[0] == 1
    dtype = {code: dtype for dtype, code in SPEC_CODES.items()}[raw[17]]
    num_items, num_entries = struct.unpack_from("<QQ", raw, 18)
    sizes = struct.unpack_from(f"<{num_items}i", raw, 34)
    pointers = struct.unpack_from(f"<{num_items}q", raw, 34 + 4 * num_items)
    document_index = struct.unpack_from(f"<{num_entries}q", raw, 34 + 12 * num_items)
    assert len(raw) == 34 + 12 * num_items + 8 * num_entries
    data = Path(f"{prefix}.bin").read_bytes()
    items = [
        np.frombuffer(data, dtype=dtype.newbyteorder("<"), count=size, offset=pointer).tolist()
        for size, pointer in zip(sizes, pointers)
    ]
    documents = [items[a:b] for a, b in zip(document_index[:-1], document_index[1:])]
    return dtype, documents


def random_documents(seed: int, num_documents: int, high: int, max_items: int = 1):
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(num_documents):
        num_items = int(rng.integers(1, max_items + 1))
        documents.append(
            [rng.integers(0, high, size=int(rng.integers(0, 40))).tolist() for _ in range(num_items)]
        )
    return documents


def write_with_writer(prefix, documents, dtype) -> None:
    writer = IndexedDatasetWriter(prefix, dtype)
    for document in documents:
        if len(document) == 1:
            writer.add_document(document[0])
        else:
            for item in document:
                writer.add_item(item)
            writer.end_document()
    writer.finalize()


def read_bytes(prefix) -> tuple[bytes, bytes]:
    return Path(data_file_path(prefix)).read_bytes(), Path(index_file_path(prefix)).read_bytes()


# ---------------------------------------------------------------------------------------------------------
# Byte compatibility


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65000), (np.int32, 100_000)])
@pytest.mark.parametrize("max_items", [1, 3])
def test_writer_is_byte_identical_to_spec_writer(tmp_path, dtype, high, max_items):
    documents = random_documents(0, 50, high, max_items)
    spec_write(tmp_path / "spec", documents, dtype)
    write_with_writer(str(tmp_path / "ours"), documents, dtype)
    assert read_bytes(tmp_path / "ours") == read_bytes(tmp_path / "spec")


def test_reader_reads_spec_files(tmp_path):
    documents = random_documents(1, 30, 50_000, max_items=3)
    spec_write(tmp_path / "spec", documents, np.uint16)
    dataset = IndexedDataset(str(tmp_path / "spec"))
    items = [item for document in documents for item in document]
    assert len(dataset) == len(items)
    assert dataset.num_documents == len(documents)
    assert dataset.dtype == np.uint16
    assert dataset.sizes.dtype == np.int32 and dataset.pointers.dtype == np.int64
    assert dataset.sizes.tolist() == [len(item) for item in items]
    assert dataset.document_indices.tolist()[0] == 0 and dataset.document_indices[-1] == len(items)
    for i, item in enumerate(items):
        assert dataset[i].tolist() == item
    assert dataset[-1].tolist() == items[-1]
    assert [a.tolist() for a in dataset[2:5]] == items[2:5]
    longest = int(np.argmax(dataset.sizes))
    assert dataset.get(longest, offset=2, length=3).tolist() == items[longest][2:5]
    assert dataset.get(longest, offset=4).tolist() == items[longest][4:]
    with pytest.raises(IndexError):
        dataset.get(longest, offset=1, length=len(items[longest]))


def test_round_trip_through_spec_reader(tmp_path):
    documents = random_documents(2, 20, 1000, max_items=2)
    write_with_writer(str(tmp_path / "ours"), documents, np.int32)
    dtype, read_back = spec_read(tmp_path / "ours")
    assert dtype == np.int32 and read_back == documents


def test_add_documents_matches_add_document(tmp_path):
    documents = [item[0] for item in random_documents(3, 25, 3000)]
    one = IndexedDatasetWriter(str(tmp_path / "one"), np.uint16)
    for document in documents:
        one.add_document(document)
    one.finalize()
    bulk = IndexedDatasetWriter(str(tmp_path / "bulk"), np.uint16)
    flat = np.array([t for d in documents for t in d], dtype=np.uint32)
    bulk.add_documents(flat[:0], [])
    bulk.add_documents(flat, [len(d) for d in documents])
    bulk.finalize()
    assert read_bytes(tmp_path / "one") == read_bytes(tmp_path / "bulk")


def test_best_dtype_follows_megatron():
    assert best_dtype(49152) == np.uint16
    assert best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32


def test_token_outside_dtype_is_rejected(tmp_path):
    writer = IndexedDatasetWriter(str(tmp_path / "x"), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        writer.add_document([1, 70000])
    writer.abort()


def test_empty_dataset_round_trips(tmp_path):
    IndexedDatasetWriter(str(tmp_path / "empty"), np.uint16).finalize()
    dataset = IndexedDataset(str(tmp_path / "empty"))
    assert len(dataset) == 0 and dataset.num_documents == 0


# ---------------------------------------------------------------------------------------------------------
# Atomic writes


def test_nothing_final_until_finalize_and_abort_cleans_up(tmp_path):
    prefix = str(tmp_path / "out")
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([1, 2, 3])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_exception_in_context_aborts_and_keeps_previous_output(tmp_path):
    prefix = str(tmp_path / "out")
    spec_write(prefix, [[[7, 8]]], np.uint16)
    before = read_bytes(prefix)
    with pytest.raises(KeyboardInterrupt), IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
        raise KeyboardInterrupt
    assert read_bytes(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]


def test_finalize_replaces_previous_output(tmp_path):
    prefix = str(tmp_path / "out")
    spec_write(prefix, [[[7, 8]]], np.uint16)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
    assert IndexedDataset(prefix)[0].tolist() == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "out.idx"]


# ---------------------------------------------------------------------------------------------------------
# Merge


def test_append_dataset_equals_concatenation(tmp_path):
    first = random_documents(4, 10, 500, max_items=2)
    second = random_documents(5, 7, 500, max_items=3)
    spec_write(tmp_path / "a", first, np.uint16)
    spec_write(tmp_path / "b", second, np.uint16)
    spec_write(tmp_path / "expected", first + second + first, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "merged"), np.uint16) as writer:
        writer.append_dataset(str(tmp_path / "a"))
        writer.append_dataset(str(tmp_path / "b.idx"))
        writer.append_dataset(str(tmp_path / "a"))
    assert read_bytes(tmp_path / "merged") == read_bytes(tmp_path / "expected")


def test_append_dataset_rejects_other_dtype(tmp_path):
    spec_write(tmp_path / "a", [[[1]]], np.int32)
    writer = IndexedDatasetWriter(str(tmp_path / "merged"), np.uint16)
    with pytest.raises(ValueError, match="dtypes differ"):
        writer.append_dataset(str(tmp_path / "a"))
    writer.abort()


# ---------------------------------------------------------------------------------------------------------
# Validation: each corruption names the file and the problem


@pytest.fixture
def good_prefix(tmp_path):
    prefix = tmp_path / "good"
    spec_write(prefix, [[[1, 2, 3]], [[4, 5]], [[6]]], np.uint16)
    return prefix


def _rewrite_idx(prefix, transform):
    path = f"{prefix}.idx"
    Path(path).write_bytes(bytes(transform(bytearray(Path(path).read_bytes()))))
    return path


def test_missing_prefix_names_files(tmp_path):
    with pytest.raises(ValueError, match=r"not found.*nothere\.idx"):
        IndexedDataset(str(tmp_path / "nothere"))


def test_missing_bin_names_it(good_prefix):
    os.remove(f"{good_prefix}.bin")
    with pytest.raises(ValueError, match=r"good\.bin"):
        IndexedDataset(str(good_prefix))


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda raw: raw[:20], "truncated index file"),
        (lambda raw: raw[:-8], "index file truncated"),
        (lambda raw: raw + b"\0", "trailing bytes"),
        (lambda raw: b"NOTMAGIC!" + raw[9:], "magic"),
        (lambda raw: raw[:9] + struct.pack("<Q", 2) + raw[17:], "version 2"),
        (lambda raw: raw[:17] + bytes([42]) + raw[18:], "dtype code 42"),
        (lambda raw: raw[: 34 + 12 + 8] + struct.pack("<q", 5) + raw[34 + 12 + 16 :], "pointer of item 1"),
        (lambda raw: raw[:-8] + struct.pack("<q", 2), "document index"),
    ],
)
def test_corrupt_index_names_file_and_problem(good_prefix, transform, message):
    path = _rewrite_idx(good_prefix, transform)
    with pytest.raises(ValueError, match=message) as error:
        IndexedDataset(str(good_prefix))
    assert path in str(error.value)


def test_short_bin_names_file(good_prefix):
    path = f"{good_prefix}.bin"
    Path(path).write_bytes(Path(path).read_bytes()[:-2])
    with pytest.raises(ValueError, match="shorter than its index") as error:
        IndexedDataset(str(good_prefix))
    assert path in str(error.value)


def test_pickle_reopens_instead_of_copying(tmp_path):
    import pickle

    documents = random_documents(6, 50, 1000)
    spec_write(tmp_path / "spec", documents, np.uint16)
    dataset = IndexedDataset(str(tmp_path / "spec"))
    payload = pickle.dumps(dataset)
    assert len(payload) < 500  # the path, not the tokens
    clone = pickle.loads(payload)
    assert [clone[i].tolist() for i in range(len(clone))] == [d[0] for d in documents]
