"""Restarts: the start marker of each (re)start, telling a lost peer from a preemption, and the restart
history with its crash-loop summary.

The launcher restarts the job (torchrun --max-restarts, or a SLURM recipe that retries srun); the run
resumes from the newest checkpoint in --load. What this module adds:

- A start marker: each (re)start writes `{"event": "start", "attempt": A, "resumed_from_iteration": I,
  ...}` to the metrics JSONL (readers drop the records of iterations after I logged before it:
  `metrics.effective_records`) and to the restart history `SAVE/restarts.jsonl`.
- A lost peer: when a collective fails because another rank died, this rank does not save (the
  checkpoint would miss the dead rank's shards, and its collectives cannot finish): it logs "rank R: peer
  lost (...); not saving, exiting for the launcher to restart", records the report and exits with
  status 1 at once (survivors blocked in a collective with it then fail and report too). A SIGTERM with
  every peer alive (a preemption) still saves and exits 0 (`train._sigterm_requests_stop`).
- The history: one JSON line per start (attempt, resumed iteration, host, pid) and per failure (the
  failing rank, the iteration in progress, the first line of the error). On each restart, and when the
  launcher's last allowed attempt fails, the failures of this launch are summarised: "crash loop: 2
  restarts, each failing at iteration 6 on rank 1: ...".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from megatron.launch import max_restarts, restart_attempt
from megatron.log import get_logger

logger = get_logger(__name__)

HISTORY_FILE = "restarts.jsonl"
LOST_WITHOUT_ERROR = "no error of its own reached the history (killed by a signal, or its host is gone)"
# Text of the errors gloo, NCCL and the TCP store raise when the other end of a connection died.
_COMMUNICATION_MARKERS = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "socket",
    "gloo",
    "nccl",
    "peer",
)


class PeerLostError(RuntimeError):
    """Another rank of the job is gone: this rank stops without saving (what torchrun's error file
    holds for a survivor; the collective's own error is its cause)."""


def _now() -> float:
    return round(time.time(), 3)


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip()
    line = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".strip().rstrip(":")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- start


def start_record(iteration: int, world_size: int, environ=None) -> dict:
    """The event that marks a (re)start in the metrics JSONL and the history."""
    return {
        "event": "start",
        "attempt": restart_attempt(environ),
        "resumed_from_iteration": iteration,
        "world_size": world_size,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": _now(),
    }


def mark_start(run) -> None:
    """On the main rank: the start marker in the metrics JSONL and the history; a crash-loop warning
    when the earlier attempts of this launch kept failing at one iteration."""
    if not run.parallel_state.is_main_rank:
        return
    record = start_record(run.state.iteration, run.parallel_state.world_size)
    record["seq_length"] = run.cfg.model.seq_length  # tokens per sample, for plots against tokens
    run.metrics.event(record)
    attempt = record["attempt"]
    if attempt > 0:
        logger.info(f"> restart {attempt}: resumed from iteration {record['resumed_from_iteration']}")
    if not run.cfg.checkpoint.save:
        return
    history = Path(run.cfg.checkpoint.save) / HISTORY_FILE
    if attempt > 0:
        failures = [f for f in attempt_failures(read_history(history)) if f.attempt < attempt]
        summary = crash_loop_summary(failures, attempt)
        if summary:
            logger.info(f"WARNING: {summary}")
    append_history(history, record)


# ------------------------------------------------------------------------------------------- history


def append_history(path: Path, record: dict) -> None:
    """One JSON line, in one write (ranks appending at once keep whole lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_history(path: Path) -> list[dict]:
    """The history's records (none when the file is missing; unreadable lines skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


@dataclass(frozen=True)
class AttemptFailure:
    """How one attempt ended: the failing rank(s), the iteration in progress, the error."""

    attempt: int
    iteration: int
    ranks: tuple[int, ...]
    error: str

    def where(self) -> str:
        ranks = ", ".join(str(rank) for rank in self.ranks) or "?"
        return f"iteration {self.iteration} on rank{'s' if len(self.ranks) > 1 else ''} {ranks}"


def _attempt_failure(attempt: int, world_size: int | None, reports: list[dict]) -> AttemptFailure:
    own = [r for r in reports if r["event"] == "failure"]
    if own:  # a rank's own error: the cause; its peers' reports of losing it follow from it
        first = min(own, key=lambda r: (r["iteration"], r["rank"]))
        ranks = tuple(sorted({r["rank"] for r in own}))
        return AttemptFailure(attempt, first["iteration"], ranks, first["error"])
    # only survivors reported: the lost ranks are those that did not
    reporters = {r["rank"] for r in reports}
    world = world_size or max(reporters) + 1
    lost = tuple(rank for rank in range(world) if rank not in reporters)
    error = (
        LOST_WITHOUT_ERROR if lost else f"a connection failed with every rank alive ({reports[0]['error']})"
    )
    return AttemptFailure(attempt, min(r["iteration"] for r in reports), lost, error)


def attempt_failures(records: list[dict]) -> list[AttemptFailure]:
    """One `AttemptFailure` per failed attempt of the latest launch (the records from its attempt-0
    start on), oldest first."""
    starts = [i for i, r in enumerate(records) if r.get("event") == "start" and not r.get("attempt")]
    launch = records[starts[-1] :] if starts else records
    world_sizes = {r["attempt"]: r.get("world_size") for r in launch if r.get("event") == "start"}
    reports: dict[int, list[dict]] = {}
    for record in launch:
        if record.get("event") in ("failure", "peer_lost"):
            reports.setdefault(record["attempt"], []).append(record)
    return [
        _attempt_failure(attempt, world_sizes.get(attempt), reports[attempt]) for attempt in sorted(reports)
    ]


def crash_loop_summary(failures: list[AttemptFailure], restarts: int, *, minimum: int = 2) -> str | None:
    """ "crash loop: N restarts, the last K attempts each failing at iteration I on rank R: ERROR" when
    the last `minimum` (or more) of `failures` (`attempt_failures`, oldest first) happened at one
    iteration; else None. `restarts`: how many restarts the launcher made so far."""
    repeated: list[AttemptFailure] = []
    for failure in reversed(failures):
        if repeated and failure.iteration != repeated[0].iteration:
            break
        repeated.append(failure)
    if len(repeated) < minimum:
        return None
    latest = repeated[0]
    return (
        f"crash loop: {restarts} restart{'s' if restarts != 1 else ''}, the last {len(repeated)} attempts "
        f"each failing at {latest.where()}: {latest.error}"
    )


def give_up_summary(records: list[dict], attempt: int) -> str:
    """What the launcher's last attempt (`attempt` restarts made) prints when it fails: the crash loop,
    or how each attempt ended."""
    failures = attempt_failures(records)
    loop = crash_loop_summary(failures, attempt)
    if loop is not None:
        return f"{loop}; no restarts left, the job ends"
    ends = "; ".join(f"attempt {f.attempt}: {f.where()}: {f.error}" for f in failures)
    return f"no restarts left after {attempt} restart{'s' if attempt != 1 else ''}, the job ends ({ends})"


# ------------------------------------------------------------------------------------------ failures


def is_communication_error(error: BaseException) -> bool:
    """True when `error`, or an exception it was raised from or while handling, is a failed collective or
    store operation (what a rank meets when a peer died); a plain bug on this rank is not."""
    import torch.distributed as dist

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, dist.DistError):
            return True
        text = str(current).lower()
        if isinstance(current, RuntimeError | OSError) and any(
            mark in text for mark in _COMMUNICATION_MARKERS
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _default_store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (ImportError, RuntimeError, ValueError, AttributeError):  # no process group
        return None


def _count_report() -> int | None:
    """Count this rank among the survivors that reported a lost peer (through the job's key-value store);
    None when the store is unreachable (under srun it lives in rank 0, which may be the lost rank)."""
    store = _default_store()
    try:
        return None if store is None else store.add("megatron/peer_lost_reports", 1)
    except (RuntimeError, OSError, TimeoutError):
        return None


def _iteration_in_progress(error: BaseException, completed: int) -> int:
    """The iteration the run was in: `completed + 1` inside a training step, else `completed` (its
    logging, evaluation or save, or the start)."""
    frames = traceback.extract_tb(error.__traceback__)
    return completed + 1 if any(frame.name == "_one_iteration" for frame in frames) else completed


def _record_error_file(message: str, cause: BaseException) -> None:
    """torchrun's error file for this rank (TORCHELASTIC_ERROR_FILE; nothing without torchrun), as
    `@record` writes it: its failure summary then ends with this message, after the cause's traceback."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    try:
        raise PeerLostError(message) from cause
    except PeerLostError as error:
        with contextlib.suppress(OSError):
            get_error_handler().record_exception(error)


def failure_record(error: BaseException, *, rank: int, world_size: int, completed: int) -> dict:
    """The history record of the exception that ended this rank's run: "peer_lost" for a failed
    collective of a multi-rank run (another rank died), else "failure" (this rank's own error)."""
    peer_lost = world_size > 1 and is_communication_error(error)
    return {
        "event": "peer_lost" if peer_lost else "failure",
        "attempt": restart_attempt(),
        "rank": rank,
        "iteration": _iteration_in_progress(error, completed),
        "error": _first_line(error),
        "time": _now(),
    }


def on_failure(error: BaseException, *, parallel_state, completed: int, save_dir: str | None) -> bool:
    """Account for the exception that ended training on this rank and return whether it was a lost peer.

    A lost peer: log "rank R: peer lost (...); not saving, exiting for the launcher to restart" and
    write it to torchrun's error file; the caller exits with status 1 at once (a survivor that waited
    would keep the ranks blocked on it waiting too). Either way the failure goes to the history (under
    --save), and when the launcher allows no more restarts, the last survivor to report prints the
    summary of this launch's failures. False: this rank's own error, which the caller re-raises."""
    record = failure_record(
        error, rank=parallel_state.rank, world_size=parallel_state.world_size, completed=completed
    )
    history = Path(save_dir) / HISTORY_FILE if save_dir else None
    if history is not None:
        append_history(history, record)
    peer_lost = record["event"] == "peer_lost"
    if peer_lost:
        message = (
            f"rank {record['rank']}: peer lost (at iteration {record['iteration']}: {record['error']}); "
            "not saving, exiting for the launcher to restart"
        )
        logger.error(message)
        _record_error_file(message, error)
    # the last survivor to report prints (when one rank is lost; every survivor without the store)
    reports = _count_report() if peer_lost else None
    last = reports is None or reports == parallel_state.world_size - 1
    attempt, allowed = restart_attempt(), max_restarts()
    if allowed is not None and attempt >= allowed and (last if peer_lost else parallel_state.world_size == 1):
        logger.error(give_up_summary(read_history(history) if history else [record], attempt))
    return peer_lost
