"""TensorBoard and offline W&B of a 2-rank torchrun run (data parallel, distributed optimizer, fp16),
read back with their own readers: each Megatron-LM scalar name at the logged iterations, and as
`NAME vs samples` at the consumed samples, equal to the metrics JSONL's values. A one-process run of the
same model and data shows that --log-params-norm counts each weight once over the sharded masters, and
--log-num-zeros-in-grad each gradient entry once. The name mapping itself is unit-tested in
tests/unit/test_metric_sinks.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron.training.metrics import read_metrics
from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain
from tests.metric_readers import read_tensorboard, read_wandb, wandb_run_file

pytestmark = pytest.mark.slow

# fp16 (loss-scale logged) with a scale that does not overflow here; learned positions 64-127 are never
# used at --seq-length 64, so their embedding gradient holds exactly 64 x 64 zeros in every layout
FLAGS = (
    "--fp16 --initial-loss-scale 1024 --max-position-embeddings 128 --train-iters 6 --log-interval 2 "
    "--eval-interval 3 --eval-iters 2 --split 90,5,5 --num-workers 0 --lr-warmup-iters 2 "
    "--log-params-norm --log-num-zeros-in-grad"
)
UNUSED_POSITION_ENTRIES = 64 * 64
MODEL_FLAGS = TINY_RUN_FLAGS.replace("--fp32 ", "")
# Megatron-LM name -> (metrics JSONL key, divisor of the JSONL value)
TRAINING = {
    "lm loss": ("lm_loss", 1.0),
    "learning-rate": ("lr", 1.0),
    "grad-norm": ("grad_norm", 1.0),
    "loss-scale": ("loss_scale", 1.0),
    "batch-size": ("global_batch_size", 1.0),
    "world-size": ("world_size", 1.0),
    "iteration-time": ("ms_per_iteration", 1000.0),  # seconds per iteration
    "throughput": ("tflops_per_device", 1.0),  # TFLOP/s per GPU
    "num-zeros": ("num_zeros", 1.0),
    "params-norm": ("params_norm", 1.0),
    "tokens-per-sec": ("tokens_per_sec", 1.0),
}
VALIDATION = {"lm loss validation": ("valid_lm_loss", 1.0), "lm loss validation ppl": ("valid_ppl", 1.0)}
TEST = {"lm loss test": ("test_lm_loss", 1.0), "lm loss test ppl": ("test_ppl", 1.0)}


def _two_rank_run(tmp_path, dataset, tokenizer) -> list[dict]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    args = pretrain_args(tmp_path / "dp2", dataset, tokenizer, MODEL_FLAGS, FLAGS, metrics="metrics")
    args += ["--use-distributed-optimizer", "--distributed-backend", "gloo"]
    args += ["--tensorboard-dir", str(tmp_path / "tb"), "--wandb-save-dir", str(tmp_path / "wb")]
    args += ["--wandb-project-name", "e2e", "--wandb-exp-name", "two-ranks"]
    result = subprocess.run(
        [*torchrun, "-m", "megatron.pretrain", *args],
        cwd=REPO_ROOT,
        env=launch_env(WANDB_MODE="offline", WANDB_SILENT="true"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "num zeros: " in result.stdout and "params norm: " in result.stdout, result.stdout[-3000:]
    return read_metrics(tmp_path / "dp2" / "metrics.jsonl")


def _expected(records: list[dict], names: dict) -> dict[str, list[tuple[int, int, float]]]:
    """{name: [(iteration, consumed samples, value)]} from the JSONL records holding each key."""
    return {
        name: [(r["iteration"], r["consumed_samples"], r[key] / divisor) for r in records if key in r]
        for name, (key, divisor) in names.items()
    }


def test_tensorboard_and_wandb_hold_megatron_names_with_the_jsonl_values(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    records = _two_rank_run(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path)
    expected = _expected(records, {**TRAINING, **VALIDATION, **TEST})
    assert [point[0] for point in expected["lm loss"]] == [2, 4, 6]
    assert [point[0] for point in expected["loss-scale"]] == [2, 4, 6]
    assert [point[0] for point in expected["lm loss validation"]] == [0, 3, 6]
    assert [point[0] for point in expected["lm loss test"]] == [6]
    assert all(point[2] == 2 for point in expected["world-size"])

    scalars = read_tensorboard(tmp_path / "tb")
    for name, points in expected.items():
        assert [step for step, _ in scalars[name]] == [p[0] for p in points], name
        assert [step for step, _ in scalars[f"{name} vs samples"]] == [p[1] for p in points], name
        for series in (scalars[name], scalars[f"{name} vs samples"]):
            # TensorBoard keeps float32
            assert [value for _, value in series] == pytest.approx([p[2] for p in points], rel=1e-6), name

    rows, axes = read_wandb(wandb_run_file(tmp_path / "wb"))
    for name, points in expected.items():
        logged = [(row["iteration"], row["samples"], row[name]) for row in rows if name in row]
        assert logged == points, name  # float64 through W&B's JSON, exactly
        assert all(row[f"{name} vs samples"] == row[name] for row in rows if name in row), name
        assert axes[name] == "iteration" and axes[f"{name} vs samples"] == "samples", name

    # the same run in one process: the norms are of the whole model, each weight counted once
    single = pretrain_args(tmp_path / "one", tiny_dataset_prefix, tiny_tokenizer_path, MODEL_FLAGS, FLAGS)
    result = run_pretrain([*single, "--metrics-jsonl", str(tmp_path / "one" / "metrics.jsonl")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "params_norm" in r]
    logged = [r for r in records if "params_norm" in r]
    assert [r["iteration"] for r in reference] == [r["iteration"] for r in logged] == [2, 4, 6]
    for two_ranks, one in zip(logged, reference, strict=True):
        # the same training up to summation order (one micro-batch per rank against two in one process)
        assert two_ranks["params_norm"] == pytest.approx(one["params_norm"], rel=1e-3)
        # the unused positions' zeros (plus a few fp16 underflows), once: not once per rank
        for record in (two_ranks, one):
            assert UNUSED_POSITION_ENTRIES <= record["num_zeros"] < 2 * UNUSED_POSITION_ENTRIES, record
