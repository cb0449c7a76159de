"""End to end through torchrun (4 gloo ranks on the CPU): the tiny preset at TP 2 x DP 2 with sequence
parallelism and the distributed optimizer, and at TP 2 x PP 2, gives the one-process loss sequence."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron.parallel.testing import free_port
from tests.e2e.runs import REPO_ROOT, launch_env, pretrain_args, read_losses, run_pretrain

ITERS = 6
# The tiny preset's model and data, cut to a few short iterations so the test stays fast.
OVERRIDES = (
    f"--train-iters {ITERS} --micro-batch-size 2 --global-batch-size 8 --seq-length 128 "
    "--eval-interval 3 --eval-iters 1 --log-interval 1 --lr-warmup-iters 2 --num-workers 0"
)
# Same fp32 arithmetic in a different order across 4 ranks (see tests/distributed/test_parity.py); the
# metrics file carries the loss as a full-precision float.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path):
    tmp_path = tmp_path_factory.mktemp("single")
    args = pretrain_args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--config tiny-cpu", OVERRIDES, metrics="single"
    )
    single = run_pretrain(args, timeout=600)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    return read_losses(tmp_path / "single.jsonl")


LAYOUTS = {
    "tp2xdp2-sp-distopt": (
        ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"]
        + ["--overlap-grad-reduce", "--overlap-param-gather"],  # replica checks and saves wait for gathers
        "world 4 = TP 2 x PP 1 x DP 2 with sequence parallelism",
    ),
    "tp2xpp2": (
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--overlap-grad-reduce"]
        + ["--log-pipeline-schedule"],
        "world 4 = TP 2 x PP 2 x DP 1",
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_torchrun_layout_matches_one_process(
    layout, tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, single_process_losses
):
    flags, description = LAYOUTS[layout]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron.pretrain"]
    parallel_args = pretrain_args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--config tiny-cpu", OVERRIDES, metrics="parallel"
    )
    parallel_args += [*flags, "--check-replicas-interval", "3", "--distributed-backend", "gloo"]
    parallel = subprocess.run(
        [*torchrun, *parallel_args],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert parallel.returncode == 0, parallel.stdout[-3000:] + parallel.stderr[-3000:]
    out = parallel.stdout
    assert description in out
    assert out.count("training done") == 1  # only the main rank prints
    assert out.count("parameter replicas bit-identical") == 2  # iterations 3 and 6
    if "--log-pipeline-schedule" in flags:  # every rank prints its 1F1B order once (4 micro-batches)
        schedules = sorted(line.split("schedule: ")[1] for line in out.splitlines() if "] schedule: " in line)
        assert schedules == ["F0 B0 F1 B1 F2 B2 F3 B3"] * 2 + ["F0 F1 B0 F2 B1 F3 B2 B3"] * 2, schedules

    single_train, single_valid = single_process_losses
    parallel_train, parallel_valid = read_losses(tmp_path / "parallel.jsonl")
    assert len(single_train) == len(parallel_train) == ITERS
    assert len(single_valid) == len(parallel_valid) == 3  # iterations 0, 3, 6
    for got, expected in zip(parallel_train + parallel_valid, single_train + single_valid, strict=True):
        assert abs(got - expected) <= LOSS_RTOL * abs(expected), (parallel_train, single_train)
    assert single_train[-1] < single_train[0]
