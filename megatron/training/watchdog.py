"""Hang watchdog (--hang-timeout-minutes): a rank that makes no progress within the bound dumps every
thread's Python stack, names the stuck rank(s) and exits with status `EXIT_STATUS` (3), so the launcher's
restart policy (torchrun --max-restarts, a SLURM requeue) applies.

The training loop reports progress with `beat(iteration, activity)` (an attribute assignment and a
clock read; "waiting for data", "forward/backward", "saving checkpoint iter_0000012", "evaluation",
"loading checkpoint", ...). The bound applies only while the watchdog is `armed` (loading a checkpoint,
then from the start of training to its end: building the model and data before that is not watched),
counted from the latest beat.

Two daemon threads per rank, neither on the training path:
- the monitor wakes once a second, compares the latest beat's time with the bound, and trips;
- the publisher, every `interval` seconds (a tenth of the bound, between 0.5 and 10 s), writes this
  rank's latest beat (iteration, activity, beat count, wall time) to the default process group's
  key-value store and checks whether another rank has tripped. Its store operations never run on the
  monitor's thread, so a store that stopped answering cannot keep the watchdog from firing.

Tripping (on its own, or because another rank tripped): one line saying what this rank was doing, every
thread's stack (`faulthandler.dump_traceback(all_threads=True)`, which works while the main thread is
blocked inside a C++ collective), and, on the rank(s) that tripped on their own and on rank 0, a summary
from the store naming the stuck rank(s): the ranks behind the others (fewer beats: every rank makes the
same beats in the same order), e.g. "rank 1 is stuck: last progress 'iteration 5: waiting for data' 70 s
ago; ranks 0,2,3 wait in 'iteration 5: forward/backward'". A rank that trips on its own tells the others
through the store and waits (at most `2 * interval + 5` s) until they have written their stacks, then
every rank exits with status 3. Under torchrun the summary is also the rank's error record
(TORCHELASTIC_ERROR_FILE), which torchrun prints as the failure's root cause.

Backstop: should the monitor itself be unable to run (the main thread stuck in C code that holds the
GIL), faulthandler's own timer thread, which needs no GIL and which the monitor re-arms at each tick,
dumps every thread's stack ("Timeout (0:30:30)!") and exits with status 1 after the bound + `backstop_s`
(30 s) without a tick; no stuck-rank summary then.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

from megatron.launch import max_restarts, restart_attempt
from megatron.log import get_logger
from megatron.training import restarts

logger = get_logger(__name__)

EXIT_STATUS = 3  # a rank the watchdog stopped (documented in docs/resilience.md)
_PREFIX = "megatron/watchdog/"
_TRIP_KEY = _PREFIX + "trip"
_DUMPED_KEY = _PREFIX + "dumped"


class HangError(RuntimeError):
    """What the watchdog records for torchrun (TORCHELASTIC_ERROR_FILE) before the process exits."""


def _store_timeout(fn, seconds: float):
    """fn() on a helper thread, waited for at most `seconds`: its result, or None (failed or timed out)."""
    result: list = []

    def call():
        with contextlib.suppress(Exception):  # a store that is gone or broken: the watchdog carries on
            result.append(fn())

    thread = threading.Thread(target=call, daemon=True, name="megatron-watchdog-store")
    thread.start()
    thread.join(seconds)
    return result[0] if result else None


class Watchdog:
    """See the module docstring. `timeout_s` <= 0: off (`beat` still works, nothing ever trips).

    `store`: the default process group's store (None in one process); `on_exit`: what ends the process
    (os._exit; tests pass a recorder); `stream`: where the report goes (stderr). `backstop_s`: see the
    module docstring.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        rank: int = 0,
        world_size: int = 1,
        store=None,
        interval_s: float | None = None,
        backstop_s: float = 30.0,
        on_exit=os._exit,
        stream=None,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.rank, self.world_size, self.store = rank, world_size, store
        self.interval_s = interval_s if interval_s is not None else min(10.0, max(0.5, self.timeout_s / 10))
        self.backstop_s = backstop_s
        self._exit, self._stream = on_exit, stream
        self._last = (0, 0, "starting", time.monotonic())  # (beat count, iteration, activity, monotonic)
        self._depth = 0
        self._stop: threading.Event | None = None
        self._threads: list[threading.Thread] = []
        self._peer_trip: dict | None = None
        self.tripped: str | None = None  # the summary, once tripped
        self.history: Path | None = None  # SAVE/restarts.jsonl: a trip is recorded there as a failure

    @classmethod
    def for_run(cls, hang_timeout_minutes: float, parallel_state, save_dir: str | None = None) -> Watchdog:
        """The watchdog of a training run: the default process group's store when there is one; with
        `save_dir` (--save) a trip goes to the restart history there, as any failure does."""
        store = None
        if parallel_state.world_size > 1:
            import torch.distributed as dist
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store() if dist.is_initialized() else None
        watchdog = cls(
            60.0 * hang_timeout_minutes,
            rank=parallel_state.rank,
            world_size=parallel_state.world_size,
            store=store,
        )
        watchdog.history = Path(save_dir) / restarts.HISTORY_FILE if save_dir else None
        return watchdog

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def beat(self, iteration: int, activity: str) -> None:
        """Progress: this rank is now doing `activity` (a constant string) in `iteration`."""
        self._last = (self._last[0] + 1, iteration, activity, time.monotonic())

    @contextlib.contextmanager
    def armed(self, iteration: int, activity: str):
        """Watch for hangs inside the block (from this beat on); nested blocks share the outer one's
        threads."""
        self.beat(iteration, activity)
        self._depth += 1
        if self._depth == 1 and self.enabled:
            self._start()
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._stop_threads()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._monitor, args=(self._stop,), daemon=True, name="megatron-watchdog"),
        ]
        if self.store is not None:
            self._threads.append(
                threading.Thread(
                    target=self._publish, args=(self._stop,), daemon=True, name="megatron-watchdog-publish"
                )
            )
        for thread in self._threads:
            thread.start()

    def _stop_threads(self) -> None:
        if self._stop is None:
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval_s + 1)
        self._stop, self._threads = None, []

    # ---------------------------------------------------------------- threads
    def _monitor(self, stop: threading.Event) -> None:
        tick, backstop = min(1.0, self.interval_s), _fileno(self._stream or sys.stderr)[1]
        try:
            while not stop.wait(tick):
                # re-armed every tick: fires only when this thread cannot run (the GIL held elsewhere)
                faulthandler.dump_traceback_later(self.timeout_s + self.backstop_s, exit=True, file=backstop)
                stalled = time.monotonic() - self._last[3]
                if stalled > self.timeout_s:
                    self._trip(own=True, stalled=stalled)
                    return
                if self._peer_trip is not None:
                    self._trip(own=False, stalled=stalled)
                    return
        finally:
            faulthandler.cancel_dump_traceback_later()

    def _publish(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.wait(self.interval_s) and failures < 10:
            try:
                self.store.set(f"{_PREFIX}rank_{self.rank}", json.dumps(self._report()))
                if self._peer_trip is None and self.store.check([_TRIP_KEY]):
                    self._peer_trip = json.loads(self.store.get(_TRIP_KEY))
                failures = 0
            except Exception:  # noqa: BLE001 - the store is gone (shutdown) or unreachable: retry, then quit
                failures += 1

    def _report(self) -> dict:
        count, iteration, activity, at = self._last
        return {
            "count": count,
            "iteration": iteration,
            "activity": activity,
            "wall": time.time() - (time.monotonic() - at),
        }

    # ---------------------------------------------------------------- tripping
    def _trip(self, *, own: bool, stalled: float) -> None:
        stream = self._stream or sys.stderr
        # the backstop, pushed past what tripping may take (store reads, waiting for the peers' stacks)
        faulthandler.dump_traceback_later(60 + 2 * self.interval_s, exit=True, file=_fileno(stream)[1])
        report = self._report()
        doing = f"'{_activity(report)}' {stalled:.0f} s ago"
        if own:
            bound = f"{self.timeout_s / 60:g} minutes (--hang-timeout-minutes)"
            header = f"no progress within {bound}; last progress {doing}"
            if self.store is not None:
                trip = json.dumps({"rank": self.rank, **report})
                _store_timeout(lambda: self.store.set(_TRIP_KEY, trip), 5.0)
        else:
            header = (
                f"rank {self._peer_trip.get('rank')} made no progress within the bound; this rank's last "
                f"progress {doing}"
            )
        _write(stream, f"[rank {self.rank}] hang watchdog: {header}; stacks of every thread follow")
        _dump_stacks(stream)
        summary = header
        if own or self.rank == 0:
            summary = self._stuck_summary(report)
            _write(stream, f"[rank {self.rank}] hang watchdog: {summary}")
        self.tripped = summary
        if self.store is not None:
            _store_timeout(lambda: self.store.add(_DUMPED_KEY, 1), 5.0)
            if own:
                self._wait_for_peers()
        _record_for_torchrun(f"rank {self.rank}: {summary}")
        if own:
            self._record_history(report, summary, stream)
        _write(stream, f"[rank {self.rank}] hang watchdog: exiting with status {EXIT_STATUS}")
        self._exit(EXIT_STATUS)

    def _record_history(self, report: dict, summary: str, stream) -> None:
        """The trip as a failure of this attempt in the restart history (a crash loop of hangs gets its
        summary like any other); on the launcher's last allowed attempt, that summary now."""
        if self.history is None:
            return
        record = {
            "event": "failure",
            "attempt": restart_attempt(),
            "rank": self.rank,
            "iteration": report["iteration"],
            "error": f"HangError: {summary}"[:200],
            "time": time.time(),
        }
        try:
            restarts.append_history(self.history, record)
            allowed = max_restarts()
            if allowed is not None and record["attempt"] >= allowed:
                summary = restarts.give_up_summary(restarts.read_history(self.history), record["attempt"])
                _write(stream, f"[rank {self.rank}] {summary}")
        except OSError:  # the history is a report: a full or failing disk must not keep the rank alive
            pass

    def _wait_for_peers(self) -> None:
        """Until every rank has written its stacks (or the grace time is over)."""
        deadline = time.monotonic() + 2 * self.interval_s + 5
        while time.monotonic() < deadline:
            dumped = _store_timeout(lambda: self.store.add(_DUMPED_KEY, 0), 2.0)
            if dumped is not None and dumped >= self.world_size:
                return
            time.sleep(0.2)

    def _stuck_summary(self, own_report: dict) -> str:
        reports = {self.rank: own_report}
        if self.store is not None:
            keys = [f"{_PREFIX}rank_{rank}" for rank in range(self.world_size)]

            def read():
                found = {}
                for rank, key in enumerate(keys):
                    if rank != self.rank and self.store.check([key]):
                        found[rank] = json.loads(self.store.get(key))
                return found

            reports.update(_store_timeout(read, 10.0) or {})
        return stuck_summary(reports, self.world_size, time.time())


def _activity(report: dict) -> str:
    return f"iteration {report['iteration']}: {report['activity']}"


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(str(rank) for rank in ranks)}"


def stuck_summary(reports: dict[int, dict], world_size: int, now: float) -> str:
    """Who is stuck, from each rank's latest report ({rank: {count, iteration, activity, wall}}): the
    ranks with the fewest beats (every rank beats the same sequence), or those that never reported."""
    missing = [rank for rank in range(world_size) if rank not in reports]
    parts = []
    if missing:
        parts.append(f"{_ranks(missing)} never reported progress (dead, or stuck before the first report)")
    if not reports:
        return "; ".join(parts)
    least = min(report["count"] for report in reports.values())
    behind = sorted(rank for rank, report in reports.items() if report["count"] == least)
    ahead = {rank: report for rank, report in reports.items() if report["count"] != least}
    if ahead or len(reports) == 1:
        for rank in behind:
            report = reports[rank]
            parts.append(
                f"rank {rank} is stuck: last progress '{_activity(report)}' {now - report['wall']:.0f} s ago"
            )
    elif missing:
        ahead = reports  # every rank that reported waits for the missing one(s)
    else:
        activities = " / ".join(sorted({repr(_activity(report)) for report in reports.values()}))
        parts.append(f"no rank is behind: {_ranks(behind)} stopped in {activities} (see the stacks)")
    waiting: dict[str, list[int]] = {}
    for rank, report in ahead.items():
        waiting.setdefault(_activity(report), []).append(rank)
    for activity, ranks in sorted(waiting.items(), key=lambda item: min(item[1])):
        parts.append(f"{_ranks(ranks)} {'wait' if len(ranks) > 1 else 'waits'} in '{activity}'")
    return "; ".join(parts)


def _write(stream, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()


def _fileno(stream) -> tuple:
    """(stream, its file descriptor); stderr's when the stream has none (e.g. under test capture)."""
    try:
        return stream, stream.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__, sys.__stderr__.fileno()


def _dump_stacks(stream) -> None:
    """Every thread's Python stack, straight to the stream's file descriptor."""
    stream, fileno = _fileno(stream)
    stream.flush()
    faulthandler.dump_traceback(file=fileno, all_threads=True)


def _record_for_torchrun(message: str) -> None:
    """torchrun's error file (TORCHELASTIC_ERROR_FILE, in torch.distributed.elastic's format, as its
    `record` decorator writes it): torchrun's failure summary then shows the hang, not just status 3."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    text = f"{HangError.__name__}: {message}"
    data = {
        "message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}
    }
    with contextlib.suppress(OSError), open(path, "w") as file:  # best effort: exiting with 3 anyway
        json.dump(data, file)
