"""Bad steps through the real CLI: non-finite gradients named per rank (two gloo ranks under torchrun),
a loss spike skipped exactly like --iterations-to-skip, spikes that roll the run back and skip their data
(and a restart that skips the same data from the checkpoint alone), and a diverging run that stops and
keeps its last good checkpoint. Faults come from MEGATRON_FAULTS (megatron/config/faults.py). The
statistics and decisions themselves: tests/unit/test_spikes.py."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from megatron.training.metrics import read_metrics
from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain

pytestmark = pytest.mark.slow

TRACKER = "latest_checkpointed_iteration.txt"
FLAGS = (TINY_RUN_FLAGS, "--lr-warmup-iters 2 --log-interval 1 --eval-iters 0")
# a spike is judged against the max of the last 3 accepted losses (the tiny run's loss is ~7)
SPIKE_FLAGS = "--check-for-spiky-loss --spiky-loss-window 3"


def _output(result) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def _run(root: Path, dataset, tokenizer, *flags: str, faults: str | None = None, load: bool = False):
    args = pretrain_args(root, dataset, tokenizer, *FLAGS, *flags, save=True, load=load)
    env = launch_env(MEGATRON_FAULTS=faults) if faults else launch_env()
    return run_pretrain(args, env, timeout=240)


def _state(directory: Path) -> dict:
    """Every model and optimizer tensor of a checkpoint (full logical tensors)."""
    from megatron.checkpoint import load_full_state

    return {**load_full_state(directory, "model/"), **load_full_state(directory, "optimizer/")}


def _assert_identical(a: Path, b: Path) -> None:
    import torch

    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    different = [key for key in state_a if not torch.equal(state_a[key], state_b[key])]
    assert not different, different


def _extra(directory: Path) -> dict:
    return json.loads((directory / "common.json").read_text())["extra"]


def test_a_nonfinite_gradient_on_one_rank_is_named_and_the_step_skipped(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """Data parallel 2 with the distributed optimizer, gradients reduce-scattered in several buckets
    during the backward: rank 1's local gradient of an MLP weight turns NaN at iteration 5. The reduction
    would carry the NaN to the rank owning that chunk; the check, taken before each bucket's reduction,
    names rank 1 alone and its first non-finite parameter, the step is skipped on both ranks, and the
    replicas stay identical."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron.pretrain"]
    args = pretrain_args(
        tmp_path,
        tiny_dataset_prefix,
        tiny_tokenizer_path,
        *FLAGS,
        "--train-iters 7 --num-workers 0 --skip-nonfinite --check-replicas-interval 7 "
        "--use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 20000",
    )
    result = subprocess.run(
        [*torchrun, *args, "--distributed-backend", "gloo"],
        cwd=REPO_ROOT,
        env=launch_env(MEGATRON_FAULTS="nan:rank=1,iter=5,param=layers.1.mlp"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, _output(result)
    warnings = [line for line in result.stdout.splitlines() if "non-finite" in line]
    assert len(warnings) == 1, _output(result)
    assert warnings[0].startswith(
        "WARNING: iteration 5: non-finite gradient; non-finite local gradients on rank 1: first parameter "
        "layers.1.mlp.dense_h_to_4h.weight (local gradient L1 norm nan); step skipped (--skip-nonfinite)"
    ), warnings[0]
    assert "rank 0:" not in warnings[0]
    assert "replica check at iteration 7" in result.stdout, _output(result)
    assert "7 iterations, 28 samples, 1 skipped" in result.stdout, _output(result)


def test_a_spike_skips_its_update_exactly_like_iterations_to_skip(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """A loss spike at iteration 6 (the loss x 100) is logged with its samples and its update skipped: the
    run ends bit-identical (weights, Adam state) to one told --iterations-to-skip 6, which never ran it.
    No dropout: a run that computes iteration 6's forward draws dropout masks the other does not."""
    common = "--train-iters 8 --hidden-dropout 0 --attention-dropout 0"
    spiked = _run(
        tmp_path / "spike", tiny_dataset_prefix, tiny_tokenizer_path, common, SPIKE_FLAGS,
        faults="spike:iter=6,factor=100",
    )  # fmt: skip
    assert spiked.returncode == 0, _output(spiked)
    line = next(line for line in spiked.stdout.splitlines() if "loss spike" in line)
    assert line.startswith("WARNING: iteration 6: loss spike, lm loss "), line
    assert line.endswith("update skipped, samples [20, 24) not trained on"), line
    listed = _run(
        tmp_path / "listed", tiny_dataset_prefix, tiny_tokenizer_path, common, "--iterations-to-skip 6"
    )
    assert listed.returncode == 0, _output(listed)
    assert (
        "> iteration 6: skipped (on the skip list" in listed.stdout
        and "samples [20, 24) read" in listed.stdout
    )
    for result in (spiked, listed):
        assert "8 iterations, 32 samples, 1 skipped" in result.stdout, _output(result)
    _assert_identical(tmp_path / "spike/ckpt/iter_0000008", tmp_path / "listed/ckpt/iter_0000008")


def test_spikes_roll_back_skip_their_data_and_a_restart_skips_it_from_the_checkpoint(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """Spikes at iterations 6 and 7 (--rollback-after-spikes 2): the run reloads the checkpoint of
    iteration 4, saves it again with iterations 6-7 on its skip list, reads their samples without
    training and finishes. A restart from that checkpoint (the later ones removed, as if the job died
    right after the rollback), with no fault injected, skips the same samples from the record alone and
    ends bit-identical, with the same losses and consumed samples."""
    flags = (
        "--train-iters 12 --save-interval 4",
        f"{SPIKE_FLAGS} --rollback-after-spikes 2 --rollback-window 5",
    )
    first = tmp_path / "first"
    result = _run(
        first, tiny_dataset_prefix, tiny_tokenizer_path, *flags, "--metrics-jsonl", str(first / "m.jsonl"),
        faults="spike:iter=6,factor=100;spike:iter=7,factor=100",
    )  # fmt: skip
    assert result.returncode == 0, _output(result)
    rollback = next(line for line in result.stdout.splitlines() if "rolled back" in line)
    assert "2 loss spikes in iterations 6-7" in rollback and "(iteration 4)" in rollback, rollback
    assert "iterations 6-7 (samples [20, 28))" in rollback, rollback
    skips = re.findall(r"> iteration (\d+): skipped \(on the skip list", result.stdout)
    assert skips == ["6", "7"], _output(result)
    assert "12 iterations, 48 samples, 2 skipped" in result.stdout, _output(result)
    records = [json.loads(line) for line in (first / "m.jsonl").read_text().splitlines()]
    rollback = {"event": "rollback", "resumed_from_iteration": 4, "rollback_from": 7, "skip_first": 6}
    assert rollback.items() <= records_with(records, "rollback_from")
    effective = [record["iteration"] for record in read_metrics(first / "m.jsonl")]
    assert effective == list(range(1, 13)), effective  # iterations 5-7 of before the rollback dropped
    ckpt = first / "ckpt"
    assert _extra(ckpt / "iter_0000004")["bad_steps"]["iterations_to_skip"] == [6, 7]
    assert _extra(ckpt / "iter_0000012")["bad_steps"]["iterations_to_skip"] == [6, 7]

    restart = tmp_path / "restart"
    shutil.copytree(ckpt, restart / "ckpt")
    for name in ("iter_0000008", "iter_0000012"):
        shutil.rmtree(restart / "ckpt" / name)
    (restart / "ckpt" / TRACKER).write_text("4")
    resumed = _run(restart, tiny_dataset_prefix, tiny_tokenizer_path, *flags, load=True)
    assert resumed.returncode == 0, _output(resumed)
    assert re.findall(r"> iteration (\d+): skipped \(on the skip list", resumed.stdout) == ["6", "7"]
    assert "12 iterations, 48 samples, 2 skipped" in resumed.stdout, _output(resumed)
    _assert_identical(ckpt / "iter_0000012", restart / "ckpt/iter_0000012")
    assert _losses(result.stdout, 8, 12) == _losses(resumed.stdout, 8, 12)


def records_with(records: list[dict], key: str) -> dict:
    """The one metrics record holding `key`, as a dict view for a subset check."""
    found = [record for record in records if key in record]
    assert len(found) == 1, records
    return found[0].items()


def _losses(stdout: str, first: int, last: int) -> list[str]:
    """The logged lm loss text of iterations first..last (log interval 1)."""
    found = dict(re.findall(r" iteration +(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|", stdout))
    return [found[str(it)] for it in range(first, last + 1)]


def test_a_diverging_run_stops_and_keeps_its_last_checkpoint_before_the_nonfinite_steps(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """--lr 1e3 --skip-nonfinite --keep-last-k 1: after --max-consecutive-nonfinite 3 non-finite steps in
    a row the run stops with status 1 and saves nothing more; keep-last-k has not deleted the last
    checkpoint saved before the first non-finite step, which verifies and holds finite weights."""
    import torch

    from megatron.checkpoint import load_full_state, verify_checkpoint

    result = _run(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path,
        "--train-iters 30 --save-interval 2 --lr 1e3 --skip-nonfinite --keep-last-k 1 "
        "--max-consecutive-nonfinite 3",
    )  # fmt: skip
    assert result.returncode == 1, _output(result)
    error = next(line for line in result.stderr.splitlines() + result.stdout.splitlines() if "error:" in line)
    match = re.search(
        r"iteration (\d+): non-finite .*3 consecutive non-finite iterations \(--max-consecutive-nonfinite 3\): "
        r"the run has diverged; nothing saved; the last checkpoint before them is iteration (\d+)",
        error,
    )
    assert match, error
    stopped, kept = int(match.group(1)), int(match.group(2))
    first_nonfinite = int(re.search(r"WARNING: iteration (\d+): non-finite", result.stdout).group(1))
    assert kept < first_nonfinite <= stopped - 2
    ckpt = tmp_path / "ckpt"
    saved = sorted(int(path.name[5:]) for path in ckpt.glob("iter_*"))
    newest = int((ckpt / TRACKER).read_text())
    assert newest < stopped and saved == sorted({kept, newest}), saved  # keep-last-k 1, plus the pin
    verify_checkpoint(ckpt / f"iter_{kept:07d}")
    weights = load_full_state(ckpt / f"iter_{kept:07d}", "model/")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not math.isnan(float(_losses(result.stdout, kept, kept)[0]))
