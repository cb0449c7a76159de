"""The --dry-run planner (megatron.planner): parameter count, fit verdicts, activation estimate, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from megatron.config import load_config
from megatron.model.gpt import GPTModel
from megatron.model.memory import SavedActivationCounter
from megatron.planner import plan

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_4x4 = [
    "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "4",
    "--sequence-parallel", "--use-distributed-optimizer",
]  # fmt: skip


def starcoder(*flags: str):
    return load_config(["--config", "starcoderbase-15b", *flags], world_size=512, check_paths=False)


def test_starcoder_parameters_and_fit_at_tp4_pp4():
    p = plan(starcoder(*LAYOUT_4x4), "A100")
    assert p["params"] == 15_517_456_384
    assert (p["tp"], p["pp"], p["dp"]) == (4, 4, 32)
    assert p["fits"] and p["peak_per_gpu"] <= 80e9


def test_starcoder_does_not_fit_at_tp1_pp1():
    p = plan(starcoder("--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"), "A100")
    assert p["params"] == 15_517_456_384
    assert not p["fits"]


def test_activation_estimate_matches_saved_tensors_on_cpu():
    argv = [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--num-attention-heads",
        "4",
        "--attention-head-type",
        "multiquery",
        "--seq-length",
        "64",
        "--max-position-embeddings",
        "64",
        "--micro-batch-size",
        "2",
        "--train-iters",
        "1",
        "--vocab-size",
        "256",
        "--fp32",
        "--lr",
        "0.001",
    ]
    cfg = load_config(argv, world_size=1, check_paths=False)
    estimate = plan(cfg)["stages"][0].activations_per_micro_batch
    torch.manual_seed(0)
    model = GPTModel(cfg.model, cfg.model.vocab_size)
    model.train()
    tokens = torch.randint(0, 256, (2, 64))
    with SavedActivationCounter(exclude=list(model.parameters())) as counter:
        model(tokens, labels=torch.randint(0, 256, (2, 64))).mean()
    assert abs(estimate - counter.peak_bytes) <= 0.15 * counter.peak_bytes, (estimate, counter.peak_bytes)


def test_cli_dry_run_prints_plan_and_exits_0():
    env = dict(os.environ, WORLD_SIZE="512")
    result = subprocess.run(
        [sys.executable, "-m", "megatron.pretrain", "--config", "starcoderbase-15b", "--dry-run", *LAYOUT_4x4],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "15,517,456,384 parameters" in result.stdout
    assert "fits" in result.stdout and "does not fit" not in result.stdout
