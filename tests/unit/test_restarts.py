"""The restart bookkeeping without processes: the restart round from the launchers' variables, the
metrics JSONL read as one run across restarts, the restart history's failures and crash-loop summary, and
which exceptions count as a lost peer."""

from __future__ import annotations

import json

import pytest

from megatron.launch import max_restarts, restart_attempt
from megatron.training import restarts
from megatron.training.metrics import JsonlWriter, MetricsLogger, effective_records, read_metrics


def test_restart_round_from_torchrun_or_the_slurm_recipe():
    assert restart_attempt({}) == 0 and max_restarts({}) is None
    assert restart_attempt({"TORCHELASTIC_RESTART_COUNT": "2", "MEGATRON_RESTART_COUNT": "5"}) == 2
    assert restart_attempt({"MEGATRON_RESTART_COUNT": "1"}) == 1
    assert max_restarts({"MEGATRON_MAX_RESTARTS": "3"}) == 3
    assert restart_attempt({"TORCHELASTIC_RESTART_COUNT": "x"}) == 0  # malformed: ignored


def _train(iteration: int, loss: float) -> dict:
    return {"iteration": iteration, "lm_loss": loss}


def test_metrics_read_as_one_run_across_restarts(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsLogger([JsonlWriter(path)])
    writer.event({"event": "start", "attempt": 0, "resumed_from_iteration": 0})
    for iteration in range(1, 7):  # the first attempt logs 1..6, then dies; its checkpoint is iteration 4
        writer.write(_train(iteration, 10.0 + iteration), iteration)
    writer.close()
    with open(path, "a") as handle:
        handle.write('{"iteration": 7, "lm_lo')  # killed in the middle of a line
    writer = MetricsLogger([JsonlWriter(path)])  # the restart appends (on a new line)
    writer.event({"event": "start", "attempt": 1, "resumed_from_iteration": 4})
    for iteration in range(5, 9):
        writer.write(_train(iteration, 20.0 + iteration), iteration)
    writer.close()
    records = read_metrics(path)
    assert [(r["iteration"], r["lm_loss"]) for r in records] == [
        *((i, 10.0 + i) for i in range(1, 5)),
        *((i, 20.0 + i) for i in range(5, 9)),
    ]
    # a run that never restarted reads as it was written, events dropped
    plain = [{"event": "start", "attempt": 0, "resumed_from_iteration": 0}, _train(1, 1.0), _train(2, 2.0)]
    assert effective_records(plain) == plain[1:]


def _start(attempt: int, resumed: int, world: int = 4) -> dict:
    return {"event": "start", "attempt": attempt, "resumed_from_iteration": resumed, "world_size": world}


def _lost(attempt: int, reporter: int, iteration: int) -> dict:
    return {
        "event": "peer_lost",
        "attempt": attempt,
        "rank": reporter,
        "iteration": iteration,
        "error": "gloo",
    }


def test_failures_name_the_rank_that_did_not_report_or_its_own_error():
    history = [
        _start(0, 0),
        *(_lost(0, rank, 7) for rank in (0, 1, 3)),  # rank 2 was killed: it reports nothing
        _start(1, 4),
        {"event": "failure", "attempt": 1, "rank": 1, "iteration": 9, "error": "ValueError: bad"},
        *(_lost(1, rank, 9) for rank in (0, 2, 3)),
        _start(2, 8),
    ]
    failures = restarts.attempt_failures(history)
    assert [(f.attempt, f.iteration, f.ranks, f.error) for f in failures] == [
        (0, 7, (2,), restarts.LOST_WITHOUT_ERROR),
        (1, 9, (1,), "ValueError: bad"),  # its own error wins over the peers' reports
    ]
    # only the latest launch (from its attempt-0 start) counts
    assert restarts.attempt_failures([*history, _start(0, 8), *(_lost(0, r, 10) for r in (1, 2, 3))]) == [
        restarts.AttemptFailure(0, 10, (0,), restarts.LOST_WITHOUT_ERROR)
    ]


def test_crash_loop_summary_needs_repeats_at_one_iteration():
    history = [_start(0, 0, 2), _lost(0, 0, 6), _start(1, 4, 2), _lost(1, 0, 6)]
    failures = restarts.attempt_failures(history)
    assert restarts.crash_loop_summary(failures, 2) == (
        f"crash loop: 2 restarts, the last 2 attempts each failing at iteration 6 on rank 1: "
        f"{restarts.LOST_WITHOUT_ERROR}"
    )
    assert restarts.crash_loop_summary(failures[:1], 1) is None  # once is not a loop
    moved = restarts.attempt_failures([*history, _start(2, 4, 2), _lost(2, 0, 7)])
    assert restarts.crash_loop_summary(moved, 3) is None  # the failure moved on: progress, not a loop
    summary = restarts.give_up_summary([*history, _start(2, 4, 2), _lost(2, 0, 7)], 2)
    assert summary.startswith(
        "no restarts left after 2 restarts, the job ends (attempt 0: iteration 6 on rank 1"
    )
    assert "attempt 2: iteration 7 on rank 1" in summary


def test_history_lines_survive_a_torn_line(tmp_path):
    path = tmp_path / restarts.HISTORY_FILE
    restarts.append_history(path, _start(0, 0))
    with open(path, "a") as handle:
        handle.write('{"event": "peer_l\n')
    restarts.append_history(path, _lost(0, 1, 3))
    assert restarts.read_history(path) == [_start(0, 0), _lost(0, 1, 3)]
    assert restarts.read_history(tmp_path / "missing.jsonl") == []
    assert json.loads(path.read_text().splitlines()[0])["event"] == "start"


def test_a_failed_collective_is_a_lost_peer_and_a_bug_is_not():
    import torch.distributed as dist

    gloo = RuntimeError(
        "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:45745: Connection reset by peer"
    )
    assert restarts.is_communication_error(gloo)
    assert restarts.is_communication_error(dist.DistBackendError("NCCL communicator was aborted"))
    try:  # a data loader error raised while the collective's error was being handled
        try:
            raise gloo
        except RuntimeError:
            raise RuntimeError("DataLoader worker (pid 9780) is killed by signal: Terminated.") from None
    except RuntimeError as error:
        chained = error
    assert chained.__context__ is gloo and restarts.is_communication_error(chained)
    assert not restarts.is_communication_error(ValueError("shapes [2, 3] and [4] do not match"))
    assert not restarts.is_communication_error(RuntimeError("CUDA out of memory"))

    record = restarts.failure_record(gloo, rank=0, world_size=4, completed=6)
    assert record["event"] == "peer_lost" and record["iteration"] == 6  # not raised inside a step
    alone = restarts.failure_record(gloo, rank=0, world_size=1, completed=6)
    assert alone["event"] == "failure"  # one process has no peer to lose


@pytest.mark.parametrize("inside_step", [True, False])
def test_failure_iteration_is_the_one_in_progress(inside_step):
    def _one_iteration():
        raise RuntimeError("boom")

    def after_the_step():
        raise RuntimeError("boom")

    try:
        (_one_iteration if inside_step else after_the_step)()
    except RuntimeError as error:
        record = restarts.failure_record(error, rank=1, world_size=2, completed=8)
    assert record["iteration"] == (9 if inside_step else 8)
    assert record["error"] == "RuntimeError: boom"
