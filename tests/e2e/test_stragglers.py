"""--log-straggler through torchrun (2 gloo ranks): a rank slowed by an injected sleep (MEGATRON_FAULTS
`slow`) is named in the log and in the metrics file, and when the sleep moves to the other rank, so does
the name. The statistic itself is tested in tests/unit/test_straggler_report.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args

pytestmark = pytest.mark.slow

LOG_INTERVAL = 2
# rank 1 sleeps 0.5 s at the start of iterations 1-4, rank 0 at 5-8: a tiny iteration is 15-80 ms of busy
# time here, and the sleep stays far above what a loaded machine's scheduling adds to one rank
FAULTS = "slow:rank=1,iter=1-4,seconds=0.5;slow:rank=0,iter=5-8,seconds=0.5"
SLOW_RANK = {2: 1, 4: 1, 6: 0, 8: 0}  # log interval ending at iteration -> the rank that slept in it
FLAGS = (
    f"--train-iters 8 --log-interval {LOG_INTERVAL} --eval-iters 0 --num-workers 0 --lr-warmup-iters 2 "
    "--log-straggler"  # the default --straggler-threshold 0.2
)


def test_a_slowed_rank_is_named_at_each_log_interval(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    torchrun += ["-m", "megatron.pretrain"]
    args = pretrain_args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, TINY_RUN_FLAGS, FLAGS, metrics="metrics"
    )
    result = subprocess.run(
        [*torchrun, *args, "--distributed-backend", "gloo"],
        cwd=REPO_ROOT,
        env=launch_env(MEGATRON_FAULTS=FAULTS),
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, output

    lines = [line for line in result.stdout.splitlines() if "stragglers at iteration" in line]
    assert len(lines) == len(SLOW_RANK), output  # one line per log interval, from rank 0 only
    for line, (iteration, slow) in zip(lines, SLOW_RANK.items(), strict=True):
        assert line.startswith(f"WARNING: stragglers at iteration {iteration}:"), line
        assert f"max rank {slow} " in line, line
        named = line.split("slower than the median by more than 20%: ")[1]
        assert named.startswith(f"rank {slow} (+") and "," not in named, line  # that rank, only it

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reports = [record for record in records if "straggler_ranks" in record]
    assert [record["iteration"] for record in reports] == list(SLOW_RANK)
    for record in reports:
        slow = SLOW_RANK[record["iteration"]]
        assert record["straggler_ranks"] == [slow] and record["busy_ms_max_rank"] == slow, record
        assert record["busy_ms_min_rank"] == 1 - slow and record["num_stragglers"] == 1, record
