"""The hang watchdog through torchrun (2 gloo ranks, TP 2, --hang-timeout-minutes 0.25): a rank stuck
inside a collective and a data worker that never returns (MEGATRON_FAULTS hang / data_hang) make every
rank write its stacks, name the stuck rank and exit within the bound + 30 s; under --max-restarts the job
then resumes from its last checkpoint and finishes. A checkpoint write that never finishes (hang_in_save,
one process) is caught the same way."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args

pytestmark = pytest.mark.slow

BOUND_S = 15  # --hang-timeout-minutes 0.25
FLAGS = (
    "--train-iters 6 --log-interval 1 --eval-iters 0 --tensor-model-parallel-size 2 "
    "--distributed-backend gloo --hang-timeout-minutes 0.25"
)


def _torchrun(data, tmp_path: Path, faults: str, *flags: str, restarts: int = 0):
    """Run the job; (torchrun's status, [(seconds since start, line)] of its merged output)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--max-restarts", str(restarts), "--monitor-interval", "0.5"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron.pretrain"]
    command += pretrain_args(tmp_path, *data, TINY_RUN_FLAGS, FLAGS, *flags)
    start, lines = time.monotonic(), []
    with subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=launch_env(MEGATRON_FAULTS=faults),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        for line in process.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
        status = process.wait(timeout=60)
    return status, lines


def _when(lines, text: str) -> float:
    return next(at for at, line in lines if text in line)


def _check_hang_report(status, lines, *, stuck: int, stuck_activity: str, waiting_activity: str, frame: str):
    output = "\n".join(line for _, line in lines)
    assert status != 0, output[-5000:]
    injected, ended = _when(lines, "MEGATRON_FAULTS: injecting"), lines[-1][0]
    assert ended - injected < BOUND_S + 30, (injected, ended)  # every rank has exited by then
    other = 1 - stuck
    summary = f"rank {stuck} is stuck: last progress 'iteration 4: {stuck_activity}'"
    assert summary in output, output[-5000:]
    assert f"rank {other} waits in 'iteration 4: {waiting_activity}'" in output, output[-5000:]
    for rank in (0, 1):  # each rank: what it was doing, then every thread's stack
        assert f"[rank {rank}] hang watchdog: " in output and "stacks of every thread follow" in output
    assert output.count("Current thread 0x") >= 2 and output.count("Thread 0x") >= 4, output[-5000:]
    assert f"in {frame}" in output  # the stuck rank's main thread, where it blocks
    assert "exitcode  : 3" in output  # the watchdog's status, in torchrun's summary
    assert "HangError: rank " in output  # torchrun's summary shows the watchdog's error record


@pytest.fixture
def data(tiny_dataset_prefix, tiny_tokenizer_path):
    return tiny_dataset_prefix, tiny_tokenizer_path


def test_a_rank_stuck_in_a_collective(data, tmp_path):
    status, lines = _torchrun(data, tmp_path, "hang:rank=1,iter=4")
    _check_hang_report(
        status,
        lines,
        stuck=1,
        stuck_activity="injected hang (receive from rank 0 that never sends)",
        waiting_activity="forward/backward",
        frame="_hang",
    )


def test_a_data_worker_that_never_returns(data, tmp_path):
    status, lines = _torchrun(data, tmp_path, "data_hang:rank=0,iter=4", "--num-workers 1")
    _check_hang_report(
        status,
        lines,
        stuck=0,
        stuck_activity="waiting for data",
        waiting_activity="forward/backward",
        frame="next_micro_batches",
    )
    time.sleep(2)  # the blocked worker notices its parent is gone (it checks every 0.5 s) and exits
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            pass
    assert not left, f"processes of the job still running: {left}"


def test_under_max_restarts_the_job_resumes_and_finishes(data, tmp_path):
    flags = f"--save {tmp_path / 'ckpt'} --load {tmp_path / 'ckpt'} --save-interval 2"
    status, lines = _torchrun(data, tmp_path, "hang:rank=1,iter=5", flags, restarts=1)
    output = "\n".join(line for _, line in lines)
    assert status == 0, output[-5000:]
    assert output.count("MEGATRON_FAULTS: injecting hang") == 1  # attempt 0 only
    assert "rank 1 is stuck: last progress 'iteration 5: injected hang" in output
    assert f"loaded checkpoint {tmp_path / 'ckpt' / 'iter_0000004'}: iteration 4" in output
    assert "training done: 6 iterations" in output
    assert (tmp_path / "ckpt" / "iter_0000006").is_dir()


def test_a_save_that_never_finishes(data, tmp_path):
    """One process: the checkpoint write of iteration 2 blocks (hang_in_save); the watchdog names it."""
    flags = "--train-iters 4 --log-interval 1 --eval-iters 0 --hang-timeout-minutes 0.1 --save-interval 2"
    args = pretrain_args(tmp_path, *data, TINY_RUN_FLAGS, flags, save=True)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "megatron.pretrain", *args],
        cwd=REPO_ROOT,
        env=launch_env(MEGATRON_FAULTS="hang_in_save:iter=2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-5000:]
    assert time.monotonic() - start < 6 + 60  # the bound, start-up and the report
    assert "rank 0 is stuck: last progress 'iteration 2: saving checkpoint iter_0000002'" in output
    assert "Current thread 0x" in output and "in in_save" in output
    assert not (tmp_path / "ckpt" / "iter_0000002").exists()
