"""Fault injection for tests (test-only): the `MEGATRON_FAULTS` environment variable, parsed and matched.

    MEGATRON_FAULTS="kill:rank=1,iter=10;slow:rank=1,iter=3-8,seconds=0.5;nan:rank=0,iter=7"

A `;`-separated list of `kind:key=value,key=value`. Kinds (`KINDS`): kill, hang, slow, data_hang, nan,
spike, enospc, kill_in_save, hang_in_save. Keys: `rank` (global rank; default every rank), `iter`
(required: N or A-B, the 1-based iteration being run, so "iteration 10" is the step that takes the
iteration count from 9 to 10), `attempt` (the restart round it fires in, `megatron.launch.restart_attempt`:
torchrun's TORCHELASTIC_RESTART_COUNT or a SLURM retry loop's MEGATRON_RESTART_COUNT; default 0, `*` =
every round), `seconds` (slow), `factor` (spike), `param` (nan: a parameter-name substring).

Matching: a loop fault (kill, hang, slow, data_hang, nan, spike) fires at each iteration of its range,
`iter=N` being the range N-N. The save faults (enospc, kill_in_save, hang_in_save) fire in saves, which
happen only every --save-interval: `iter=N` fires once, in the first save of an iteration >= N;
`iter=A-B` fires in every save of an iteration in A..B. Each fault records the iterations it fired at
(`Fault.fired`).

Layering: this module holds the parser, the matching and the save-time hook (`in_save`), with no
dependency beyond the standard library and `megatron.launch`, in the config layer so that the checkpoint
package (below training) can call it; `megatron.training.faults.Faults` extends `FaultPlan` with the
training-loop hooks (kill, hang, slow, nan, spike, data_hang). Unset, `active` is False and every hook
site costs one attribute test.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from megatron.launch import restart_attempt

ENV = "MEGATRON_FAULTS"
KINDS = ("kill", "hang", "slow", "data_hang", "nan", "spike", "enospc", "kill_in_save", "hang_in_save")
KEYS = ("rank", "iter", "attempt", "seconds", "factor", "param")
SAVE_KINDS = ("enospc", "kill_in_save", "hang_in_save")
# keys a kind accepts beyond rank, iter and attempt (which every kind takes), and those it requires
_EXTRA_KEYS = {"slow": ("seconds",), "spike": ("factor",), "nan": ("param",)}
_REQUIRED = {"slow": ("seconds",), "spike": ("factor",)}
_SYNTAX = (
    f"{ENV} is a ';'-separated list of kind:key=value,... with kinds {', '.join(KINDS)} and keys "
    f"{', '.join(KEYS)} (iter=N or A-B is required; seconds for slow, factor for spike, param for nan), "
    f'e.g. {ENV}="kill:rank=1,iter=10;spike:iter=12,factor=50"'
)


@dataclass
class Fault:
    """One parsed fault. `rank`/`attempt` None: every rank / every restart round."""

    kind: str
    first: int
    last: int
    rank: int | None = None
    attempt: int | None = 0
    seconds: float | None = None
    factor: float | None = None
    param: str | None = None
    fired: list[int] = field(default_factory=list)  # iterations it fired at, in this process

    def matches(self, iteration: int, rank: int, attempt: int) -> bool:
        if self.rank is not None and self.rank != rank:
            return False
        if self.attempt is not None and self.attempt != attempt:
            return False
        if self.kind in SAVE_KINDS and self.first == self.last:  # the first save at or after N
            return iteration >= self.first and not self.fired
        return self.first <= iteration <= self.last


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"{ENV}: {spec!r}: {why}. {_SYNTAX}")


def _int(spec: str, key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(spec, f"{key}={text!r} is not an integer") from None
    if value < 0 or (key == "iter" and value < 1):
        raise _bad(spec, f"{key}={text} must be {'>= 1' if key == 'iter' else '>= 0'}")
    return value


def _positive_float(spec: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _bad(spec, f"{key}={text!r} is not a number") from None
    if not value > 0:
        raise _bad(spec, f"{key}={text} must be > 0")
    return value


def _iter_range(spec: str, text: str) -> tuple[int, int]:
    first, dash, last = text.partition("-")
    low = _int(spec, "iter", first)
    high = _int(spec, "iter", last) if dash else low
    if high < low:
        raise _bad(spec, f"iter={text}: the range ends before it starts")
    return low, high


def parse_fault(spec: str) -> Fault:
    """One `kind:key=value,...` item; ValueError naming MEGATRON_FAULTS and what is valid."""
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise _bad(spec, f"unknown kind {kind!r}")
    values: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or key not in KEYS:
            raise _bad(spec, f"{item!r} is not one of the keys as key=value")
        if key not in ("rank", "iter", "attempt") and key not in _EXTRA_KEYS.get(kind, ()):
            raise _bad(spec, f"{kind} takes no {key}")
        if key in values:
            raise _bad(spec, f"{key} given twice")
        values[key] = value.strip()
    missing = [key for key in ("iter", *_REQUIRED.get(kind, ())) if key not in values]
    if missing:
        raise _bad(spec, f"{kind} needs {' and '.join(missing)}")
    first, last = _iter_range(spec, values["iter"])
    attempt = values.get("attempt", "0")
    return Fault(
        kind=kind,
        first=first,
        last=last,
        rank=_int(spec, "rank", values["rank"]) if "rank" in values else None,
        attempt=None if attempt == "*" else _int(spec, "attempt", attempt),
        seconds=_positive_float(spec, "seconds", values["seconds"]) if "seconds" in values else None,
        factor=_positive_float(spec, "factor", values["factor"]) if "factor" in values else None,
        param=values.get("param") or None,
    )


def parse_faults(text: str | None) -> list[Fault]:
    """Every fault of a MEGATRON_FAULTS value (empty or unset: none)."""
    return [parse_fault(spec) for spec in (text or "").split(";") if spec.strip()]


def announce(fault: Fault, rank: int, iteration: int, what: str = "") -> None:
    """One stderr line per fired fault (every rank; flushed, since a kill may follow at once)."""
    sys.stderr.write(
        f"[rank {rank}] {ENV}: injecting {fault.kind} at iteration {iteration}{': ' + what if what else ''}\n"
    )
    sys.stderr.flush()


class FaultPlan:
    """The faults of this process (`from_env`) and their bookkeeping; the save-time hook."""

    def __init__(self, faults: list[Fault] | None = None, *, attempt: int = 0) -> None:
        self.faults = list(faults or [])
        self.attempt = attempt
        # False when nothing can fire in this restart round: every hook site is then one attribute test
        self.active = any(fault.attempt in (None, attempt) for fault in self.faults)

    @classmethod
    def from_env(cls, environ=None):
        """Parse MEGATRON_FAULTS (ValueError naming it and what is valid); the restart round is
        TORCHELASTIC_RESTART_COUNT (torchrun), else MEGATRON_RESTART_COUNT (a SLURM recipe's retry
        loop), else 0."""
        environ = os.environ if environ is None else environ
        faults = parse_faults(environ.get(ENV))
        return cls(faults, attempt=restart_attempt(environ))

    def fire(self, kind: str, iteration: int, rank: int) -> Fault | None:
        """The first fault of `kind` matching (iteration, rank, this attempt), recorded as fired; or None."""
        for fault in self.faults:
            if fault.kind == kind and fault.matches(iteration, rank, self.attempt):
                fault.fired.append(iteration)
                return fault
        return None

    def in_save(self, iteration: int, rank: int, path=None) -> None:
        """Called by each rank while writing the checkpoint of `iteration`, after its data files are
        written: enospc raises OSError(ENOSPC) naming `path`; kill_in_save SIGKILLs this process;
        hang_in_save never returns (a save that cannot finish)."""
        fault = self.fire("enospc", iteration, rank)
        if fault is not None:
            announce(fault, rank, iteration, "save fails with ENOSPC")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
        fault = self.fire("kill_in_save", iteration, rank)
        if fault is not None:
            announce(fault, rank, iteration, "SIGKILL while writing the checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)
        fault = self.fire("hang_in_save", iteration, rank)
        if fault is not None:
            announce(fault, rank, iteration, "the save never finishes")
            threading.Event().wait()
