"""The hang watchdog: who is named stuck, tripping on a stall (stacks, status 3), staying quiet while beats
come or once disarmed, and two ranks telling each other through a store."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron.training.watchdog import EXIT_STATUS, Watchdog, stuck_summary

REPO_ROOT = Path(__file__).resolve().parents[2]


def _report(count: int, iteration: int, activity: str, age: float, now: float = 1000.0) -> dict:
    return {"count": count, "iteration": iteration, "activity": activity, "wall": now - age}


def test_the_ranks_behind_the_others_are_named_stuck():
    reports = {
        0: _report(40, 5, "forward/backward", 70),
        1: _report(39, 5, "waiting for data", 71),
        2: _report(40, 5, "forward/backward", 69),
        3: _report(40, 5, "forward/backward", 70),
    }
    assert stuck_summary(reports, 4, 1000.0) == (
        "rank 1 is stuck: last progress 'iteration 5: waiting for data' 71 s ago; "
        "ranks 0,2,3 wait in 'iteration 5: forward/backward'"
    )
    reports[3] = _report(41, 5, "saving checkpoint iter_0000005", 60)
    summary = stuck_summary(reports, 4, 1000.0)
    assert summary.endswith(
        "ranks 0,2 wait in 'iteration 5: forward/backward'; rank 3 waits in "
        "'iteration 5: saving checkpoint iter_0000005'"
    )


def test_missing_ranks_equal_ranks_and_one_rank():
    reports = {0: _report(7, 2, "forward/backward", 30), 1: _report(7, 2, "forward/backward", 31)}
    assert stuck_summary(reports, 3, 1000.0) == (
        "rank 2 never reported progress (dead, or stuck before the first report); "
        "ranks 0,1 wait in 'iteration 2: forward/backward'"
    )
    assert stuck_summary(reports, 2, 1000.0).startswith("no rank is behind: ranks 0,1 stopped in")
    assert stuck_summary({0: reports[0]}, 1, 1000.0) == (
        "rank 0 is stuck: last progress 'iteration 2: forward/backward' 30 s ago"
    )


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_stall_trips_with_every_threads_stack_and_status_3(capfd):
    exits, stream = [], io.StringIO()
    watchdog = Watchdog(0.3, on_exit=exits.append, stream=stream, interval_s=0.1)
    with watchdog.armed(0, "starting training"):
        watchdog.beat(2, "waiting for data")
        _wait_for(lambda: exits)
    assert exits == [EXIT_STATUS]
    text = stream.getvalue()
    assert "[rank 0] hang watchdog: no progress within 0.005 minutes (--hang-timeout-minutes)" in text
    assert "rank 0 is stuck: last progress 'iteration 2: waiting for data'" in watchdog.tripped
    stacks = capfd.readouterr().err  # faulthandler writes to the file descriptor
    assert "Current thread 0x" in stacks and "Thread 0x" in stacks
    assert "in _wait_for" in stacks  # the main thread's stack: where it was stuck


def test_beats_keep_it_quiet_and_it_is_off_outside_armed_blocks_or_at_zero():
    exits = []
    watchdog = Watchdog(0.4, on_exit=exits.append, stream=io.StringIO(), interval_s=0.1)
    with watchdog.armed(0, "starting training"):
        for iteration in range(1, 16):  # 1.5 s of progress, a beat every 0.1 s
            watchdog.beat(iteration, "forward/backward")
            time.sleep(0.1)
    assert not watchdog._threads  # stopped with the block
    time.sleep(0.8)  # a stall outside the block
    off = Watchdog(0, on_exit=exits.append)
    with off.armed(0, "starting training"):
        time.sleep(0.3)
        assert not off._threads
    assert exits == []


def test_two_ranks_through_a_store_the_stalled_one_trips_and_the_other_follows():
    store = dist.HashStore()
    exits = {0: [], 1: []}
    streams = {rank: io.StringIO() for rank in (0, 1)}
    dogs = {
        rank: Watchdog(
            0.6,
            rank=rank,
            world_size=2,
            store=store,
            interval_s=0.1,
            on_exit=exits[rank].append,
            stream=streams[rank],
        )
        for rank in (0, 1)
    }

    def rank_1():  # stuck after iteration 3's beat
        with dogs[1].armed(0, "starting training"):
            dogs[1].beat(3, "forward/backward")
            _wait_for(lambda: exits[1])

    thread = threading.Thread(target=rank_1)
    thread.start()
    with dogs[0].armed(0, "starting training"):  # rank 0 keeps beating
        iteration = 3
        while not exits[0] and iteration < 200:
            iteration += 1
            dogs[0].beat(iteration, "forward/backward")
            time.sleep(0.05)
    thread.join(10)
    assert exits == {0: [EXIT_STATUS], 1: [EXIT_STATUS]}
    assert dogs[1].tripped.startswith("rank 1 is stuck: last progress 'iteration 3: forward/backward'")
    assert "rank 0 waits in 'iteration " in dogs[1].tripped
    assert "rank 1 made no progress within the bound" in streams[0].getvalue()
    assert dogs[0].tripped.startswith("rank 1 is stuck")  # rank 0 prints the summary too
    assert store.add("megatron/watchdog/dumped", 0) == 2  # both wrote their stacks


@pytest.mark.parametrize("minutes", [-1.0, float("nan")])
def test_the_flag_rejects_negative_and_nan(minutes, tmp_path):
    from megatron.config import ConfigError, TrainingConfig

    config = TrainingConfig(train_iters=1, hang_timeout_minutes=minutes)
    with pytest.raises(
        ConfigError, match=r"--hang-timeout-minutes .* must be a finite number >= 0 \(0 = off\)"
    ):
        config.validate()


def test_the_backstop_fires_when_the_monitor_cannot_run():
    """The main thread stuck in C code holding the GIL (a libc sleep called through ctypes.PyDLL):
    the monitor thread cannot run, faulthandler's timer dumps the stacks and exits."""
    script = (
        "import ctypes, time\n"
        "from megatron.training.watchdog import Watchdog\n"
        "watchdog = Watchdog(1.0, interval_s=0.1, backstop_s=0.5)\n"
        "with watchdog.armed(0, 'starting training'):\n"
        "    time.sleep(0.3)\n"
        "    ctypes.PyDLL(None).sleep(60)\n"
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - start < 30
    assert "Timeout (0:00:01.500000)!" in result.stderr
    assert 'File "<string>", line 6 in <module>' in result.stderr  # the main thread, where it is stuck


def test_collectives_outlast_the_watchdog():
    """While the watchdog is on, the collectives' timeout is at least the hang bound + 2 minutes (a rank
    stuck in a collective is reported by the watchdog, with stacks); the rendezvous timeout is unchanged."""
    from megatron.config import parse_config
    from megatron.pretrain import HANG_MARGIN_MINUTES, collective_timeout_minutes

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64"]
    base += ["--max-position-embeddings", "64", "--train-iters", "1", "--lr", "1e-3"]

    def timeout(*flags):
        return collective_timeout_minutes(parse_config(base + list(flags), check_paths=False))

    assert timeout() == 10 + HANG_MARGIN_MINUTES  # defaults: both 10 minutes
    assert timeout("--hang-timeout-minutes", "0") == 10  # off: --distributed-timeout-minutes as given
    assert timeout("--hang-timeout-minutes", "1", "--distributed-timeout-minutes", "20") == 20
    assert timeout("--hang-timeout-minutes", "30", "--distributed-timeout-minutes", "5") == 32


def test_a_trip_is_a_failure_in_the_restart_history(tmp_path, monkeypatch):
    """A hang ends the attempt like a crash: the restart history under --save records it (rank, iteration,
    the summary), so a crash loop of hangs gets its summary, printed when no restart is left."""
    from megatron.training import restarts

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    exits, stream = [], io.StringIO()
    watchdog = Watchdog(0.3, on_exit=exits.append, stream=stream, interval_s=0.1)
    watchdog.history = tmp_path / restarts.HISTORY_FILE
    with watchdog.armed(0, "starting training"):
        watchdog.beat(4, "waiting for data")
        _wait_for(lambda: exits)
    assert exits == [EXIT_STATUS]
    (record,) = restarts.read_history(watchdog.history)
    assert (record["event"], record["attempt"], record["rank"], record["iteration"]) == ("failure", 1, 0, 4)
    assert record["error"].startswith(
        "HangError: rank 0 is stuck: last progress 'iteration 4: waiting for data'"
    )
    assert "no restarts left after 1 restart, the job ends (attempt 1: iteration 4 on rank 0: HangError" in (
        stream.getvalue()
    )
