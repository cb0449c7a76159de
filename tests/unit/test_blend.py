"""Blending (greedy interleave), --data-path/--split parsing, weighted split files, build_datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megatron.data import blend
from megatron.data.blend import (
    BlendedDataset,
    blending_indices,
    build_datasets,
    normalize_weights,
    parse_data_path,
    parse_split,
    parse_weighted_split_file,
    split_document_ranges,
)
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed import IndexedDatasetWriter


def ref_blend(weights, size):
    """The rule, spelled out: sample k goes to argmax_d(w_d * (k + 1) - count_d), ties to the lowest d."""
    weights = [w / sum(weights) for w in weights]
    counts = [0] * len(weights)
    dataset_index, sample_index = [], []
    for k in range(size):
        lags = [w * float(k + 1) - c for w, c in zip(weights, counts)]
        best = max(range(len(weights)), key=lambda d: (lags[d], -d))
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return dataset_index, sample_index


def random_weights(rng, trial):
    count = int(rng.integers(1, 60))
    kind = trial % 4
    if kind == 0:
        return rng.random(count)
    if kind == 1:
        return rng.random(count) ** 6  # very uneven
    if kind == 2:
        weights = rng.random(count)
        weights[rng.random(count) < 0.4] = 0.0  # some datasets unused
        weights[0] += 0.1
        return weights
    return np.round(rng.random(count) * 3) + 1  # many exact ties


@pytest.mark.parametrize("engine", ["kernel", "python"])
def test_greedy_matches_reference(engine):
    if engine == "kernel" and blend._load_kernel() is None:
        pytest.skip("no C compiler for the blend kernel")
    rng = np.random.default_rng(0)
    for trial in range(24):
        weights = random_weights(rng, trial)
        size = int(rng.integers(0, 1500))
        if engine == "kernel":
            dataset_index, sample_index = blending_indices(weights, size)
        else:
            dataset_index, sample_index = blend._blend_python(normalize_weights(weights), size)
        expected = ref_blend(list(weights), size)
        assert dataset_index.tolist() == expected[0], trial
        assert sample_index.tolist() == expected[1], trial


def assert_within_one_sample(weights, dataset_index):
    weights = normalize_weights(weights)
    one_hot = np.zeros((len(dataset_index), len(weights)), dtype=np.int32)
    one_hot[np.arange(len(dataset_index)), dataset_index] = 1
    achieved = np.cumsum(one_hot, axis=0)
    target = np.outer(np.arange(1, len(dataset_index) + 1), weights)
    assert np.abs(achieved - target).max() < 1.0


def test_shares_within_one_sample_at_every_prefix():
    rng = np.random.default_rng(1)
    for trial in range(8):
        weights = random_weights(rng, trial)
        dataset_index, sample_index = blending_indices(weights, 4000)
        assert_within_one_sample(weights, dataset_index)
        for d in range(len(weights)):  # each dataset's samples are used in order 0, 1, 2, ...
            picked = sample_index[dataset_index == d]
            np.testing.assert_array_equal(picked, np.arange(len(picked)))


def test_many_datasets_no_255_limit():
    if blend._load_kernel() is None:
        pytest.skip("no C compiler for the blend kernel")
    weights = np.random.default_rng(2).random(600)
    dataset_index, sample_index = blending_indices(weights, 600_000)
    assert dataset_index.dtype == np.int32 and sample_index.dtype == np.int64
    assert dataset_index.max() == 599
    # every prefix: a lag peaks just before a pick, a lead just after one, the tail is the final count
    w = normalize_weights(weights)
    steps = np.arange(len(dataset_index))
    assert (w[dataset_index] * steps - sample_index).max() < 1.0
    assert (sample_index + 1 - w[dataset_index] * (steps + 1)).max() < 1.0
    counts = np.bincount(dataset_index, minlength=600)
    assert np.abs(counts - w * 600_000).max() < 1.0
    prefix = 3000  # the prefix agrees with the spelled-out rule
    assert dataset_index[:prefix].tolist() == ref_blend(list(weights), prefix)[0]


def test_weights_are_validated():
    np.testing.assert_allclose(normalize_weights([1, 3]), [0.25, 0.75])
    with pytest.raises(ValueError, match="non-negative"):
        normalize_weights([1.0, -0.5])
    with pytest.raises(ValueError, match="all zero"):
        normalize_weights([0, 0])
    with pytest.raises(ValueError, match="non-negative"):
        normalize_weights([float("nan"), 1])


class ListDataset:
    def __init__(self, tag, size):
        self.tag, self.size = tag, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return np.array([self.tag, index], dtype=np.int64)


def test_blended_dataset_reads_from_the_chosen_dataset():
    datasets = [ListDataset(0, 100), ListDataset(1, 100), ListDataset(2, 100)]
    blended = BlendedDataset(datasets, [0.5, 0.3, 0.2], 150)
    assert len(blended) == 150
    for i in range(150):
        assert blended[i].tolist() == [blended.dataset_index[i], blended.dataset_sample_index[i]]
    with pytest.raises(ValueError, match="has 10 samples, the blend needs"):
        BlendedDataset([ListDataset(0, 10), ListDataset(1, 100)], [0.5, 0.5], 100)
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset(datasets, [1.0], 10)


def test_parse_data_path():
    assert parse_data_path(["/d/a"]) == [(1.0, "/d/a")]
    assert parse_data_path(["0.3", "/d/a", "0.7", "/d/b"]) == [(0.3, "/d/a"), (0.7, "/d/b")]
    assert parse_data_path("2 /d/a 1 /d/b") == [(2.0, "/d/a"), (1.0, "/d/b")]
    with pytest.raises(ValueError, match="pairs 'WEIGHT PREFIX"):
        parse_data_path(["0.3", "/d/a", "/d/b"])
    with pytest.raises(ValueError, match="is not a non-negative number"):
        parse_data_path(["/d/a", "/d/b"])
    with pytest.raises(ValueError, match="non-negative"):
        parse_data_path(["-1", "/d/a", "2", "/d/b"])
    with pytest.raises(ValueError, match="all zero"):
        parse_data_path(["0", "/d/a", "0", "/d/b"])


def test_parse_split_and_ranges():
    assert parse_split("969, 30, 1") == parse_split("969,30,1") == parse_split("969/30/1")
    np.testing.assert_allclose(parse_split("969, 30, 1"), [0.969, 0.030, 0.001])
    assert parse_split("100") == [1.0, 0.0, 0.0]
    assert split_document_ranges("969, 30, 1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    # Megatron-LM's rounding: 3 + 3 + 3 leaves one document over, and every boundary moves by it
    assert split_document_ranges("1,1,1", 10) == [(0, 4), (4, 7), (7, 10)]
    for bad in ("a,b", "1,2,3,4", "-1,2,3", "0,0,0", ""):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_parse_weighted_split_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("python: 60.4 0:0.969 /data/python/x_content_document, java: 30 0:0.969 /data/java/y\n")
    entries = parse_weighted_split_file(str(path))
    assert [(e.name, e.weight, e.start, e.end, e.prefix) for e in entries] == [
        ("python", 60.4, 0.0, 0.969, "/data/python/x_content_document"),
        ("java", 30.0, 0.0, 0.969, "/data/java/y"),
    ]
    path.write_text('"GROUP: 0.6 0:0.5 /a, 0.4 0:1 /b"')  # BigCode's grouped form
    assert [(e.name, e.prefix) for e in parse_weighted_split_file(str(path))] == [
        ("GROUP", "/a"),
        ("GROUP", "/b"),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("python: 1 0.5:0.2 /a", r"entry 1 .*0 <= START < END <= 1"),
        ("python: x 0:1 /a", r"entry 1 .*must be numbers"),
        ("python: 1 0:1 /a, java 1 0:1", r"entry 2 .*expected 'NAME: WEIGHT START:END PREFIX'"),
        ("1 0:1 /a", r"entry 1 .*needs a name"),
        ("python: -1 0:1 /a", r"entry 1 .*non-negative"),
        ("python: 0 0:1 /a, java: 0 0:1 /b", r"all zero"),
        ("python: 1 0:1 /a,,", r"empty entry"),
        ("", r"empty file"),
    ],
)
def test_malformed_weighted_split_files(tmp_path, text, message):
    path = tmp_path / "split.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        parse_weighted_split_file(str(path))
    assert str(path) in str(error.value)


def test_missing_weighted_split_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        parse_weighted_split_file(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------------------------------------------
# build_datasets over real files


def write_corpus(prefix: Path, num_documents: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(str(prefix), np.uint16)
    for _ in range(num_documents):
        writer.add_document(rng.integers(1, 500, int(rng.integers(2, 30))).astype(np.uint16))
    writer.finalize()
    return prefix


def data_kwargs(tmp_path, **overrides):
    kwargs = dict(
        data_path=None,
        split="969, 30, 1",
        train_weighted_split_paths_path=None,
        valid_weighted_split_paths_path=None,
        test_weighted_split_paths_path=None,
        num_samples=(100, 20, 10),
        seq_length=16,
        seed=1234,
        cache_dir=str(tmp_path / "cache"),
    )
    kwargs.update(overrides)
    return kwargs


def check_samples(dataset, seq_length=16):
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        sample = dataset[i]
        assert sample.dtype == np.int64 and sample.shape == (seq_length + 1,)


def test_build_datasets_from_data_path(tmp_path):
    a = write_corpus(tmp_path / "a", 400, 0)
    b = write_corpus(tmp_path / "b", 300, 1)
    splits = build_datasets(
        **data_kwargs(tmp_path, data_path=["0.7", str(a), "0.3", str(b)], split="80,15,5")
    )
    assert isinstance(splits.train, BlendedDataset) and len(splits.train) == 100
    counts = np.bincount(splits.train.dataset_index, minlength=2)
    assert abs(counts[0] - 70) < 1
    assert [name for name, _ in splits.valid] == ["valid"] and len(splits.valid[0][1]) == 20
    assert len(splits.test) == 10
    for dataset in (splits.train, splits.valid[0][1], splits.test):
        check_samples(dataset)
    train_part = splits.train.datasets[0]
    assert train_part.document_range == (0, 320) and train_part.name == "train"

    single = build_datasets(**data_kwargs(tmp_path, data_path=[str(a)], num_samples=(50, 0, 0)))
    assert isinstance(single.train, GPTDataset) and single.valid == [] and single.test is None


def test_build_datasets_from_weighted_split_files(tmp_path):
    a = write_corpus(tmp_path / "python", 200, 2)
    b = write_corpus(tmp_path / "java", 200, 3)
    train_file = tmp_path / "train.txt"
    train_file.write_text(f"python: 60.4 0:0.9 {a}, java: 30.2 0:0.9 {b}\n")
    valid_file = tmp_path / "valid.txt"
    valid_file.write_text(f"python: 1 0.9:1 {a}, java: 1 0.9:1 {b}\n")
    splits = build_datasets(
        **data_kwargs(
            tmp_path,
            train_weighted_split_paths_path=str(train_file),
            valid_weighted_split_paths_path=str(valid_file),
        )
    )
    assert isinstance(splits.train, BlendedDataset)
    np.testing.assert_allclose(splits.train.weights, [60.4 / 90.6, 30.2 / 90.6])
    assert [dataset.document_range for dataset in splits.train.datasets] == [(0, 180), (0, 180)]
    assert [name for name, _ in splits.valid] == ["python", "java"]
    assert all(ds.document_range == (180, 200) and len(ds) >= 20 for _, ds in splits.valid)
    check_samples(splits.train)
    assert splits.test is None


def test_build_datasets_bad_inputs(tmp_path):
    a = write_corpus(tmp_path / "a", 50, 0)
    with pytest.raises(ValueError, match="data prefix '.*missing' does not exist"):
        build_datasets(**data_kwargs(tmp_path, data_path=["1", str(a), "1", str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match="--split"):
        build_datasets(**data_kwargs(tmp_path, data_path=[str(a)], split="90,x"))
    with pytest.raises(ValueError, match="all zero"):
        build_datasets(**data_kwargs(tmp_path, data_path=["0", str(a)]))
    with pytest.raises(ValueError, match="no training data"):
        build_datasets(**data_kwargs(tmp_path))
    split_file = tmp_path / "train.txt"
    split_file.write_text(f"python: 1 0:1 {tmp_path / 'nothere'}")
    with pytest.raises(ValueError, match=r"train.txt: entry 1 \(python\): data prefix"):
        build_datasets(**data_kwargs(tmp_path, train_weighted_split_paths_path=str(split_file)))
