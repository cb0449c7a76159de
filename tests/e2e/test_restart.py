"""Automatic restart through the real launchers: torchrun --max-restarts (4 gloo ranks, TP 2 x DP 2 with
sequence parallelism, the distributed optimizer, dropout and FIM) and a SLURM recipe's retry loop.

- A rank SIGKILLed between checkpoints (MEGATRON_FAULTS kill), twice in one job, or while writing a
  checkpoint (kill_in_save): the job ends with status 0, and every logged loss (the metrics JSONL read as
  one run: the records after each start marker replace the re-run iterations') and the final weights and
  optimizer state are bit-identical to an uninterrupted run. The survivors exit without saving ("peer
  lost"), and the restart history names the killed rank.
- The same iteration failing in every attempt: the job ends non-zero with the crash-loop summary.
- SIGTERM to the torchrun agent (a preemption of the step): every rank saves and stops, none reports a
  lost peer.
- Under the local SLURM cluster (skipped where SLURM cannot be had), examples/pretrain_tiny.slurm retries
  the step after a rank dies and finishes as the uninterrupted run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from tests.e2e import slurm_cluster as slurm
from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args

pytestmark = pytest.mark.slow

ITERS = 12
SAVE_INTERVAL = 4
RUN_TIMEOUT_S = 300
# The acceptance layout: 4 ranks, TP 2 x DP 2, sequence parallelism, ZeRO-1, dropout, FIM (TINY_RUN_FLAGS).
LAYOUT = (
    "--tensor-model-parallel-size 2 --sequence-parallel --use-distributed-optimizer "
    "--hidden-dropout 0.1 --attention-dropout 0.1 --global-batch-size 8"
)
CADENCE = f"--train-iters {ITERS} --save-interval {SAVE_INTERVAL} --log-interval 1 --eval-iters 0"


def _torchrun(run_dir: Path, dataset, tokenizer, *flags: str, nproc: int, max_restarts: int, **env):
    """`torchrun --standalone --max-restarts N -m megatron.pretrain` saving to and loading from
    run_dir/ckpt (the metrics JSONL is its default, ckpt/metrics.jsonl); output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command += ["--max-restarts", str(max_restarts), "-m", "megatron.pretrain"]
    args = pretrain_args(run_dir, dataset, tokenizer, TINY_RUN_FLAGS, *flags, save=True, load=True)
    return subprocess.run(
        [*command, *args],
        cwd=REPO_ROOT,
        env=launch_env(**env),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )


def _output(result) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"


def _logged(ckpt: Path) -> list[tuple]:
    """(iteration, consumed samples, lm loss, grad norm) of every training record, read as one run."""
    from megatron.training.metrics import read_metrics

    records = read_metrics(ckpt / "metrics.jsonl")
    return [
        (r["iteration"], r["consumed_samples"], r["lm_loss"], r["grad_norm"])
        for r in records
        if "lm_loss" in r
    ]


def _starts(path: Path) -> list[tuple[int, int]]:
    """(attempt, resumed-from iteration) of each start marker in a JSONL file."""
    import json

    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["attempt"], r["resumed_from_iteration"]) for r in records if r.get("event") == "start"]


def _assert_same_state(ckpt: Path, reference: Path, iteration: int) -> None:
    from megatron.checkpoint import load_full_state

    for prefix in ("model/", "optimizer/"):
        got = load_full_state(ckpt / f"iter_{iteration:07d}", prefix)
        expected = load_full_state(reference / f"iter_{iteration:07d}", prefix)
        assert got.keys() == expected.keys() and got, prefix
        different = [
            name for name in got if hasattr(got[name], "equal") and not got[name].equal(expected[name])
        ]
        assert not different, f"{prefix}: {different[:5]} differ from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path) -> Path:
    """The uninterrupted 4-rank run's --save directory."""
    run_dir = tmp_path_factory.mktemp("restart_reference")
    result = _torchrun(
        run_dir, tiny_dataset_prefix, tiny_tokenizer_path, LAYOUT, CADENCE, nproc=4, max_restarts=0
    )
    assert result.returncode == 0, _output(result)
    assert len(_logged(run_dir / "ckpt")) == ITERS
    return run_dir / "ckpt"


@pytest.mark.parametrize(
    ("faults", "starts", "killed"),
    [
        ("kill:rank=2,iter=7", [(0, 0), (1, 4)], [(7, (2,))]),
        (
            "kill:rank=2,iter=7;kill:rank=1,iter=10,attempt=1",
            [(0, 0), (1, 4), (2, 8)],
            [(7, (2,)), (10, (1,))],
        ),
        ("kill_in_save:rank=1,iter=8", [(0, 0), (1, 4)], [(8, (1,))]),
    ],
    ids=["one-kill", "two-kills", "kill-in-save"],
)
def test_killed_rank_restarts_bit_identically(
    tmp_path, reference, tiny_dataset_prefix, tiny_tokenizer_path, faults, starts, killed
):
    from megatron.training.restarts import HISTORY_FILE, attempt_failures, read_history

    result = _torchrun(
        tmp_path,
        tiny_dataset_prefix,
        tiny_tokenizer_path,
        LAYOUT,
        CADENCE,
        nproc=4,
        max_restarts=3,
        MEGATRON_FAULTS=faults,
    )
    assert result.returncode == 0, _output(result)
    ckpt = tmp_path / "ckpt"
    assert _starts(ckpt / "metrics.jsonl") == starts, _output(result)
    assert _logged(ckpt) == _logged(reference)  # every loss, bit-identical floats
    _assert_same_state(ckpt, reference, ITERS)

    # the survivors stopped without saving, and the history names the killed rank and its iteration
    assert "not saving, exiting for the launcher to restart" in result.stderr, _output(result)
    assert "SIGTERM: stopped" not in result.stdout, _output(result)
    saved = sorted(path.name for path in ckpt.glob("iter_*"))  # no save at the iteration a rank died
    assert saved == [f"iter_{i:07d}" for i in range(SAVE_INTERVAL, ITERS + 1, SAVE_INTERVAL)], saved
    failures = attempt_failures(read_history(ckpt / HISTORY_FILE))
    assert [(failure.iteration, failure.ranks) for failure in failures] == killed


def test_crash_loop_ends_with_a_summary(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """Rank 1 dies at iteration 6 in every attempt: after 2 restarts the job ends, non-zero, saying so."""
    cadence = (
        "--tensor-model-parallel-size 2 --train-iters 8 --save-interval 4 --log-interval 1 --eval-iters 0"
    )
    result = _torchrun(
        tmp_path,
        tiny_dataset_prefix,
        tiny_tokenizer_path,
        cadence,
        nproc=2,
        max_restarts=2,
        MEGATRON_FAULTS="kill:rank=1,iter=6,attempt=*",
    )
    assert result.returncode != 0, _output(result)
    summary = "crash loop: 2 restarts, the last 3 attempts each failing at iteration 6 on rank 1"
    assert f"{summary}: " in result.stderr and "no restarts left" in result.stderr, _output(result)
    # the third attempt's start warned already, from the first two
    assert "WARNING: crash loop: 2 restarts, the last 2 attempts each failing at iteration 6 on rank 1" in (
        result.stdout
    ), _output(result)
    assert _starts(tmp_path / "ckpt" / "metrics.jsonl") == [(0, 0), (1, 4), (2, 4)]


def _lines_of(path: Path, text: str) -> int:
    return sum(text in line for line in path.read_text(errors="replace").splitlines()) if path.exists() else 0


def test_preemption_of_the_torchrun_agent_saves(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """SIGTERM to torchrun (SLURM preempting the step): the agent passes it to each rank's process group;
    every rank is alive, so they save and stop together, and no data loader worker dies of it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["--max-restarts", "1", "-m", "megatron.pretrain"]
    flags = "--tensor-model-parallel-size 2 --train-iters 100000 --log-interval 1 --eval-iters 0"
    args = pretrain_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, TINY_RUN_FLAGS, flags, save=True)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        agent = subprocess.Popen(
            [*command, *args], cwd=REPO_ROOT, env=launch_env(), stdout=stdout, stderr=stderr
        )
        try:
            deadline = time.monotonic() + 240
            while _lines_of(out, " iteration ") < 3:  # training (the SIGTERM handler installed)
                assert agent.poll() is None, out.read_text()[-3000:] + err.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not start in time"
                time.sleep(0.2)
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=120)  # torchrun itself exits non-zero after passing a signal on
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    stdout_text, stderr_text = out.read_text(), err.read_text()
    logs = f"{stdout_text[-3000:]}\n{stderr_text[-4000:]}"
    iteration = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert f"SIGTERM: stopped at iteration {iteration} after saving a checkpoint" in stdout_text, logs
    assert "peer lost" not in stderr_text and "killed by signal" not in stderr_text, logs
    assert "failed (exitcode" not in stderr_text, logs  # no worker failed: both exited 0


# ----------------------------------------------------------------------------------------------- SLURM

SLURM_FLAGS = (
    "--tensor-model-parallel-size 2 --train-iters 8 --lr-warmup-iters 2 --save-interval 4 --log-interval 1 "
    "--eval-iters 0"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm.slurm_cluster(tmp_path_factory.mktemp("slurm")) as started:
        yield started


def test_slurm_recipe_retries_a_step_whose_rank_died(
    cluster, tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    """examples/pretrain_tiny.slurm (srun style): rank 1 dies at iteration 6 of the first attempt; the
    script starts the step again (MEGATRON_RESTART_COUNT=1), which resumes from iteration 4 and ends
    as a 2-rank torchrun run of the same flags without the fault."""
    data = ["--data-path", tiny_dataset_prefix, "--tokenizer-file", str(tiny_tokenizer_path)]
    data += ["--data-cache-path", str(tmp_path / "cache"), *TINY_RUN_FLAGS.split(), *SLURM_FLAGS.split()]
    reference = tmp_path / "reference"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr"]
    command += [
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "megatron.pretrain",
        "--save",
        str(reference),
    ]
    command += ["--config", "tiny-cpu", "--tokenizer-type", "TokenizerFromFile"]  # as the recipe
    done = subprocess.run(
        [*command, *data],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, _output(done)

    output = tmp_path / "out"
    env = launch_env(
        LAUNCHER="srun", OUTPUT_DIR=str(output), MAX_RESTARTS="2", MEGATRON_FAULTS="kill:rank=1,iter=6"
    )
    script = REPO_ROOT / "examples" / "pretrain_tiny.slurm"
    sbatch = [slurm.which("sbatch"), "--wait", "--output", str(tmp_path / "job.out"), "--ntasks", "2"]
    sbatch += ["--job-name", "retry", str(script), *data]
    job = subprocess.run(
        sbatch, cwd=REPO_ROOT, env=cluster.env(env), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    job_out = (tmp_path / "job.out").read_text(errors="replace") if (tmp_path / "job.out").exists() else ""
    logs = f"{job.stdout}{job.stderr}\n{job_out[-6000:]}"
    assert job.returncode == 0, logs
    assert "attempt 0 of the training step failed" in job_out, logs
    ckpt = output / "checkpoints"
    assert _starts(output / "metrics.jsonl") == [(0, 0), (1, 4)], logs
    from megatron.training.metrics import read_metrics

    def losses(path):
        return [(r["iteration"], r["lm_loss"]) for r in read_metrics(path) if "lm_loss" in r]

    assert losses(output / "metrics.jsonl") == losses(reference / "metrics.jsonl")
    _assert_same_state(ckpt, reference, 8)
