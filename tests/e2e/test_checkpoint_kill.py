"""Kill tests through the real CLI (`python -m megatron.pretrain`, one process, CPU).

- SIGKILL during a save, at the two worst moments (`MEGATRON_CHECKPOINT_FAULT`, the fault-injection hook
  in `megatron.checkpoint.files`, makes the saving process SIGKILL itself there): after every shard is
  written but before the rename, and after the rename but before the tracker update. The previous
  checkpoint must stay tracked and loadable, and a rerun with --load resumes from it and finishes.
- SIGTERM (SLURM's preemption notice) to a training process: a final checkpoint, exit status 0.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain

TRACKER = "latest_checkpointed_iteration.txt"
FIRST_ITERS = 4  # the run that leaves the "previous" checkpoint
SECOND_ITERS = 8  # the run killed while saving iteration 8

# Every run here: the tiny model, a log line each iteration, hardly any evaluation; each run adds its
# --train-iters and --save-interval, and saves to and loads from its directory's ckpt/.
FLAGS = (TINY_RUN_FLAGS, "--lr-warmup-iters 2 --log-interval 1 --eval-interval 1000 --eval-iters 1")

pytestmark = pytest.mark.slow


def _loaded_from(stdout: str) -> str:
    """The "> loaded checkpoint DIR: ..." line of a run ('' when it loaded nothing)."""
    return next((line for line in stdout.splitlines() if "loaded checkpoint" in line), "")


def _output(result) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def previous_checkpoint(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path) -> Path:
    """A --save directory holding the checkpoint of iteration 4 (trained once, copied by each test)."""
    root = tmp_path_factory.mktemp("kill_first_run")
    length = f"--train-iters {FIRST_ITERS} --save-interval {FIRST_ITERS}"
    args = pretrain_args(root, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, length, save=True, load=True)
    result = run_pretrain(args, launch_env())
    assert result.returncode == 0, _output(result)
    assert (root / "ckpt" / TRACKER).read_text().strip() == str(FIRST_ITERS)
    return root


def _model_tensors(directory: Path) -> dict:
    from megatron.checkpoint import load_full_state

    return load_full_state(directory, "model/")


@pytest.mark.parametrize("fault", ["before_rename", "before_tracker"])
def test_sigkill_during_save_keeps_previous_checkpoint_and_resume_works(
    tmp_path, previous_checkpoint, tiny_dataset_prefix, tiny_tokenizer_path, fault
):
    from megatron.checkpoint import verify_checkpoint

    shutil.copytree(previous_checkpoint / "ckpt", tmp_path / "ckpt")
    shutil.copytree(previous_checkpoint / "cache", tmp_path / "cache")
    ckpt = tmp_path / "ckpt"
    previous, killed = ckpt / f"iter_{FIRST_ITERS:07d}", ckpt / f"iter_{SECOND_ITERS:07d}"
    length = f"--train-iters {SECOND_ITERS} --save-interval {FIRST_ITERS}"
    args = pretrain_args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, length, save=True, load=True
    )

    # The run resumes from iteration 4 and is killed inside the save of iteration 8.
    result = run_pretrain(args, launch_env(MEGATRON_CHECKPOINT_FAULT=fault))
    assert result.returncode == -signal.SIGKILL, _output(result)
    assert previous.name in _loaded_from(result.stdout), _output(result)
    assert (ckpt / TRACKER).read_text().strip() == str(FIRST_ITERS)  # the tracker never moved
    verify_checkpoint(previous)  # the previous checkpoint is intact (sizes and hashes)
    assert _model_tensors(previous)  # and readable
    if fault == "before_rename":
        assert not killed.exists()  # only the temporary directory was written
    else:
        assert killed.is_dir()  # renamed (complete) but not tracked
        verify_checkpoint(killed)
        shutil.copytree(killed, tmp_path / "killed_copy")

    # A rerun with --load resumes from the tracked checkpoint and finishes, saving iteration 8.
    result = run_pretrain(args, launch_env())
    assert result.returncode == 0, _output(result)
    assert previous.name in _loaded_from(result.stdout), _output(result)
    assert f"training done: {SECOND_ITERS} iterations" in result.stdout
    assert (ckpt / TRACKER).read_text().strip() == str(SECOND_ITERS)
    verify_checkpoint(killed)
    if fault == "before_tracker":
        # Exact resume on CPU: the rerun's iteration 8 equals the killed run's untracked iteration 8.
        rerun, first = _model_tensors(killed), _model_tensors(tmp_path / "killed_copy")
        assert rerun.keys() == first.keys()
        assert all(rerun[name].equal(first[name]) for name in rerun)


def _train_records(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    lines = metrics.read_text().splitlines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return [record for record in records if "lm_loss" in record]


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    from megatron.checkpoint import verify_checkpoint

    length = "--train-iters 100000"  # no --save-interval: only SIGTERM saves
    args = pretrain_args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, length, save=True, load=True
    )
    ckpt, log = tmp_path / "ckpt", tmp_path / "stdout.txt"
    with open(log, "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "megatron.pretrain", *args],
            cwd=REPO_ROOT,
            env=launch_env(),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 240
            while len(_train_records(ckpt / "metrics.jsonl")) < 3:  # the signal handler is installed
                assert process.poll() is None, log.read_text()[-3000:] + (tmp_path / "stderr.txt").read_text()
                assert time.monotonic() < deadline, "training did not start in time"
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    out, err = log.read_text(), (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, f"exit {returncode}\n{out[-3000:]}\n{err[-3000:]}"
    assert "saved checkpoint" in out, out[-3000:]
    iteration = int((ckpt / TRACKER).read_text().strip())
    last_logged = _train_records(ckpt / "metrics.jsonl")[-1]["iteration"]
    assert 3 <= iteration < 100_000 and iteration >= last_logged
    verify_checkpoint(ckpt / f"iter_{iteration:07d}")
    assert f"SIGTERM: stopped at iteration {iteration}" in out
