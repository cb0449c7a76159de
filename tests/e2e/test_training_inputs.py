"""End to end: `megatron.pretrain` on inputs a user gets wrong: a dataset tokenized with another tokenizer,
a one-document dataset, a checkpoint of another model shape. Exit status, message, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.indexed import IndexedDataset, IndexedDatasetWriter
from tests.e2e.runs import TINY_RUN_FLAGS, pretrain_args, run_pretrain

pytestmark = pytest.mark.slow  # each case starts the trainer (about 5 s)

FLAGS = (TINY_RUN_FLAGS, "--log-interval 1 --eval-interval 2 --eval-iters 1 --save-interval 2")


def copy_dataset(source_prefix: str, prefix, documents=None, edit=None) -> str:
    """The first `documents` documents of a dataset, `edit(index, tokens)` applied to each."""
    source = IndexedDataset(source_prefix)
    with IndexedDatasetWriter(prefix, np.int32) as writer:
        for index in range(documents or len(source)):
            tokens = np.array(source[index], dtype=np.int64)
            writer.add_document(edit(index, tokens) if edit else tokens)
    return str(prefix)


def assert_no_checkpoint(ckpt):
    assert not ckpt.exists() or not [p for p in ckpt.iterdir() if p.name.startswith("iter_")]
    assert not (ckpt / "latest_checkpointed_iteration.txt").exists()


def test_token_ids_of_another_tokenizer_stop_the_run_before_training(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, tiny_tokenizer
):
    vocab_size = tiny_tokenizer.vocab_size

    def other_tokenizer(index, tokens):
        if index == 7:
            tokens[11] = vocab_size + 100  # an id of a larger vocabulary
        return tokens

    prefix = copy_dataset(tiny_dataset_prefix, tmp_path / "other", edit=other_tokenizer)
    args = pretrain_args(tmp_path, prefix, tiny_tokenizer_path, *FLAGS, "--train-iters 4", save=True)
    result = run_pretrain(args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (
        f"error: dataset {prefix}: token id {vocab_size + 100} at token 11 of document 7, but tokenizer "
        f"TokenizerFromFile({tiny_tokenizer_path}) has {vocab_size} tokens (ids 0..{vocab_size - 1})"
    ) in result.stderr
    assert "lm loss" not in result.stdout  # stopped before the first step
    assert_no_checkpoint(tmp_path / "ckpt")
    assert not list((tmp_path / "cache").glob("*max_token_id.json"))


def test_one_document_dataset_says_validation_is_skipped(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    prefix = copy_dataset(tiny_dataset_prefix, tmp_path / "one", documents=1)
    args = pretrain_args(tmp_path, prefix, tiny_tokenizer_path, *FLAGS, "--train-iters 2", metrics="m")
    result = run_pretrain(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (
        f"WARNING: the valid split is empty: --split '95,5,0' gives it 5.0% of the 1 document(s) of {prefix}"
    ) in result.stdout
    assert "validation is skipped" in result.stdout
    assert "valid_lm_loss" not in (tmp_path / "m.jsonl").read_text()


def test_checkpoint_of_another_hidden_size_is_one_readable_message(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, save=True, load=True)
    first = run_pretrain([*args, "--train-iters", "2"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    result = run_pretrain([*args, "--train-iters", "4", "--hidden-size", "128"])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = result.stderr[result.stderr.index("error: ") :].splitlines()
    assert error[0].startswith(f"error: checkpoint {ckpt / 'iter_0000002'} does not fit the model: of ")
    assert "likely --hidden-size (checkpoint 64, model 128)" in error[0]
    assert error[1] == "  model/embedding.position_embeddings.weight: checkpoint [64, 64], model [64, 128]"
    assert error[-1].startswith("  ... and ") and error[-1].endswith(" more")
    assert len(error) == 7
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not (ckpt / "iter_0000004").exists()
