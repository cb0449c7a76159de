"""The metric sinks: Megatron-LM's TensorBoard/W&B names for the records the JSONL holds, an MFU above
100% withheld, TensorBoard and offline W&B read back with their own readers, the W&B mode probe, and
--log-params-norm / --log-num-zeros-in-grad (values, and their one host read on log iterations only).
The 2-rank run through the CLI is tests/e2e/test_tensorboard_wandb.py."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest
import torch

from megatron.parallel.state import ParallelState
from megatron.training.metrics import (
    IntervalStats,
    JsonlWriter,
    TensorBoardWriter,
    Throughput,
    WandbWriter,
    format_training_line,
    interval_metrics,
    megatron_scalars,
    wandb_mode,
)
from megatron.training.step import StepOutput
from tests.metric_readers import read_tensorboard, read_wandb, wandb_run_file

CPU = ParallelState.single("cpu")
MEGATRON_TRAINING_NAMES = (
    "lm loss",
    "learning-rate",
    "grad-norm",
    "loss-scale",
    "batch-size",
    "world-size",
    "iteration-time",
    "throughput",
    "num-zeros",
    "params-norm",
)


def _training_record(*, iteration=4, peak_flops=1e15, loss_scale=65536.0) -> dict:
    """A log interval of 2 iterations (0.5 s each) through `interval_metrics`, plus the two norms."""
    stats = IntervalStats()
    for loss, norm in ((2.5, 1.5), (2.25, 1.25)):
        stats.add(StepOutput(loss, 100, norm, True), 0.5, lr=3e-4, skipped=False)
    tp = Throughput(
        tokens_per_iteration=8 * 1024,
        flops_per_token=6e9,
        world_size=16,
        peak_flops=peak_flops,
        peak_name="X",
    )
    metrics = interval_metrics(
        stats,
        tp,
        iteration=iteration,
        train_iters=10,
        consumed_samples=8 * iteration,
        total_skipped=1,
        loss_scale=loss_scale,
        global_batch_size=8,
    )
    metrics.update(params_norm=123.5, num_zeros=7, busy_ms_max=12.0, straggler_ranks=[3])
    return metrics


def test_a_training_record_has_every_megatron_name_with_the_jsonl_values():
    metrics = _training_record()
    scalars = megatron_scalars(metrics)
    expected = {
        "lm loss": metrics["lm_loss"],
        "learning-rate": 3e-4,
        "grad-norm": 1.25,
        "loss-scale": 65536.0,
        "batch-size": 8,
        "world-size": 16,
        "iteration-time": 0.5,  # Megatron's unit: seconds per iteration
        "throughput": metrics["tflops_per_device"],  # Megatron's: TFLOP/s per GPU
        "num-zeros": 7,
        "params-norm": 123.5,
        "tokens-per-sec": metrics["tokens_per_sec"],
        "mfu": metrics["mfu"],
        "skipped-iterations": 0,
        "total-skipped-iterations": 1,
        "busy-ms-max": 12.0,  # any other number keeps its key, with dashes
    }
    assert scalars == pytest.approx(expected) and set(scalars) == set(expected)
    assert metrics["lm_loss"] == pytest.approx(2.375)
    assert metrics["tflops_per_device"] == pytest.approx(8 * 1024 / 0.5 * 6e9 / 16 / 1e12)
    line = format_training_line(metrics)
    for piece in ("loss scale: 65536.0", "num zeros: 7", "params norm: 123.500", "MFU: 0.6%"):
        assert piece in line, line


def test_loss_scale_and_the_norms_are_absent_unless_there():
    metrics = _training_record(loss_scale=None)
    del metrics["params_norm"], metrics["num_zeros"]
    scalars = megatron_scalars(metrics)
    assert not {"loss-scale", "params-norm", "num-zeros"} & set(scalars)
    line = format_training_line(metrics)
    assert "loss scale" not in line and "num zeros" not in line and "params norm" not in line


@pytest.mark.parametrize(
    ("group", "name"),
    [
        ("valid", "lm loss validation"),  # --data-path with --split: Megatron-LM's plain name
        ("python", "lm-loss-validation/python/lm loss validation"),  # a weighted split file's group
    ],
)
def test_validation_names_per_group(group, name):
    record = {
        "iteration": 6,
        "consumed_samples": 48,
        "valid_group": group,
        "valid_lm_loss": 2.0,
        "valid_ppl": math.exp(2.0),
        "valid_loss_tokens": 512,
    }
    assert megatron_scalars(record) == {name: 2.0, f"{name} ppl": math.exp(2.0), f"{name} tokens": 512.0}


def test_the_test_split_has_names_of_its_own():
    """Megatron-LM writes the test pass under the validation names, so its last validation point is
    the test loss; here the test set is `lm loss test`, never under `train/` or the validation names."""
    record = {"iteration": 6, "consumed_samples": 48, "test_group": "test", "test_lm_loss": 2.5}
    record.update(test_ppl=math.exp(2.5), test_loss_tokens=256)
    assert megatron_scalars(record) == {
        "lm loss test": 2.5,
        "lm loss test ppl": math.exp(2.5),
        "lm loss test tokens": 256.0,
    }


def test_an_mfu_above_100_percent_is_withheld_everywhere(tmp_path):
    """A CPU's matmul peak measured under load can be below what the run then achieves: the line says
    why there is no MFU, the JSONL holds null, TensorBoard/W&B get no point."""
    metrics = _training_record(peak_flops=1e9)  # ~6 TFLOP/s achieved against a 1 GFLOP/s peak
    assert metrics["mfu"] is None
    assert (
        "MFU: n/a (above the reference peak; pass --peak-tflops with the real peak)"
        in format_training_line(metrics)
    )
    assert "mfu" not in megatron_scalars(metrics) and "throughput" in megatron_scalars(metrics)
    writer = JsonlWriter(tmp_path / "metrics.jsonl")
    writer.write(metrics, 4)
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"] is None
    assert _training_record(peak_flops=6.2e12)["mfu"] == pytest.approx(6.144 / 6.2)  # below 1: kept


def _records() -> list[dict]:
    """Training at iterations 2 and 4, validation of two groups at 4, the test set at 4."""
    valid = [
        {
            "iteration": 4,
            "consumed_samples": 32,
            "valid_group": group,
            "valid_lm_loss": loss,
            "valid_ppl": ppl,
        }
        for group, loss, ppl in (("valid", 2.1, 8.2), ("c", 2.3, 9.9))
    ]
    test = {
        "iteration": 4,
        "consumed_samples": 32,
        "test_group": "test",
        "test_lm_loss": 2.2,
        "test_ppl": 9.0,
    }
    return [_training_record(iteration=2), _training_record(iteration=4), *valid, test]


def test_tensorboard_holds_each_name_at_the_iteration_and_at_the_samples(tmp_path):
    records = _records()
    writer = TensorBoardWriter(str(tmp_path / "tb"))
    for record in records:
        writer.write(record, record["iteration"])
    writer.close()
    scalars = read_tensorboard(tmp_path / "tb")
    expected: dict[str, list] = {}
    for record in records:
        for name, value in megatron_scalars(record).items():
            expected.setdefault(name, []).append((record["iteration"], value))
            expected.setdefault(f"{name} vs samples", []).append((record["consumed_samples"], value))
    assert set(scalars) == set(expected)
    for name in (*MEGATRON_TRAINING_NAMES, "lm loss validation", "lm loss validation ppl", "lm loss test"):
        assert name in scalars and f"{name} vs samples" in scalars, name
    assert "lm-loss-validation/c/lm loss validation ppl vs samples" in scalars
    for name, points in expected.items():
        assert [step for step, _ in scalars[name]] == [step for step, _ in points], name
        # TensorBoard stores float32
        assert [value for _, value in scalars[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


@pytest.mark.slow  # W&B starts its service process
def test_an_offline_wandb_run_holds_the_same_names_on_its_two_axes(tmp_path, monkeypatch):
    """Read back from the run's own transaction log. A rollback re-logs iteration 2 after 4: W&B's row
    step keeps counting, so no row is dropped, and the x-axes are `iteration` and `samples`."""
    from megatron.config.training import LoggingConfig

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = LoggingConfig(
        wandb_project_name="sinks", wandb_exp_name="unit", wandb_save_dir=str(tmp_path / "wb")
    )
    writer = WandbWriter(config, {"seed": 1}, default_dir=None)
    assert writer.mode == "offline"
    records = [*_records(), _training_record(iteration=2)]
    for record in records:
        writer.write(record, record["iteration"])
    writer.close()
    rows, axes = read_wandb(wandb_run_file(tmp_path / "wb"))
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert row["iteration"] == record["iteration"] and row["samples"] == record["consumed_samples"]
        for name, value in megatron_scalars(record).items():
            assert row[name] == pytest.approx(value, rel=1e-12) and row[f"{name} vs samples"] == row[name]
    assert [row["_step"] for row in rows] == list(range(len(records)))
    assert axes["lm loss"] == "iteration" and axes["lm loss vs samples"] == "samples"
    assert axes["lm loss validation ppl"] == "iteration" and axes["params-norm vs samples"] == "samples"


def test_wandb_mode_follows_the_variable_then_the_server(monkeypatch):
    """WANDB_MODE wins; unset, a server refusing the connection (a closed local port as WANDB_BASE_URL)
    means offline at once, and one accepting it online."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert wandb_mode() == "online"
    start = time.monotonic()
    assert wandb_mode() == "offline"  # the port is closed now
    assert time.monotonic() - start < 2.5  # bounded by the 2-second probe whatever happens


def _optimizer_after_a_step(precision: str, zeroed: int):
    """A tiny GPT's optimizer after one clipped step whose gradient had its first `zeroed` entries of
    every parameter set to zero (a random batch leaves no exact zero by itself)."""
    from megatron.training.optimizer import build_optimizer
    from tests.unit.test_training import _batch, _opt_config, _tiny_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = _tiny_model(dtype)
    optimizer = build_optimizer(model, _opt_config(clip_grad=0.05), parallel_state=CPU)
    batch = _batch(2)
    loss = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"]).float().mean()
    optimizer.backward(loss)
    for param in optimizer.model_params:
        param.main_grad.view(-1)[:zeroed] = 0.0
    result = optimizer.step()
    assert result.update_successful and result.grad_norm > 0.05  # clipped
    return model, optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_params_norm_and_zeros_count_the_updated_weights_and_the_clipped_gradients(precision):
    """fp32: the model's own parameters; bf16: the fp32 masters (not the rounded model copy)."""
    model, optimizer = _optimizer_after_a_step(precision, zeroed=3)
    params_norm, num_zeros = optimizer.params_norm_and_zeros()
    with torch.no_grad():
        expected_norm = math.sqrt(sum(float(p.double().square().sum()) for p in optimizer.main_params))
        rounded_norm = math.sqrt(sum(float(p.double().square().sum()) for p in model.parameters()))
    grads = [p.main_grad for p in optimizer.model_params]
    assert params_norm == pytest.approx(expected_norm, rel=1e-6)
    assert num_zeros == sum(int((g == 0).sum()) for g in grads) >= 3 * len(grads)
    assert num_zeros < 3 * len(grads) + 10  # the zeroed entries, hardly any by chance
    if precision == "bf16":
        assert abs(rounded_norm - params_norm) > 1e-6 * params_norm


@pytest.mark.slow
def test_the_norms_add_one_host_read_on_log_iterations_only(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """Without the flags the loop reads the host once per iteration (tests/unit/test_host_syncs.py);
    with them, the log iterations (2 and 4) read once more, the others do not."""
    from tests.host_syncs import loop_config, loop_syncs_per_iteration

    flags = ("--fp32", "--log-params-norm", "--log-num-zeros-in-grad")
    cfg = loop_config(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *flags)
    per_iteration, run = loop_syncs_per_iteration(cfg, CPU)
    assert [len(calls) for calls in per_iteration] == [1, 2, 1, 2, 1], per_iteration
    assert all("params_norm_and_zeros" in calls[1][1] for calls in per_iteration if len(calls) == 2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in logged] == [2, 4, 6]
    assert all(r["params_norm"] > 0 and r["num_zeros"] >= 0 for r in logged)
