"""End to end: `python -m megatron.pretrain` in a subprocess on a tiny preprocessed corpus, FIM on."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.runs import TINY_RUN_FLAGS, pretrain_args, run_pretrain

TRAIN_ITERS = 20
# The tiny model (tests/e2e/runs.py) for TRAIN_ITERS iterations, saving every 10, with flash attention
# asked for (a note on CPU) and SPM FIM
FLAGS = (
    TINY_RUN_FLAGS,
    f"--use-flash-attn --train-iters {TRAIN_ITERS} --lr-warmup-iters 4 --adam-beta2 0.95 --fim-spm-rate 0.5",
    "--log-interval 5 --eval-interval 10 --eval-iters 2 --save-interval 10",
)


@pytest.fixture(scope="module")
def cli_dataset(tiny_dataset_prefix) -> str:
    return tiny_dataset_prefix


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_pretrain_cli_end_to_end(tmp_path, cli_dataset, tiny_tokenizer_path):
    result = run_pretrain(pretrain_args(tmp_path, cli_dataset, tiny_tokenizer_path, *FLAGS, save=True))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "training done: 20 iterations" in out
    if not _cuda_available():
        assert out.count("NOTE: --use-flash-attn has no effect on CPU") == 1  # the config note, once
    assert out.count("MFU:") == TRAIN_ITERS // 5

    records = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "lm_loss" in r]
    valid_lines = [r for r in records if "valid_lm_loss" in r]
    assert [r["iteration"] for r in train_lines] == [5, 10, 15, 20]
    for key in ("iteration", "consumed_samples", "lm_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert all(key in r for r in train_lines), key
    assert train_lines[-1]["consumed_samples"] == TRAIN_ITERS * 4
    assert [r["iteration"] for r in valid_lines] == [0, 10, 20]
    assert valid_lines[-1]["valid_lm_loss"] < valid_lines[0]["valid_lm_loss"]

    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "20"
    for iteration in ("iter_0000010", "iter_0000020"):  # sharded (DCP) checkpoints, each with its manifest
        assert (ckpt / iteration / ".metadata").is_file() and (ckpt / iteration / "manifest.json").is_file()


def test_pretrain_cli_bad_flag_exits_2_fast(tmp_path, cli_dataset, tiny_tokenizer_path):
    args = pretrain_args(tmp_path, cli_dataset, tiny_tokenizer_path, *FLAGS, save=True)
    start = time.perf_counter()
    result = run_pretrain([*args, "--hiden-size", "64"], timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "--hidden-size" in result.stderr  # the closest valid flag is suggested
    assert elapsed < 5.0  # parsed before torch is imported (about 0.3 s unloaded; slack for a busy CI box)


def test_pretrain_cli_tokenizer_larger_than_model_exits_2_fast(tmp_path, cli_dataset, tiny_tokenizer_path):
    args = pretrain_args(tmp_path, cli_dataset, tiny_tokenizer_path, *FLAGS, save=True)
    start = time.perf_counter()
    result = run_pretrain([*args, "--vocab-size", "512"], timeout=60)  # the tokenizer has 1024 tokens
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert "--vocab-size" in result.stderr and "1024" in result.stderr
    assert elapsed < 5.0  # checked before torch is imported
    assert not (tmp_path / "ckpt").exists()  # nothing was started


def test_pretrain_help_lists_flags():
    result = run_pretrain(["--help"], timeout=60)
    assert result.returncode == 0
    for flag in ("--train-iters", "--metrics-jsonl", "--fim-rate", "--save-interval"):
        assert flag in result.stdout
