"""examples/pretrain_tiny.slurm through a real one-node SLURM cluster (munged, slurmctld and slurmd started
by tests/e2e/slurm_cluster.py): `sbatch --wait` in both launch styles (srun starting one megatron.pretrain
per rank, and one torchrun per node) at TP 2 on 2 CPU ranks gives the loss sequence of a plain
`torchrun --nproc-per-node 2` run of the same flags; srun without MASTER_ADDR fails fast, naming it.

Skipped, with the reason, only where SLURM is missing and cannot be installed (not root, no apt-get)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from tests.e2e import slurm_cluster as slurm
from tests.e2e.runs import REPO_ROOT, launch_env, read_losses

SCRIPT = REPO_ROOT / "examples" / "pretrain_tiny.slurm"
ITERS = 6
# As tests/e2e/test_pretrain_distributed.py: the tiny preset cut to a few short iterations.
OVERRIDES = (
    f"--train-iters {ITERS} --micro-batch-size 2 --global-batch-size 8 --seq-length 128 "
    "--eval-interval 3 --eval-iters 1 --log-interval 1 --lr-warmup-iters 2 --num-workers 0"
)
LOSS_RTOL = 1e-5
JOB_TIMEOUT_S = 300


def _data_args(tmp_path: Path, dataset: str, tokenizer: Path) -> list[str]:
    return [
        "--data-path",
        dataset,
        "--tokenizer-file",
        str(tokenizer),
        "--data-cache-path",
        str(tmp_path / "cache"),
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm.slurm_cluster(tmp_path_factory.mktemp("slurm")) as started:
        yield started


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path):
    """`torchrun --nproc-per-node 2` outside SLURM, with the flags the batch script passes."""
    tmp_path = tmp_path_factory.mktemp("torchrun_reference")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron.pretrain"]
    args = [
        "--config",
        "tiny-cpu",
        "--tokenizer-type",
        "TokenizerFromFile",
        "--tensor-model-parallel-size",
        "2",
    ]
    args += ["--save", str(tmp_path / "checkpoints"), "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]
    args += _data_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path) + OVERRIDES.split()
    result = subprocess.run(
        [*torchrun, *args],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return read_losses(tmp_path / "metrics.jsonl")


def _sbatch(cluster, env: dict, sbatch_args: list[str], output: Path) -> tuple[int, str, float]:
    """`sbatch --wait` from the repository root; (exit code, the job's output, seconds). A job still
    running at the timeout is cancelled and fails the test with the daemons' logs."""
    command = [slurm.which("sbatch"), "--wait", "--parsable", "--output", str(output), *sbatch_args]
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=cluster.env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        job_id = stdout.strip().split(";")[0]
        if job_id:
            subprocess.run([slurm.which("scancel"), job_id], env=cluster.env(), timeout=30)
        job_output = output.read_text(errors="replace")[-3000:] if output.exists() else "(no output file)"
        pytest.fail(
            f"job {job_id or '?'} still running after {JOB_TIMEOUT_S} s\n{job_output}\n{cluster.logs()}"
        )
    seconds = time.monotonic() - start
    assert output.exists(), f"sbatch exited {process.returncode}: {stdout}{stderr}\n{cluster.logs()}"
    return process.returncode, output.read_text(errors="replace") + stderr, seconds


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_sbatch_tiny_example_matches_torchrun(
    launcher, cluster, tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, reference_losses
):
    env = launch_env(LAUNCHER=launcher, OUTPUT_DIR=str(tmp_path / "out"))
    script_args = _data_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path) + OVERRIDES.split()
    sbatch_args = ["--ntasks", "2", "--job-name", f"tiny-{launcher}", str(SCRIPT), *script_args]
    returncode, out, _ = _sbatch(cluster, env, sbatch_args, tmp_path / "job.out")
    assert returncode == 0, out[-4000:]
    assert f"2 ranks on 1 node(s) (localhost), launcher {launcher}, rendezvous at localhost" in out, out[
        -4000:
    ]
    assert "world 2 = TP 2 x PP 1 x DP 1" in out, out[-4000:]
    assert out.count("training done") == 1, out[-4000:]  # only the main rank prints

    train, valid = read_losses(tmp_path / "out" / "metrics.jsonl")
    reference_train, reference_valid = reference_losses
    assert len(train) == len(reference_train) == ITERS
    assert len(valid) == len(reference_valid) == 3  # iterations 0, 3, 6
    for got, expected in zip(train + valid, reference_train + reference_valid, strict=True):
        assert abs(got - expected) <= LOSS_RTOL * abs(expected), (train, reference_train)


@pytest.mark.slow
def test_srun_without_master_addr_fails_fast(cluster, tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """Ranks started by srun with no MASTER_ADDR (a batch script that forgot to export it) stop at once
    with an error naming the variable, instead of waiting for a rendezvous."""
    args = ["--config", "tiny-cpu", "--tensor-model-parallel-size", "2"]
    args += _data_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path) + OVERRIDES.split()
    wrap = " ".join(["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "megatron.pretrain", *args])
    sbatch_args = ["--ntasks", "2", "--job-name", "no-master-addr", "--wrap", wrap]
    returncode, out, seconds = _sbatch(cluster, launch_env(), sbatch_args, tmp_path / "job.out")
    assert returncode != 0, out[-4000:]
    assert "MASTER_ADDR" in out, out[-4000:]
    assert seconds < 60, (seconds, out[-4000:])


def test_install_skips_with_the_reason_when_not_root(monkeypatch):
    monkeypatch.setattr(slurm, "missing_programs", lambda: ["sbatch", "munged"])
    monkeypatch.setattr(slurm.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="sbatch, munged missing and not root"):
        slurm.ensure_slurm_installed()


def test_cluster_skips_when_not_root(monkeypatch, tmp_path):
    """Installed but not root: the daemons (SlurmUser=root) cannot run; a skip, not a hang or an error."""
    monkeypatch.setattr(slurm, "missing_programs", lambda: [])
    monkeypatch.setattr(slurm.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="not root"), slurm.slurm_cluster(tmp_path):
        pass
    assert not (tmp_path / "slurm.conf").exists()


def test_install_skips_with_apts_last_line_when_it_fails(monkeypatch):
    """A failed install retries after `apt-get update` once, then skips quoting apt's last stderr line."""
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        stderr = "Reading package lists...\nE: Unable to locate package slurmctld\n"
        return subprocess.CompletedProcess(command, 0 if command[1] == "update" else 100, "", stderr)

    monkeypatch.setattr(slurm, "missing_programs", lambda: ["slurmctld"])
    monkeypatch.setattr(slurm.os, "geteuid", lambda: 0)
    monkeypatch.setattr(slurm.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    with pytest.raises(pytest.skip.Exception, match="E: Unable to locate package slurmctld"):
        slurm.ensure_slurm_installed()
    install = [
        "apt-get",
        "install",
        "-y",
        "--no-install-recommends",
        "slurmctld",
        "slurmd",
        "slurm-client",
        "munge",
    ]
    assert calls == [install, ["apt-get", "update"], install]
