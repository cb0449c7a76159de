"""`python -m megatron.pretrain` as a launcher starts it: srun-style ranks derived from SLURM_* train like
torchrun's, and a bad launch (world size against the layout, MASTER_ADDR missing under srun, a rank that
cannot reach the rendezvous, a rendezvous host whose peers never come) ends with a clear error within
--distributed-timeout-minutes instead of hanging."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from megatron.parallel.testing import free_port, port_is_free
from tests.e2e.runs import REPO_ROOT, launch_env, pretrain_args, read_losses, run_pretrain

# The tiny preset, cut to four short iterations, on gloo
FLAGS = (
    "--config tiny-cpu --train-iters 4 --micro-batch-size 2 --global-batch-size 8 --seq-length 128 "
    "--eval-interval 2 --eval-iters 1 --log-interval 1 --lr-warmup-iters 1 --num-workers 0 "
    "--distributed-backend gloo"
)
TIMEOUT_MINUTES = 0.1  # 6 s: the rendezvous cases must end well within this plus start-up


def _pretrain(args: list[str], env: dict, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = run_pretrain(args, env, timeout)
    return result, time.monotonic() - start


def _all_losses(path: Path) -> list[float]:
    train, valid = read_losses(path)
    return train + valid


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert lines, result.stdout[-2000:] + result.stderr[-3000:]
    return lines[-1]


def test_world_size_that_does_not_match_the_layout(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="run")
    args += ["--tensor-model-parallel-size", "2", "--data-parallel-size", "2"]
    env = launch_env(
        RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    result, seconds = _pretrain(args, env)
    assert result.returncode == 2
    assert (
        "world size 2 (WORLD_SIZE, the number of processes launched) does not match --tensor-model-parallel-size 2 "
        "x --pipeline-model-parallel-size 1 x --data-parallel-size 2 = 4" in _error_line(result)
    )
    assert seconds < 20  # refused before any process group: nobody waits for the missing ranks


def test_srun_without_master_addr(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    env = launch_env(
        SLURM_JOB_ID="4242", SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2"
    )
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="run")
    args += ["--tensor-model-parallel-size", "2"]
    result, seconds = _pretrain(args, env)
    assert result.returncode == 2
    line = _error_line(result)
    assert f"rank 1 of 2 on host {socket.gethostname()} (launched by srun)" in line
    assert "MASTER_ADDR not set" in line
    assert seconds < 30


def test_rank_that_cannot_reach_the_rendezvous(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    port = free_port()  # nobody listens there
    env = launch_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="run")
    args += ["--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]
    result, seconds = _pretrain(args, env)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result)
    assert f"rank 1 of 2 on host {socket.gethostname()} (launched by RANK/WORLD_SIZE variables)" in line
    assert (
        f"could not reach the rendezvous at 127.0.0.1:{port} within --distributed-timeout-minutes 0.1" in line
    )
    # torch's store client retries for about 1.3x the timeout; plus interpreter and config start-up
    assert seconds < 60 * TIMEOUT_MINUTES * 2 + 25, seconds


def test_rendezvous_host_whose_peers_never_come(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    env = launch_env(
        RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="run")
    args += ["--tensor-model-parallel-size", "2", "--distributed-timeout-minutes", str(TIMEOUT_MINUTES)]
    result, seconds = _pretrain(args, env)
    assert result.returncode == 1, result.stderr[-3000:]
    line = _error_line(result)
    assert "rank 0 of 2" in line and "hosts the rendezvous at 127.0.0.1:" in line
    assert "but not every rank joined within --distributed-timeout-minutes 0.1" in line
    assert seconds < 60 * TIMEOUT_MINUTES * 2 + 25, seconds


def test_srun_style_ranks_match_one_process(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """Two tasks given only what srun sets (plus the exported MASTER_ADDR) at TP 2: the rank, world size
    and port are derived, and the losses are the one-process ones."""
    single_args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="single")
    single, _ = _pretrain(single_args, launch_env(), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]

    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="srun")
    args += ["--tensor-model-parallel-size", "2"]
    job = str(free_port())  # the derived port is 20000 + job id % 10000: pick an id whose port is free
    while not port_is_free(20000 + int(job) % 10000):
        job = str(int(job) + 1)
    tasks = []
    for rank in range(2):
        env = launch_env(
            SLURM_JOB_ID=job,
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_NTASKS="2",
            SLURM_STEP_NUM_TASKS="2",
            SLURM_STEP_ID="0",
            MASTER_ADDR="127.0.0.1",
        )
        tasks.append(
            subprocess.Popen(
                [sys.executable, "-m", "megatron.pretrain", *args],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [task.communicate(timeout=300) for task in tasks]
    for task, (out, err) in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, out[-2000:] + err[-3000:]
    assert "world 2 = TP 2 x PP 1 x DP 1" in outputs[0][0]
    expected, got = _all_losses(tmp_path / "single.jsonl"), _all_losses(tmp_path / "srun.jsonl")
    assert len(got) == len(expected) == 4 + 3
    for a, b in zip(got, expected, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got, expected)


def test_config_check_sees_the_srun_world_size(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """`python -m megatron.config` validates as megatron.pretrain does, under srun too: 3 tasks cannot
    hold TP 2."""
    env = launch_env(SLURM_JOB_ID="7", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="3")
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FLAGS, metrics="run")
    args += ["--tensor-model-parallel-size", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "megatron.config", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "world size 3 (WORLD_SIZE) is not divisible by --tensor-model-parallel-size 2" in _error_line(
        result
    )
