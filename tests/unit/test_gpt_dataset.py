"""GPT dataset indices against a slow reference of docs/data-format.md, caching and concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron.data import gpt_dataset, gpt_indices
from megatron.data.gpt_dataset import GPTDataset, build_indices, cache_key, plan_indices, uniform_shuffle
from megatron.data.indexed import IndexedDataset, IndexedDatasetWriter

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------
# The reference: the spec written as plain loops.


def ref_num_epochs(tokens_per_epoch, seq_length, num_samples):
    epochs = 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def ref_separate_last(tokens_per_epoch, seq_length, num_samples, epochs):
    if epochs == 1:
        return False
    earlier = ((epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    return num_samples - earlier < int(0.8 * per_epoch)


def ref_sample_idx(sizes, doc_idx, seq_length, num_samples_total):
    """Megatron-LM's build_sample_idx loop."""
    rows = [(0, 0)]
    position, offset = 0, 0
    while len(rows) <= num_samples_total:
        remaining = seq_length + 1
        while remaining:
            length = int(sizes[doc_idx[position]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                position, offset = position + 1, 0
        rows.append((position, offset))
    return np.array(rows, dtype=np.int64)


def ref_sample_tokens(documents, doc_idx, sample_idx, j):
    """Sample j read the obvious way: the flat token stream of doc_idx from row j to row j+1 inclusive."""
    (d0, o0), (d1, o1) = sample_idx[j], sample_idx[j + 1]
    tokens = []
    for position in range(d0, d1 + 1):
        doc = list(documents[doc_idx[position]])
        start = o0 if position == d0 else 0
        stop = o1 + 1 if position == d1 else len(doc)
        tokens.extend(doc[start:stop])
    return tokens


def check_against_reference(sizes, document_range, num_samples, seq_length, seed):
    arrays = build_indices(sizes, document_range, num_samples, seq_length, seed)
    start, end = document_range
    tokens = int(sizes[start:end].sum())
    epochs = ref_num_epochs(tokens, seq_length, num_samples)
    separate = ref_separate_last(tokens, seq_length, num_samples, epochs)
    total = (epochs * tokens - 1) // seq_length
    documents = list(range(start, end))
    assert len(arrays.doc_idx) == epochs * len(documents)
    if separate:
        first = arrays.doc_idx[: (epochs - 1) * len(documents)]
        assert Counter(first.tolist()) == Counter(documents * (epochs - 1))
        assert sorted(arrays.doc_idx[len(first) :].tolist()) == documents
        num_first = ((epochs - 1) * tokens - 1) // seq_length
    else:
        assert Counter(arrays.doc_idx.tolist()) == Counter(documents * epochs)
        num_first = total
    assert arrays.sample_idx.dtype == np.int64
    np.testing.assert_array_equal(arrays.sample_idx, ref_sample_idx(sizes, arrays.doc_idx, seq_length, total))
    assert arrays.shuffle_idx.dtype == np.int64
    assert sorted(arrays.shuffle_idx[:num_first].tolist()) == list(range(num_first))
    assert sorted(arrays.shuffle_idx[num_first:].tolist()) == list(range(num_first, total))
    assert total >= num_samples
    return arrays, separate, epochs


@pytest.fixture(params=["whole-array", "blocked"])
def shuffle_mode(request, monkeypatch):
    """Run a test with the plain shuffle and with tiny buckets that force the blocked shuffle."""
    if request.param == "blocked":
        monkeypatch.setattr(gpt_indices, "_SHUFFLE_BUCKET_ELEMENTS", 4)
        monkeypatch.setattr(gpt_indices, "_SHUFFLE_CHUNK_ELEMENTS", 8)
        monkeypatch.setattr(gpt_indices, "_SAMPLE_BLOCK_DOCS", 5)
    return request.param


def test_indices_match_reference_on_random_inputs(shuffle_mode):
    rng = np.random.default_rng(0)
    seen_separate = seen_multi_epoch = 0
    for _ in range(60):
        num_documents = int(rng.integers(1, 25))
        sizes = rng.integers(0, 15, num_documents).astype(np.int32)
        sizes[rng.integers(num_documents)] += 2  # at least 2 tokens in the range
        start = int(rng.integers(0, num_documents))
        end = int(rng.integers(start + 1, num_documents + 1))
        if sizes[start:end].sum() < 2:
            continue
        _, separate, epochs = check_against_reference(
            sizes, (start, end), int(rng.integers(0, 50)), int(rng.integers(1, 30)), int(rng.integers(0, 99))
        )
        seen_separate += separate
        seen_multi_epoch += epochs > 1
    assert seen_separate and seen_multi_epoch  # both paths were exercised


def test_separate_last_epoch_is_shuffled_on_its_own(shuffle_mode):
    sizes = np.full(10, 10, dtype=np.int32)  # 100 tokens per epoch, 9 samples of 11 per epoch at seq 11
    arrays, separate, epochs = check_against_reference(sizes, (0, 10), 30, 11, 5)
    assert separate and epochs == 4  # the 4th epoch contributes 30 - 27 = 3 < 0.8 * 9 samples
    arrays, separate, epochs = check_against_reference(sizes, (0, 10), 35, 11, 5)
    assert not separate and epochs == 4  # now it contributes 8 >= 7


def test_fused_build_equals_two_pass_build(shuffle_mode):
    sizes = np.random.default_rng(3).integers(1, 40, 50).astype(np.int32)
    plan = plan_indices(sizes, (5, 45), 200, 16)
    fused = build_indices(sizes, (5, 45), 200, 16, 7)
    doc_idx = gpt_dataset.build_doc_idx(
        (5, 45), plan.num_epochs, plan.separate_last_epoch, np.random.default_rng([7, 0])
    )
    np.testing.assert_array_equal(fused.doc_idx, doc_idx)
    np.testing.assert_array_equal(
        fused.sample_idx, gpt_dataset.build_sample_idx(sizes, doc_idx, 16, plan.num_samples_total)
    )


def test_offsets_beyond_32_bits():
    # three documents of 2**31 - 1 tokens: sample starts reach 6.4e9 tokens, past int32 and uint32
    size = 2**31 - 1
    sizes = np.full(3, size, dtype=np.int32)
    seq_length = 2**28
    arrays = build_indices(sizes, (0, 3), 20, seq_length, 0)
    total = (3 * size - 1) // seq_length
    assert arrays.sample_idx.dtype == np.int64 and len(arrays.sample_idx) == total + 1
    np.testing.assert_array_equal(arrays.sample_idx, ref_sample_idx(sizes, arrays.doc_idx, seq_length, total))
    starts = np.arange(1, total + 1, dtype=np.int64) * seq_length
    np.testing.assert_array_equal(arrays.sample_idx[1:, 0], starts // size)
    np.testing.assert_array_equal(arrays.sample_idx[1:, 1], starts % size)
    assert starts[-1] > 2**32


def test_rng_streams_are_pinned():
    # Fails if NumPy changes its Generator streams: caches stay valid, but fresh builds would differ.
    arrays = build_indices(np.array([3, 5, 2, 7, 4, 6], dtype=np.int32), (0, 6), 10, 4, 1234)
    assert arrays.doc_idx.tolist() == [0, 3, 5, 5, 0, 2, 2, 4, 1, 1, 3, 4]
    assert arrays.shuffle_idx.tolist() == [5, 11, 0, 9, 8, 1, 4, 10, 2, 12, 7, 6, 3]


def test_uniform_shuffle_is_uniform(monkeypatch):
    # Force 4 buckets for 4 values so the blocked (Rao-Sandelius) path runs; all 24 orders equally likely.
    monkeypatch.setattr(gpt_indices, "_SHUFFLE_BUCKET_ELEMENTS", 1)
    monkeypatch.setattr(gpt_indices, "_SHUFFLE_CHUNK_ELEMENTS", 2)
    rng = np.random.default_rng(11)
    trials = 24_000
    counts = Counter(tuple(uniform_shuffle(np.arange(4), rng).tolist()) for _ in range(trials))
    assert len(counts) == 24
    expected = trials / 24
    chi_square = sum((count - expected) ** 2 / expected for count in counts.values())
    assert chi_square < 49.7  # 23 degrees of freedom, p = 0.001


def test_bad_inputs_have_messages():
    sizes = np.array([3, 4, 5], dtype=np.int32)
    with pytest.raises(ValueError, match="document range"):
        build_indices(sizes, (2, 5), 1, 4, 0)
    with pytest.raises(ValueError, match="document range"):
        build_indices(sizes, (2, 2), 1, 4, 0)
    with pytest.raises(ValueError, match="seed"):
        build_indices(sizes, (0, 3), 1, 4, -1)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        build_indices(np.zeros(3, dtype=np.int32), (0, 3), 1, 4, 0)


# ---------------------------------------------------------------------------------------------------
# Over real files: sample contents and the cache


def write_dataset(prefix: Path, documents) -> IndexedDataset:
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for document in documents:
        writer.add_document(np.asarray(document, dtype=np.uint16))
    writer.finalize()
    return IndexedDataset(str(prefix))


def make_documents(count=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, int(rng.integers(1, 12))).tolist() for _ in range(count)]


def test_samples_cross_documents_and_overlap_by_one(tmp_path):
    documents = make_documents()
    indexed = write_dataset(tmp_path / "data", documents)
    dataset = GPTDataset(indexed, name="train", document_range=(2, 18), num_samples=40, seq_length=8, seed=3)
    assert len(dataset) >= 40
    crossing = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample.dtype == np.int64 and sample.shape == (9,)
        j = int(dataset.shuffle_idx[i])
        assert sample.tolist() == ref_sample_tokens(documents, dataset.doc_idx, dataset.sample_idx, j)
        crossing += dataset.sample_idx[j, 0] != dataset.sample_idx[j + 1, 0]
    assert crossing > 0
    # unshuffled consecutive samples share one token: the last label of one is the first input of the next
    order = np.argsort(dataset.shuffle_idx)
    for j in range(len(dataset) - 1):
        assert dataset[order[j]][-1] == dataset[order[j + 1]][0]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_cache_name_hashes_every_input():
    sizes = np.arange(1, 30, dtype=np.int32)
    base = cache_key(sizes, (0, 20), 100, 16, 1)
    changed = [
        cache_key(sizes, (1, 20), 100, 16, 1),
        cache_key(sizes, (0, 19), 100, 16, 1),
        cache_key(sizes, (0, 20), 101, 16, 1),
        cache_key(sizes, (0, 20), 100, 17, 1),
        cache_key(sizes, (0, 20), 100, 16, 2),
        cache_key(np.concatenate([sizes[:5], [99], sizes[6:]]).astype(np.int32), (0, 20), 100, 16, 1),
    ]
    assert base == cache_key(sizes.copy(), (0, 20), 100, 16, 1)
    assert len({base, *changed}) == len(changed) + 1


def test_cache_is_written_then_reused(tmp_path, monkeypatch):
    indexed = write_dataset(tmp_path / "data", make_documents())
    first = GPTDataset(indexed, name="train", document_range=(0, 20), num_samples=30, seq_length=8, seed=1)
    cached = sorted(p.name for p in tmp_path.glob("*.npy"))
    assert len(cached) == 3 and all(name.startswith("data_train_") for name in cached)
    assert not list(tmp_path.glob(".tmp-*"))

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although a valid cache exists")

    monkeypatch.setattr(gpt_dataset, "build_indices", no_build)
    second = GPTDataset(indexed, name="train", document_range=(0, 20), num_samples=30, seq_length=8, seed=1)
    for a, b in zip(
        (first.doc_idx, first.sample_idx, first.shuffle_idx),
        (second.doc_idx, second.sample_idx, second.shuffle_idx),
    ):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AssertionError, match="rebuilt"):  # another range must not reuse this cache
        GPTDataset(indexed, name="train", document_range=(0, 19), num_samples=30, seq_length=8, seed=1)


def test_damaged_cache_is_rebuilt(tmp_path):
    indexed = write_dataset(tmp_path / "data", make_documents())
    cache = tmp_path / "cache"
    kwargs = dict(
        name="valid", document_range=(0, 20), num_samples=30, seq_length=8, seed=1, cache_dir=str(cache)
    )
    good = GPTDataset(indexed, **kwargs)
    sample_file = next(cache.glob("*_sample_idx.npy"))
    sample_file.write_bytes(sample_file.read_bytes()[:-16])  # truncated
    shuffle_file = next(cache.glob("*_shuffle_idx.npy"))
    np.save(shuffle_file, np.arange(3, dtype=np.int64))  # wrong shape under the right name
    again = GPTDataset(indexed, **kwargs)
    np.testing.assert_array_equal(again.sample_idx, good.sample_idx)
    np.testing.assert_array_equal(again.shuffle_idx, good.shuffle_idx)
    assert len(np.load(shuffle_file)) == len(good.shuffle_idx)  # republished


_BUILDER = textwrap.dedent(
    """
    import contextlib, sys
    import numpy as np
    from megatron.data import gpt_dataset
    from megatron.data.indexed import IndexedDataset
    if sys.argv[3] == "nolock":  # every process builds and publishes, as on nodes without shared locks
        gpt_dataset._build_lock = lambda *args, **kwargs: contextlib.nullcontext()
    ds = gpt_dataset.GPTDataset(IndexedDataset(sys.argv[1]), name="train", document_range=(0, 3000),
                                num_samples=20000, seq_length=64, seed=9, cache_dir=sys.argv[2])
    np.save(sys.argv[4], np.asarray(ds.sample_idx)[:, 0] + np.asarray(ds.shuffle_idx).sum())
    """
)


@pytest.mark.parametrize("lock", ["lock", "nolock"])
def test_concurrent_builders_leave_a_valid_cache(tmp_path, lock):
    documents = make_documents(3000, seed=5)
    write_dataset(tmp_path / "data", documents)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outputs = [tmp_path / f"out{i}.npy" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILDER, str(tmp_path / "data"), str(cache), lock, str(out)], env=env
        )
        for out in outputs
    ]
    assert all(process.wait(timeout=120) == 0 for process in processes)
    np.testing.assert_array_equal(np.load(outputs[0]), np.load(outputs[1]))
    assert len(list(cache.glob("*.npy"))) == 3 and not list(cache.glob(".tmp-*"))
    plan = plan_indices(IndexedDataset(str(tmp_path / "data")).sizes, (0, 3000), 20000, 64)
    paths = {p.name.rsplit("_", 2)[-2] + "_" + p.name.rsplit("_", 2)[-1]: p for p in cache.glob("*.npy")}
    loaded = gpt_dataset._load_cached({k[: -len(".npy")]: str(v) for k, v in paths.items()}, plan)
    assert loaded is not None
    expected = build_indices(IndexedDataset(str(tmp_path / "data")).sizes, (0, 3000), 20000, 64, 9)
    np.testing.assert_array_equal(loaded.sample_idx, expected.sample_idx)
