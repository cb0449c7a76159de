"""The straggler report over 2 gloo ranks: one all-gather of one float per rank over the world group per
log interval (counted, not timed), every rank gets the same report, and none at all without
--log-straggler. The end-to-end run with an injected sleep is tests/e2e/test_stragglers.py."""

from __future__ import annotations

from megatron.parallel.testing import run_distributed


class _Output:
    lm_loss, grad_norm = 2.0, 1.0


def _report(log_straggler: bool) -> dict:
    from megatron.config.training import LoggingConfig
    from megatron.parallel.collectives import COMM_BYTES
    from megatron.parallel.state import ParallelState
    from megatron.training import stragglers
    from megatron.training.metrics import IntervalStats

    state = ParallelState.initialize(1, 1, backend="gloo")
    stats = IntervalStats()
    for _ in range(4):  # rank 1 is busy 300 ms an iteration, rank 0 100 ms (and waits 200 ms for it)
        busy = 0.3 if state.rank == 1 else 0.1
        stats.add(_Output(), 0.3, lr=1e-3, skipped=False, waited=0.3 - busy)
    COMM_BYTES.reset()
    metrics = stragglers.log_interval(LoggingConfig(log_straggler=log_straggler), stats, state, iteration=4)
    return {"metrics": metrics, "calls": dict(COMM_BYTES.calls), "bytes": dict(COMM_BYTES.bytes)}


def test_one_world_all_gather_per_log_interval_and_the_same_report_everywhere():
    ranks = run_distributed(_report, 2, True, timeout=120)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    metrics = ranks[0]["metrics"]
    assert metrics["straggler_ranks"] == [1] and metrics["busy_ms_max_rank"] == 1
    assert round(metrics["busy_ms_max"]) == 300 and round(metrics["busy_ms_min"]) == 100
    for rank in ranks:
        assert rank["calls"] == {("world", "all_gather"): 1}
        assert rank["bytes"] == {("world", "all_gather"): 8}  # ring model: (n-1)/n of 2 float64


def test_no_collective_without_the_flag():
    ranks = run_distributed(_report, 2, False, timeout=120)
    assert all(rank["metrics"] == {} and rank["calls"] == {} for rank in ranks)
