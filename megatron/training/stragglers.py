"""Straggler report (`--log-straggler`): which rank makes the others wait.

Measure: each rank's own busy time per iteration over the log interval, the wall time of its iterations
minus the seconds its host spent blocked waiting for peers (`megatron.parallel.collectives.HOST_WAIT`:
synchronous collectives, waits on asynchronous ones, pipeline sends/receives). In a synchronous job
every rank's wall time per iteration is the same, set by the slowest; what differs is how much of it
each rank spent working rather than waiting, so the slow rank is the one with the largest busy time.
Everything a rank does on its own counts as busy: compute, waiting for its data loader, a slow disk.

With NCCL, collectives return once queued on the CUDA stream and the wait for peers happens on the
device, which the host meets at the step's one device sync (`step.read_on_host`, counted as waiting
too): the measure is then the host's own work (data loading, Python, kernel launches). A rank whose host
is slow is named; a rank whose GPU alone is slow shows in every rank's wall time but is not told apart
(Megatron-LM's detector times CUDA events for that).

Cost: the wait clock is always on, one addition in the timer each collective call already had and two
clock reads around the device sync; with the flag, one all-gather of one float per rank over the world
group at each log interval (none per step), and rank 0 sorts the list (bench/resilience.py).

Semantics follow Megatron-LM's straggler detector (`--log-straggler`, `--straggler-minmax-count`): the
min and max over ranks with their ranks; here also the median, and the ranks slower than the median by
more than `--straggler-threshold` are named. The median of an even number of ranks is the lower middle
value, so that in a 2-rank job the slow rank is compared with the fast one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.log import get_logger
from megatron.parallel.collectives import HOST_WAIT, all_gather
from megatron.parallel.state import ParallelState

logger = get_logger(__name__)


def host_wait_seconds() -> float:
    """Seconds this process has spent blocked waiting for peers so far (take differences)."""
    return HOST_WAIT.seconds


@dataclass(frozen=True)
class StragglerReport:
    """Busy milliseconds per iteration of every rank (index = global rank) and what they name."""

    busy_ms: tuple[float, ...]
    threshold: float
    median: float  # the lower median (module docstring)
    slowest: tuple[int, ...]  # up to --straggler-minmax-count ranks, slowest first
    fastest: tuple[int, ...]  # fastest first
    stragglers: tuple[int, ...]  # ranks with busy_ms > median * (1 + threshold), slowest first

    def excess(self, rank: int) -> float:
        """How much slower than the median `rank` is, as a fraction (0.5 = 50% slower)."""
        return self.busy_ms[rank] / self.median - 1.0 if self.median > 0 else 0.0

    def metrics(self) -> dict:
        """The metrics-file keys (JSONL, TensorBoard, W&B) of this report."""
        return {
            "busy_ms_min": self.busy_ms[self.fastest[0]],
            "busy_ms_min_rank": self.fastest[0],
            "busy_ms_median": self.median,
            "busy_ms_max": self.busy_ms[self.slowest[0]],
            "busy_ms_max_rank": self.slowest[0],
            "num_stragglers": len(self.stragglers),
            "straggler_ranks": list(self.stragglers),
        }

    def line(self, iteration: int) -> str:
        """The log line; it starts with "WARNING: " when a rank is named."""

        def ranks(order: tuple[int, ...]) -> str:
            return ", ".join(f"rank {rank} {self.busy_ms[rank]:.1f}" for rank in order)

        parts = [
            f"stragglers at iteration {iteration}: busy ms per iteration over {len(self.busy_ms)} ranks",
            f"min {ranks(self.fastest)}",
            f"median {self.median:.1f}",
            f"max {ranks(self.slowest)}",
        ]
        if not self.stragglers:
            return " " + " | ".join(parts)
        named = ", ".join(f"rank {rank} (+{100 * self.excess(rank):.0f}%)" for rank in self.stragglers)
        parts.append(f"slower than the median by more than {100 * self.threshold:.0f}%: {named}")
        return "WARNING: " + " | ".join(parts)


def straggler_report(busy_ms: list[float], *, threshold: float, minmax_count: int) -> StragglerReport:
    """The report over every rank's busy milliseconds per iteration (index = rank)."""
    if not busy_ms:
        raise ValueError("straggler_report needs at least one rank's busy time")
    order = sorted(range(len(busy_ms)), key=lambda rank: (busy_ms[rank], rank))
    median = busy_ms[order[(len(order) - 1) // 2]]
    count = min(minmax_count, len(order))
    slowest = tuple(reversed(order))
    return StragglerReport(
        busy_ms=tuple(busy_ms),
        threshold=threshold,
        median=median,
        slowest=slowest[:count],
        fastest=tuple(order[:count]),
        stragglers=tuple(rank for rank in slowest if busy_ms[rank] > median * (1.0 + threshold)),
    )


def gather_busy_ms(busy_ms: float, parallel_state: ParallelState) -> list[float]:
    """Every rank's `busy_ms`, in rank order: one all-gather of one float over the world group."""
    local = torch.tensor([busy_ms], dtype=torch.float64, device=parallel_state.device)
    return all_gather(local, parallel_state.world_group, dim=0).tolist()


def log_interval(logging_config, stats, parallel_state: ParallelState, iteration: int) -> dict:
    """At a log interval: with --log-straggler, gather the busy times of the interval's iterations
    (`stats`: `IntervalStats`), log the report on the main rank and return its metrics keys; else {}.
    Collective over the world group: every rank calls it at the same iterations."""
    if not logging_config.log_straggler or not stats.iterations:
        return {}
    busy = max(stats.seconds - stats.waited_seconds, 0.0) * 1000.0 / stats.iterations
    report = straggler_report(
        gather_busy_ms(busy, parallel_state),
        threshold=logging_config.straggler_threshold,
        minmax_count=logging_config.straggler_minmax_count,
    )
    logger.info(report.line(iteration))
    return report.metrics()
