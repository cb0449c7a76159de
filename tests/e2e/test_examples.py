"""The launch recipes in examples/: multi-node torchrun on one machine (two torchrun invocations meeting in a
c10d rendezvous on 127.0.0.1, through examples/pretrain_multinode_torchrun.sh) gives the one-process loss
sequence; the StarCoder flag set of tests/starcoder_flags.py runs on CPU with tiny shapes (and is the
15B recipe's command line); every script parses, and the recipes' dry runs fit an 80 GB A100."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from tests.e2e.runs import REPO_ROOT, launch_env, read_losses, run_pretrain
from tests.starcoder_flags import STARCODER_FLAGS

EXAMPLES = REPO_ROOT / "examples"
STARCODER_15B = EXAMPLES / "pretrain_starcoderbase_15b.slurm"
MULTINODE = EXAMPLES / "pretrain_multinode_torchrun.sh"
ITERS = 6
# The tiny preset cut to a few short iterations (as in tests/e2e/test_pretrain_distributed.py).
OVERRIDES = (
    f"--train-iters {ITERS} --micro-batch-size 2 --global-batch-size 8 --seq-length 128 "
    "--eval-interval 3 --eval-iters 1 --log-interval 1 --lr-warmup-iters 2 --num-workers 0"
)
LOSS_RTOL = 1e-5  # same fp32 arithmetic in another order across 4 ranks

PLACEHOLDERS = {"PATH", "DIR", "NAME", "FILE"}


def _flag_pairs(text: str) -> list[tuple[str, str | None]]:
    """'--a 1 --b --c x' -> [('--a', '1'), ('--b', None), ('--c', 'x')]."""
    tokens = text.split()
    pairs = []
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else None
            pairs.append((token, value))
    return pairs


def _tiny_args(tmp_path: Path, dataset: str, tokenizer: Path) -> list[str]:
    args = ["--config", "tiny-cpu", "--data-path", dataset, "--tokenizer-file", str(tokenizer)]
    args += ["--data-cache-path", str(tmp_path / "cache")]
    return args + OVERRIDES.split()


def _run_nodes(
    commands: list[tuple[list[str], dict]], timeout: float, log_dir: Path | None = None
) -> list[tuple[int, str]]:
    """Start every command (each a torchrun "node") in its own process group, wait for all; on timeout
    kill the groups started here and fail. The outputs go to log_dir/command<i>.log too."""
    procs = []
    for command, env in commands:
        procs.append(
            subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((proc.returncode, out))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        outputs = [proc.communicate()[0] for proc in procs]
        if log_dir is not None:
            for i, out in enumerate(outputs):
                (log_dir / f"command{i}.log").write_text(out)
        tails = [out[-3000:] for out in outputs]
        pytest.fail(f"nodes still running after {timeout} s:\n" + "\n-----\n".join(tails))
    if log_dir is not None:  # kept for a post-mortem
        for i, (_, out) in enumerate(results):
            (log_dir / f"command{i}.log").write_text(out)
    return results


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path):
    tmp_path = tmp_path_factory.mktemp("single")
    args = _tiny_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path)
    args += ["--metrics-jsonl", str(tmp_path / "single.jsonl")]
    single = run_pretrain(args, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    return read_losses(tmp_path / "single.jsonl")


def test_two_torchrun_nodes_on_one_machine_match_one_process(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, single_process_losses
):
    """examples/pretrain_multinode_torchrun.sh twice (NODE_RANK 1 started first, then 0), 2 ranks each:
    TP 2 x DP 2 over two "nodes" meeting in torchrun's c10d rendezvous on 127.0.0.1."""
    port = str(free_port())
    metrics = tmp_path / "multinode.jsonl"
    extra = ["--data-cache-path", str(tmp_path / "cache"), "--metrics-jsonl", str(metrics)]
    extra += OVERRIDES.split() + ["--distributed-backend", "gloo"]
    common = dict(
        NNODES="2",
        NPROC_PER_NODE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        RDZV_ID=f"test-examples-{port}",
        RDZV_JOIN_TIMEOUT="120",
        RDZV_READ_TIMEOUT="30",  # a node that cannot reach the store fails within about a minute
        CONFIG="tiny-cpu",
        TP="2",
        DATA_PATH=tiny_dataset_prefix,
        TOKENIZER_FILE=str(tiny_tokenizer_path),
    )
    commands = [
        (["bash", str(MULTINODE), *extra], launch_env(**common, NODE_RANK=rank)) for rank in ("1", "0")
    ]
    (rc1, out1), (rc0, out0) = _run_nodes(commands, timeout=180, log_dir=tmp_path)  # node 1, node 0
    assert rc0 == 0 and rc1 == 0, (
        f"node 0 (exit {rc0}):\n{out0[-3000:]}\nnode 1 (exit {rc1}):\n{out1[-3000:]}"
    )
    assert "(store host: true)" in out0 and "(store host: false)" in out1
    both = out0 + out1
    assert "world 4 = TP 2 x PP 1 x DP 2" in both
    # torchrun numbers the nodes itself under c10d (NODE_RANK only picks the store host here), so the
    # global rank 0 that prints the summary may be on either node, but it is on exactly one
    assert both.count("training done") == 1

    single_train, single_valid = single_process_losses
    train, valid = read_losses(metrics)
    assert len(train) == len(single_train) == ITERS
    assert len(valid) == len(single_valid) == 3  # iterations 0, 3, 6
    for got, expected in zip(train + valid, single_train + single_valid, strict=True):
        assert abs(got - expected) <= LOSS_RTOL * abs(expected), (train, valid, single_train, single_valid)
    assert single_train[-1] < single_train[0]


def test_node_that_cannot_reach_the_rendezvous_fails_in_bounded_time(tmp_path):
    """NODE_RANK 1 started alone (node 0, the store host, never comes): torchrun gives up connecting after
    about 1-2 x RDZV_READ_TIMEOUT (one connect attempt, one retry after a random delay) and exits non-zero."""
    env = launch_env(
        NNODES="2",
        NODE_RANK="1",
        NPROC_PER_NODE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),  # nothing listens there
        RDZV_READ_TIMEOUT="5",
        DATA_PATH=str(tmp_path / "unused"),
        TOKENIZER_FILE=str(tmp_path / "unused.json"),
    )
    start = time.monotonic()
    ((rc, out),) = _run_nodes([(["bash", str(MULTINODE)], env)], timeout=120)
    elapsed = time.monotonic() - start
    assert rc != 0 and "RendezvousConnectionError" in out, out[-3000:]
    assert "(store host: false)" in out
    assert elapsed < 60, elapsed


def test_starcoder_flag_set_runs_on_cpu_with_tiny_shapes(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    """The spec's flag list, unchanged but for the shapes, the run length and the paths, under torchrun at
    TP 2 x PP 2 (4 gloo ranks), bf16 included: first stopped by --exit-interval after the checkpoint at
    iteration 2, then the same command resumes from it (--load) and finishes."""
    prefix = tiny_dataset_prefix
    train_file = tmp_path / "train_data_paths.txt"
    train_file.write_text(f"python: 60.4 0:0.9 {prefix}, java: 30.2 0:0.9 {prefix}\n")
    valid_file = tmp_path / "valid_data_paths.txt"
    valid_file.write_text(f"python: 1 0.9:1 {prefix}, java: 1 0.9:1 {prefix}\n")
    checkpoints = tmp_path / "checkpoints"
    tiny = {
        "--tensor-model-parallel-size": "2",
        "--pipeline-model-parallel-size": "2",
        "--num-layers": "2",
        "--hidden-size": "64",
        "--num-attention-heads": "4",
        "--seq-length": "128",
        "--max-position-embeddings": "128",
        "--global-batch-size": "2",  # 2 micro-batches through the 2 pipeline stages
        "--train-iters": "4",
        "--lr-decay-iters": "4",
        "--lr-warmup-iters": "1",
        "--log-interval": "1",
        "--save-interval": "2",
        "--eval-interval": "2",
        "--eval-iters": "1",
        "--tokenizer-file": str(tiny_tokenizer_path),
        "--save": str(checkpoints),
        "--load": str(checkpoints),
        "--tensorboard-dir": str(tmp_path / "tensorboard"),
        "--wandb-entity-name": "test-entity",
        "--wandb-project-name": "test-starcoder-tiny",
        "--train-weighted-split-paths-path": str(train_file),
        "--valid-weighted-split-paths-path": str(valid_file),
    }
    spec = _flag_pairs(STARCODER_FLAGS)
    assert set(tiny) <= {flag for flag, _ in spec}
    args = []
    for flag, value in spec:
        args += [flag] if value is None else [flag, tiny.get(flag, value)]
        assert value not in PLACEHOLDERS or flag in tiny, flag
    args += ["--num-workers", "0", "--data-cache-path", str(tmp_path / "cache")]  # speed, tmp caches
    env = launch_env(WANDB_MODE="offline")

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
        command += [
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "megatron.pretrain",
        ]
        done = subprocess.run(
            [*command, *args, *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    first = torchrun("--exit-interval", "2")
    assert "world 4 = TP 2 x PP 2 x DP 1 with sequence parallelism" in first.stdout
    assert "bf16" in first.stdout
    assert (checkpoints / "iter_0000002").is_dir()
    resumed = torchrun()
    assert "training 4 iterations from iteration 2" in resumed.stdout
    assert (checkpoints / "iter_0000004").is_dir()

    train, valid = read_losses(checkpoints / "metrics.jsonl")  # --save's default metrics file, appended
    assert len(train) == 4 and all(math.isfinite(loss) for loss in train), train
    assert len(valid) == 6 and all(math.isfinite(loss) for loss in valid), valid  # 2 groups x it 0, 2, 4


def test_15b_recipe_is_the_spec_run():
    """Every flag of the spec's list is on the 15B script's command line, with the spec's value unless the
    value is a path or a name (those come from environment variables)."""
    text = STARCODER_15B.read_text()
    missing = []
    for flag, value in _flag_pairs(STARCODER_FLAGS):
        pattern = re.escape(flag) + (
            r"\s" if value is None or value in PLACEHOLDERS else rf"\s+{re.escape(value)}\s"
        )
        if not re.search(pattern, text):
            missing.append(f"{flag} {value or ''}".strip())
    assert not missing, f"{STARCODER_15B.name} lacks {missing}"
    assert "--config starcoderbase-15b" in text


SCRIPTS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".sh", ".slurm"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_script_parses_and_is_documented(script):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert sum(line.startswith("#") for line in lines[:15]) >= 5, "no header comment"
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(
    "script, layout",
    [
        (STARCODER_15B, "15,517,456,384 parameters; TP 4 x PP 4 x DP 32 (sequence parallel on"),
        (EXAMPLES / "pretrain_starcoderbase_1b.sh", "1,137,207,296 parameters; TP 1 x PP 1 x DP 8"),
    ],
    ids=["15b", "1b"],
)
def test_recipe_dry_run_fits_an_a100_80gb(script, layout, tmp_path):
    """DRY_RUN=1 prints the plan of the recipe's full job on this machine (no GPU, no data, run from
    another directory) and it fits."""
    done = subprocess.run(
        ["bash", str(script)],
        cwd=tmp_path,
        env=launch_env(DRY_RUN="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert layout in out, out
    peak = [line for line in out.splitlines() if line.strip().startswith("peak per GPU")]
    assert len(peak) == 1 and "fits in A100 80 GB" in peak[0], out
    assert "does not fit" not in out
