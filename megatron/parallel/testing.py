"""Run a function on N local processes joined in a gloo process group: the multi-rank test harness.

`run_distributed(fn, world_size, *args)` spawns `world_size` fresh Python processes, gives each the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT), calls
`fn(*args)` in each, and returns the per-rank results in rank order. `fn` must be importable by the child
(a module-level function) and is responsible for `ParallelState.initialize`; the harness destroys any
process group it left behind.

Failure handling: the first rank to raise fails the call with that rank's traceback, and every other rank
is killed at once (they would otherwise wait in a collective until the distributed timeout). A rank that
dies without reporting (segfault, os._exit) or a run past `timeout` likewise kills the rest and raises,
naming the ranks. Nothing is left running.

With `kill_on_error=False` the harness instead waits for every rank to end on its own (or `timeout`),
which is how a test checks that a failure on one rank makes the others fail too, in time: when any rank
did not succeed, the `DistributedTestError` carries `outcomes`, one `RankOutcome` per rank (how it ended,
its result or traceback, and when).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from dataclasses import dataclass


@dataclass
class RankOutcome:
    """How one rank of `run_distributed(..., kill_on_error=False)` ended. `status`: "ok" (`result` holds
    its return value), "error" (it raised; `error` holds the traceback), "died" (exited without
    reporting) or "timeout" (still running at the deadline, then killed). `seconds`: from the start of
    the call until its outcome was known."""

    rank: int
    status: str
    result: object = None
    error: str | None = None
    seconds: float = 0.0


class DistributedTestError(RuntimeError):
    """A rank of `run_distributed` failed, died or timed out. `outcomes`: every rank's `RankOutcome`
    when the call was made with `kill_on_error=False`, else None."""

    def __init__(self, message: str, outcomes: list[RankOutcome] | None = None) -> None:
        super().__init__(message)
        self.outcomes = outcomes


# Ports handed out by free_port: below Linux's default ephemeral range (32768-60999), where the kernel picks
# the local ends of client connections and bind(0) ports, so that neither another test's bind(0) nor a
# busy machine's outgoing connections take the port between free_port() and the launcher's bind (seen
# as a rare rendezvous failure of the two-node test); above the ports megatron.launch derives under srun.
FREE_PORT_RANGE = (30000, 32768)


def port_is_free(port: int) -> bool:
    """True when 127.0.0.1:port can be bound right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port in FREE_PORT_RANGE that was free a moment ago on 127.0.0.1 (random, so that concurrent
    test runs rarely pick the same one; from the OS's entropy, since `ParallelState.seed` seeds the
    `random` module and would give every run of a test the same sequence of ports)."""
    import random

    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(*FREE_PORT_RANGE)
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free TCP port in {FREE_PORT_RANGE[0]}-{FREE_PORT_RANGE[1] - 1} on 127.0.0.1")


def _worker(rank: int, world_size: int, port: int, fn, args, env: dict, queue) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    failed_at = None
    try:
        import torch

        torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
        result = fn(*args)
        payload = ("ok", pickle.dumps(result))  # plain pickle: tensors by value, not shared memory
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt/SystemExit
        failed_at = time.time()
        payload = ("error", traceback.format_exc())
    # Report before tearing the process group down: the teardown makes peers fail ("connection reset"),
    # and the parent should hear the original failure first.
    queue.put((rank, *payload, failed_at))
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown must not mask the result
        pass


def run_distributed(
    fn,
    world_size: int,
    *args,
    timeout: float = 300.0,
    env: dict | None = None,
    kill_on_error: bool = True,
) -> list:
    """`[fn(*args) on rank 0, ..., on rank world_size-1]`, each in its own spawned process (see module)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    processes = [
        # not daemonic: a rank may start processes of its own (data-loader workers); the harness kills
        # every rank itself when the call ends, however it ends
        context.Process(target=_worker, args=(rank, world_size, port, fn, args, env, queue), daemon=False)
        for rank in range(world_size)
    ]
    start = time.monotonic()
    for process in processes:
        process.start()
    try:
        if not kill_on_error:
            return _wait_for_every_rank(queue, processes, start, start + timeout)
        results: dict[int, object] = {}
        deadline = start + timeout
        while len(results) < world_size:
            rank, status, payload, failed_at = _next_message(queue, processes, results, deadline)
            if status == "error":
                raise _first_failure(queue, world_size, (rank, payload, failed_at))
            results[rank] = pickle.loads(payload)
        for process in processes:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        _kill(processes)
        queue.close()
    return [results[rank] for rank in range(world_size)]


def _wait_for_every_rank(queue, processes, start: float, deadline: float) -> list:
    """Every rank's outcome, each left to end on its own; the results, or DistributedTestError with the
    outcomes when any rank did not succeed."""
    outcomes: dict[int, RankOutcome] = {}
    dead_since: dict[int, float] = {}
    while len(outcomes) < len(processes) and time.monotonic() < deadline:
        try:
            rank, status, payload, _ = queue.get(timeout=0.2)
            now = time.monotonic() - start
            if status == "ok":
                outcomes[rank] = RankOutcome(rank, "ok", result=pickle.loads(payload), seconds=now)
            else:
                outcomes[rank] = RankOutcome(rank, "error", error=payload, seconds=now)
            continue
        except queue_module.Empty:
            pass
        for rank, process in enumerate(processes):
            if rank in outcomes or process.is_alive():
                continue
            first_seen = dead_since.setdefault(rank, time.monotonic())
            if time.monotonic() - first_seen > 1.0:  # a report it sent before exiting would be here by now
                code = process.exitcode
                outcomes[rank] = RankOutcome(
                    rank, "died", error=f"exit code {code}", seconds=first_seen - start
                )
    for rank in range(len(processes)):
        outcomes.setdefault(rank, RankOutcome(rank, "timeout", seconds=time.monotonic() - start))
    ordered = [outcomes[rank] for rank in range(len(processes))]
    if all(outcome.status == "ok" for outcome in ordered):
        return [outcome.result for outcome in ordered]
    lines = [f"rank {o.rank}: {o.status} after {o.seconds:.1f} s{_last_line(o.error)}" for o in ordered]
    raise DistributedTestError("not every rank succeeded:\n" + "\n".join(lines), outcomes=ordered)


def _first_failure(queue, world_size: int, first: tuple, grace: float = 2.0) -> DistributedTestError:
    """The error of the rank that failed first (by the time it caught the exception): peers of a failed
    rank fail too, moments later, and may report before it. Waits `grace` seconds for further reports."""
    failures = [first]
    end = time.monotonic() + grace
    while time.monotonic() < end:
        try:
            rank, status, payload, failed_at = queue.get(timeout=max(0.05, end - time.monotonic()))
        except queue_module.Empty:
            break
        if status == "error":
            failures.append((rank, payload, failed_at))
    failures.sort(key=lambda failure: failure[2])
    rank, payload, _ = failures[0]
    message = f"rank {rank} of {world_size} failed:\n{payload}"
    if len(failures) > 1:
        message += "\nthen also: " + "; ".join(f"rank {r}{_last_line(p)}" for r, p, _ in failures[1:])
    return DistributedTestError(message)


def _last_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return f": {lines[-1]}" if lines else ""


def _next_message(queue, processes, results, deadline):
    while True:
        try:
            return queue.get(timeout=0.2)
        except queue_module.Empty:
            pass
        dead = [
            rank
            for rank, process in enumerate(processes)
            if rank not in results and not process.is_alive() and process.exitcode != 0
        ]
        if dead:
            try:  # a rank may have reported just before exiting
                return queue.get(timeout=1.0)
            except queue_module.Empty:
                codes = {rank: processes[rank].exitcode for rank in dead}
                raise DistributedTestError(
                    f"rank(s) {dead} died without reporting (exit codes {codes})"
                ) from None
        if time.monotonic() > deadline:
            pending = [rank for rank in range(len(processes)) if rank not in results]
            raise DistributedTestError(f"timed out; rank(s) {pending} had not finished")


def _kill(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)
