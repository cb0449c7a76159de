"""The straggler report: the statistic over ranks, which ranks it names, its log line and metrics keys,
the host-wait accumulator it reads, and the flags' validation. The 2-rank run that names a rank slowed by
an injected sleep is tests/e2e/test_stragglers.py."""

from __future__ import annotations

import json
import time

import pytest

from megatron.config import ConfigError
from megatron.config.training import LoggingConfig
from megatron.parallel.collectives import COMM_TIMER, HOST_WAIT
from megatron.parallel.state import ParallelState
from megatron.training import stragglers
from megatron.training.metrics import IntervalStats
from megatron.training.stragglers import straggler_report


def test_slow_rank_is_named_with_its_excess_over_the_median():
    report = straggler_report([100.0, 101.0, 180.0, 99.0], threshold=0.2, minmax_count=1)
    assert report.median == 100.0  # the lower of the two middle values
    assert report.slowest == (2,) and report.fastest == (3,)
    assert report.stragglers == (2,)
    assert report.excess(2) == pytest.approx(0.8)
    line = report.line(iteration=40)
    assert line.startswith("WARNING: stragglers at iteration 40")
    assert "max rank 2 180.0" in line and "min rank 3 99.0" in line and "median 100.0" in line
    assert "slower than the median by more than 20%: rank 2 (+80%)" in line


def test_two_ranks_compare_the_slow_one_with_the_fast_one():
    # 30% slower than its peer: the mean of the two (115) would hide it under a 20% threshold
    report = straggler_report([100.0, 130.0], threshold=0.2, minmax_count=1)
    assert report.median == 100.0
    assert report.stragglers == (1,)


def test_ranks_within_the_threshold_are_not_named():
    report = straggler_report([100.0, 119.0, 100.5, 80.0], threshold=0.2, minmax_count=1)
    assert report.stragglers == ()  # 119 is 18.4% over the median 100.0; a fast rank is never named
    assert report.line(iteration=3).startswith(" stragglers at iteration 3")
    assert "WARNING" not in report.line(iteration=3)


def test_minmax_count_lists_that_many_ranks_each_side_and_all_stragglers():
    busy = [50.0, 300.0, 52.0, 51.0, 250.0, 49.0, 400.0, 50.5]
    report = straggler_report(busy, threshold=0.5, minmax_count=2)
    assert report.slowest == (6, 1) and report.fastest == (5, 0)
    assert report.stragglers == (6, 1, 4)  # slowest first, all of them, not only minmax_count
    assert "max rank 6 400.0, rank 1 300.0" in report.line(iteration=1)
    # more than there are ranks: every rank, once
    small = straggler_report([2.0, 1.0], threshold=0.2, minmax_count=5)
    assert small.slowest == (0, 1) and small.fastest == (1, 0)


def test_equal_times_are_ordered_by_rank():
    report = straggler_report([10.0, 10.0, 10.0], threshold=0.2, minmax_count=1)
    assert report.fastest == (0,) and report.slowest == (2,) and report.stragglers == ()


def test_metrics_keys_are_json_values():
    report = straggler_report([100.0, 250.0], threshold=0.2, minmax_count=1)
    metrics = report.metrics()
    assert metrics == {
        "busy_ms_min": 100.0,
        "busy_ms_min_rank": 0,
        "busy_ms_median": 100.0,
        "busy_ms_max": 250.0,
        "busy_ms_max_rank": 1,
        "num_stragglers": 1,
        "straggler_ranks": [1],
    }
    assert json.loads(json.dumps(metrics)) == metrics


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="at least one rank"):
        straggler_report([], threshold=0.2, minmax_count=1)


def test_only_blocking_calls_count_as_waiting():
    before_wait, before_timer = HOST_WAIT.seconds, COMM_TIMER.seconds
    with COMM_TIMER.measure(blocking=False):  # starting an asynchronous collective
        time.sleep(0.01)
    assert HOST_WAIT.seconds == before_wait
    with COMM_TIMER.measure():  # a synchronous collective or a wait
        time.sleep(0.01)
    assert HOST_WAIT.seconds - before_wait >= 0.01
    assert COMM_TIMER.seconds - before_timer >= 0.02
    COMM_TIMER.reset()  # benchmarks reset the timer; the wait clock is never reset
    assert HOST_WAIT.seconds - before_wait >= 0.01


class _Output:
    lm_loss, grad_norm = 2.0, 1.0


def test_log_interval_reports_busy_time_per_iteration_in_one_process():
    stats = IntervalStats()
    stats.add(_Output(), 0.5, lr=1e-3, skipped=False, waited=0.1)
    stats.add(_Output(), 0.3, lr=1e-3, skipped=False, waited=0.1)
    on = LoggingConfig(log_straggler=True)
    metrics = stragglers.log_interval(on, stats, ParallelState.single("cpu"), iteration=2)
    assert metrics["busy_ms_median"] == pytest.approx(300.0)  # (0.8 s - 0.2 s waited) / 2 iterations
    assert metrics["straggler_ranks"] == []
    assert stragglers.log_interval(LoggingConfig(), stats, ParallelState.single("cpu"), iteration=2) == {}
    stats.reset()
    assert stats.waited_seconds == 0.0
    assert stragglers.log_interval(on, stats, ParallelState.single("cpu"), iteration=2) == {}


@pytest.mark.parametrize(("field", "value"), [("straggler_threshold", 0.0), ("straggler_minmax_count", 0)])
def test_flags_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} {value} must be > 0"):
        LoggingConfig(**{field: value}).validate()
