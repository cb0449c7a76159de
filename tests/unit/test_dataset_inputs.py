"""Bad dataset and checkpoint inputs answered in the library: token ids outside the tokenizer's
vocabulary, splits that round to no document, data shorter than one sample, index-cache file modes,
index-building progress, and the checkpoint shape-mismatch message."""

from __future__ import annotations

import os
import stat
import threading

import numpy as np
import pytest
import torch

from megatron.checkpoint.mismatch import NUM_SHOWN, check_fits, mismatch_message
from megatron.data import blend, gpt_dataset, token_ids
from megatron.data.blend import build_datasets
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron.data.token_ids import StartupCheck, TokenBound, TokenIdError, first_out_of_range

BOUND = TokenBound(1000, "TokenizerFromFile(/data/tok.json)")
SEQ = 16


def write_dataset(prefix, documents, dtype=np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(np.asarray(document))
    return str(prefix)


def clean_documents(num_documents=40, length=50, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, BOUND.limit, size=length) for _ in range(num_documents)]


def gpt(prefix, cache_dir, bound=BOUND, num_samples=60, name="train") -> GPTDataset:
    indexed = IndexedDataset(prefix)
    return GPTDataset(
        indexed,
        name=name,
        document_range=(0, len(indexed)),
        num_samples=num_samples,
        seq_length=SEQ,
        seed=3,
        cache_dir=str(cache_dir),
        token_bound=bound,
    )


def build(prefix, cache_dir, *, split="95,5,0", num_samples=(40, 8, 0), bound=BOUND, data_path=None):
    return build_datasets(
        data_path=data_path or [prefix],
        split=split,
        train_weighted_split_paths_path=None,
        valid_weighted_split_paths_path=None,
        test_weighted_split_paths_path=None,
        num_samples=num_samples,
        seq_length=SEQ,
        seed=3,
        cache_dir=str(cache_dir),
        token_bound=bound,
    )


# ---------------------------------------------------------------------------------------------------
# token ids


@pytest.mark.parametrize(
    "dtype, tokens, expected",
    [
        (np.uint16, [1, 999, 3], None),
        (np.uint16, [1, 2, 1000, 5000], 2),  # the padding of the model's vocabulary is out of range too
        (np.int32, [5, -1, 7], 1),  # a negative id of a signed dtype, in the same single pass
        (np.int64, [], None),
    ],
)
def test_first_out_of_range_checks_both_ends(dtype, tokens, expected):
    assert first_out_of_range(np.asarray(tokens, dtype=dtype), BOUND.limit) == expected


def test_bound_is_the_tokenizers_own_vocabulary(tiny_tokenizer):
    bound = TokenBound.of(tiny_tokenizer)
    assert bound.limit == tiny_tokenizer.vocab_size and tiny_tokenizer.name in bound.tokenizer


def corrupt(documents, document, position, token_id):
    documents = [d.copy() for d in documents]
    documents[document] = documents[document].astype(np.int64)
    documents[document][position] = token_id
    return documents


def assert_names_everything(message, prefix, token_id, document, offset):
    assert f"dataset {prefix}:" in message
    assert f"token id {token_id} at token {offset} of document {document}," in message
    assert f"tokenizer {BOUND.tokenizer} has 1000 tokens (ids 0..999)" in message
    assert "--tokenizer-file" in message


def test_every_sample_is_checked_as_it_is_read(tmp_path):
    prefix = write_dataset(tmp_path / "other", corrupt(clean_documents(), 17, 23, 4321))
    dataset = gpt(prefix, tmp_path / "cache")
    bad = []
    for index in range(len(dataset)):
        try:
            dataset[index]
        except TokenIdError as error:
            bad.append(str(error))
    # the samples holding token 23 of document 17: one, or two when a sample boundary falls on it
    assert 1 <= len(bad) <= 2
    assert_names_everything(bad[0], prefix, 4321, 17, 23)
    unchecked = gpt(prefix, tmp_path / "cache", bound=None)
    assert sum(int(unchecked[i].max()) == 4321 for i in range(len(unchecked))) == len(bad)


def test_bad_ids_never_reach_fim(tmp_path, tiny_tokenizer):
    from megatron.data.fim import FIMDataset

    documents = [np.asarray(d) % tiny_tokenizer.vocab_size for d in clean_documents()]
    too_big = tiny_tokenizer.padded_vocab_size + 7  # past the embedding, and past FIM's tables
    prefix = write_dataset(tmp_path / "other", corrupt(documents, 5, 0, too_big))
    dataset = gpt(prefix, tmp_path / "cache", bound=TokenBound.of(tiny_tokenizer))
    fim = FIMDataset(dataset, tiny_tokenizer, fim_rate=1.0, seed=1)
    errors = []
    for index in range(len(fim)):
        try:
            fim[index]
        except TokenIdError as error:  # not FIM's IndexError
            errors.append(error)
    assert errors and f"token id {too_big} at token 0 of document 5" in str(errors[0])


def test_startup_scan_fails_before_any_sample_and_caches_a_clean_result(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bad_prefix = write_dataset(tmp_path / "bad", corrupt(clean_documents(), 31, 49, 1000))
    with pytest.raises(TokenIdError) as info:
        build(bad_prefix, cache)
    assert_names_everything(str(info.value), bad_prefix, 1000, 31, 49)
    assert not list(cache.glob("bad_*max_token_id.json"))  # a bad result is never cached

    good_prefix = write_dataset(tmp_path / "good", clean_documents())
    build(good_prefix, cache)
    [cached] = cache.glob("good_*_max_token_id.json")
    scans = []
    monkeypatch.setattr(token_ids, "scan", lambda *args: scans.append(args) or (0, None))
    build(good_prefix, cache)  # a later run (or another rank) reads the cached maximum
    assert scans == []
    cached.unlink()
    build(good_prefix, cache)
    assert len(scans) == 1


def test_a_large_index_is_identified_by_its_ends_and_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(token_ids, "_FULL_HASH_BYTES", 100)  # the .idx files here are about 800 bytes
    monkeypatch.setattr(token_ids, "_PARTIAL_HASH_BYTES", 64)

    def digest(prefix):
        return os.path.basename(token_ids._cache_path(IndexedDataset(prefix), "cache")).split("_")[1]

    original = write_dataset(tmp_path / "a", clean_documents())
    copy = write_dataset(tmp_path / "b", clean_documents())  # the same bytes elsewhere: the same entry
    retokenized = write_dataset(tmp_path / "c", clean_documents(length=51))
    assert digest(original) == digest(copy) != digest(retokenized)


def test_startup_scan_reads_a_new_tokenizer_against_the_cached_maximum(tmp_path):
    prefix = write_dataset(tmp_path / "data", clean_documents())
    build(prefix, tmp_path / "cache")
    top = max(int(d.max()) for d in clean_documents())
    with pytest.raises(TokenIdError, match=f"token id {top} at token"):
        build(prefix, tmp_path / "cache", bound=TokenBound(top, "smaller"))


def test_datasets_over_the_scan_budget_are_left_to_the_per_sample_check(tmp_path, monkeypatch, capsys):
    prefix = write_dataset(tmp_path / "other", corrupt(clean_documents(), 3, 1, 5000))
    monkeypatch.setattr(token_ids, "SCAN_BUDGET_BYTES", 100)  # smaller than the 4000-byte .bin
    splits = build(prefix, tmp_path / "cache")
    assert "too large to scan at start-up are checked as each sample is read" in capsys.readouterr().out
    with pytest.raises(TokenIdError, match="token id 5000 at token 1 of document 3"):
        for index in range(len(splits.train)):
            splits.train[index]


def test_scan_budget_is_shared_by_the_datasets_of_a_run(tmp_path):
    prefixes = [write_dataset(tmp_path / f"d{i}", clean_documents(seed=i)) for i in range(3)]
    check = StartupCheck(BOUND, str(tmp_path / "cache"), budget_bytes=2 * 40 * 50 * 2)
    for prefix in prefixes:
        check.check(IndexedDataset(prefix))
    assert check.unscanned == [prefixes[2]]


# ---------------------------------------------------------------------------------------------------
# empty splits and short data


def test_a_split_that_rounds_to_no_document_is_reported(tmp_path, capsys):
    prefix = write_dataset(tmp_path / "one", clean_documents(num_documents=1, length=200))
    splits = build(prefix, tmp_path / "cache", num_samples=(40, 8, 8), split="95,5,0")
    out = capsys.readouterr().out
    assert splits.valid == [] and splits.test is None
    assert out.count("WARNING") == 1  # the test split has no share: deliberate, not reported
    assert (
        f"WARNING: the valid split is empty: --split '95,5,0' gives it 5.0% of the 1 document(s) of {prefix}, "
        "which rounds to 0 documents, so validation is skipped" in out
    )
    build(prefix, tmp_path / "cache", num_samples=(40, 0, 0))  # --eval-iters 0: nothing to report
    assert "WARNING" not in capsys.readouterr().out


def test_a_dataset_left_out_of_a_validation_blend_is_named(tmp_path, capsys):
    big = write_dataset(tmp_path / "big", clean_documents(num_documents=40))
    one = write_dataset(tmp_path / "one", clean_documents(num_documents=1, length=200))
    splits = build(big, tmp_path / "cache", data_path=["0.5", big, "0.5", one])
    assert [name for name, _ in splits.valid] == ["valid"]
    out = capsys.readouterr().out
    assert f"1 document(s) of {one}, which rounds to 0 documents, so it is left out of the valid blend" in out


def test_data_shorter_than_one_sample_is_reported(tmp_path, capsys):
    prefix = write_dataset(tmp_path / "short", [np.arange(5), np.arange(3)])
    dataset = gpt(prefix, tmp_path / "cache", num_samples=4)
    assert len(dataset) >= 4 and all(len(dataset[i]) == SEQ + 1 for i in range(4))
    out = capsys.readouterr().out
    assert (
        f"WARNING: the train split of {prefix} (documents 0 to 1) holds 8 tokens, fewer than one sample"
        in out
    )
    assert "--seq-length 16 + 1" in out


def test_data_with_under_two_tokens_names_the_dataset(tmp_path):
    prefix = write_dataset(tmp_path / "tiny", [np.arange(1)])
    with pytest.raises(ValueError, match=f"the valid split of {prefix} .* holds 1 token"):
        gpt(prefix, tmp_path / "cache", name="valid")


# ---------------------------------------------------------------------------------------------------
# index cache: modes and progress


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_index_cache_files_follow_the_umask(tmp_path, umask):
    prefix = write_dataset(tmp_path / "data", clean_documents())
    previous = os.umask(umask)
    try:
        build(prefix, tmp_path / "cache")
    finally:
        os.umask(previous)
    files = list((tmp_path / "cache").glob("data_*"))
    assert {f.suffix for f in files} == {".npy", ".json"} and len(files) == 2 * 3 + 1  # train, valid; scan
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_large_builds_log_each_phase_and_small_ones_stay_silent(tmp_path, monkeypatch, capsys):
    prefix = write_dataset(tmp_path / "data", clean_documents())
    build(prefix, tmp_path / "cache", data_path=["1", prefix, "1", prefix])
    assert "> " not in capsys.readouterr().out
    monkeypatch.setattr(gpt_dataset, "PROGRESS_MIN_ENTRIES", 0)
    monkeypatch.setattr(blend, "PROGRESS_MIN_ENTRIES", 0)
    build(prefix, tmp_path / "cache2", data_path=["1", prefix, "1", prefix])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("> ")]
    train = [line for line in lines if "indices of the train split of data" in line]
    assert [line.split(": ", 1)[1].rsplit(" (", 1)[0] for line in train[:4]] == [
        "building for 38 documents x 1 epoch(s), 118 samples of 16 tokens",
        "document and sample indices built",
        "shuffle index built",
        f"written to the cache in {tmp_path / 'cache2'}",
    ]
    assert any(line.startswith("> blend train: interleaving 40 samples of 2 datasets") for line in lines)
    assert any(line.startswith("> blend train: blending indices built (") for line in lines)


def test_a_process_waiting_for_another_builder_says_so(tmp_path, monkeypatch, capsys):
    import fcntl

    monkeypatch.setattr(gpt_dataset, "PROGRESS_MIN_ENTRIES", 0)
    indexed = IndexedDataset(write_dataset(tmp_path / "data", clean_documents()))
    cache = tmp_path / "cache"
    cache.mkdir()
    key = gpt_dataset.cache_key(indexed.sizes, (0, len(indexed)), 60, SEQ, 3)
    waiting = threading.Event()
    real_lock = gpt_dataset._build_lock
    monkeypatch.setattr(
        gpt_dataset, "_build_lock", lambda path, on_wait: real_lock(path, lambda: (on_wait(), waiting.set()))
    )
    with open(cache / f".{key}.lock", "a") as other_builder:
        fcntl.flock(other_builder.fileno(), fcntl.LOCK_EX)
        thread = threading.Thread(target=gpt, args=(str(indexed.path_prefix), cache))
        thread.start()
        assert waiting.wait(timeout=60)
    thread.join(timeout=60)  # the lock is released: it builds itself, as nobody published the cache
    out = capsys.readouterr().out
    assert (
        f"> indices of the train split of data: waiting for another process to build them in {cache}" in out
    )
    assert out.index("waiting for another process") < out.index("document and sample indices built")


# ---------------------------------------------------------------------------------------------------
# checkpoint shapes


def model_shapes(hidden=64, layers=2, vocab=1024, ffn=None, projections=("query_key_value",)):
    ffn = ffn or 4 * hidden
    shapes = {
        "embedding.word_embeddings.weight": (vocab, hidden),
        "embedding.position_embeddings.weight": (64, hidden),
        "final_layernorm.weight": (hidden,),
    }
    for i in range(layers):
        shapes[f"layers.{i}.input_layernorm.weight"] = (hidden,)
        for projection in projections:
            rows = 3 * hidden if projection == "query_key_value" else hidden if projection == "query" else 32
            shapes[f"layers.{i}.attention.{projection}.weight"] = (rows, hidden)
        shapes[f"layers.{i}.mlp.dense_h_to_4h.weight"] = (ffn, hidden)
        shapes[f"layers.{i}.mlp.dense_4h_to_h.weight"] = (hidden, ffn)
    return shapes


@pytest.mark.parametrize(
    "saved, cause",
    [
        (dict(hidden=128), "likely --hidden-size (checkpoint 128, model 64)"),
        (
            dict(vocab=1152),
            "likely the padded vocabulary size (checkpoint 1152, model 1024), set by the tokenizer",
        ),
        (dict(layers=3), "likely --num-layers (checkpoint 3, model 2)"),
        (dict(ffn=100), "likely --ffn-hidden-size (checkpoint 100, model 256)"),
        (
            dict(projections=("query", "key_value")),
            "likely --attention-head-type (checkpoint key_value and query, model query_key_value",
        ),
    ],
    ids=["hidden", "vocab", "layers", "ffn", "head-type"],
)
def test_shape_mismatch_names_the_likely_flag(saved, cause):
    message = mismatch_message("checkpoint /ckpt/iter_0000002", model_shapes(), model_shapes(**saved))
    head, *lines = message.splitlines()
    assert head.startswith("checkpoint /ckpt/iter_0000002 does not fit the model: of 11 tensors, ")
    assert cause in head
    assert 1 <= len(lines) <= NUM_SHOWN + 1 and all(line.startswith("  ") for line in lines)


def test_shape_mismatch_is_counted_and_shown_one_per_line():
    message = mismatch_message("ckpt", model_shapes(), model_shapes(hidden=128))
    head, *lines = message.splitlines()
    assert "of 11 tensors, 11 differ in shape;" in head
    assert (
        "--ffn-hidden-size" not in head and "--num-attention-heads" not in head
    )  # implied by the hidden size
    assert lines[0] == "  embedding.word_embeddings.weight: checkpoint [1024, 128], model [1024, 64]"
    assert lines[-1] == f"  ... and {11 - NUM_SHOWN} more"
    assert mismatch_message("ckpt", model_shapes(), model_shapes()) is None


def test_hugging_face_names_get_the_same_diagnosis():
    expected = {"transformer.wte.weight": (1024, 64), "transformer.h.0.mlp.c_fc.weight": (256, 64)}
    found = {"transformer.wte.weight": (1024, 64), "transformer.h.0.mlp.c_fc.weight": (128, 64), "x": (1,)}
    with pytest.raises(ValueError) as info:
        check_fits("model.safetensors", expected, found, found_name="weights")
    head, *lines = str(info.value).splitlines()
    assert "1 differs in shape, 1 unexpected; likely --ffn-hidden-size (checkpoint 128, model 256)" in head
    assert lines == [
        "  transformer.h.0.mlp.c_fc.weight: weights [128, 64], model [256, 64]",
        "  x: not in the model (weights [1])",
    ]


def test_single_file_checkpoint_of_another_width_is_refused_before_loading(tmp_path):
    from megatron.checkpoint.single_file import load_checkpoint, save_checkpoint
    from megatron.model import GPTModel
    from tests.helpers import tiny_model_config

    saved = GPTModel(tiny_model_config(hidden_size=32, num_attention_heads=4), 128)
    save_checkpoint(tmp_path, 3, saved, None, None, None, consumed_samples=0, config={})
    model = GPTModel(tiny_model_config(hidden_size=64, num_attention_heads=4), 128)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_checkpoint(tmp_path, model)
    head = str(info.value).splitlines()[0]
    assert head.startswith(f"checkpoint {tmp_path / 'iter_0000003'}") and "does not fit the model" in head
    assert "likely --hidden-size (checkpoint 32, model 64)" in head
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
