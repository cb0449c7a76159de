"""Run generated programs in child processes, each in its own temporary directory and under limits.

One subprocess per distinct program (`python -I` with `sandbox_runner.py`): a fresh temporary directory
as its cwd, HOME and TMPDIR, a scrubbed environment (no tokens or keys of the parent), its own process
group (killed whole at the wall-clock timeout), resource limits (address space, CPU seconds, file size,
processes), an audit hook refusing process creation, ctypes, sockets and file access outside the
temporary directory (reads of the Python installation excepted), and output capped in the child.
Threads each wait on one subprocess; the pool is sized to the machine's cores and memory.

Kinds of outcome: passed; failed (an assertion); error (another exception, named); syntax (the program
does not compile); timeout (wall clock or CPU limit); memory (MemoryError); killed (ended by a signal or
without a verdict, e.g. past the file-size limit or by `os._exit`).

Identical programs are run once per `run_programs` call and their result is shared: the infilling
problems of one HumanEval problem with their canonical middles all rebuild the same program.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from megatron.log import progress_bar

RUNNER = Path(__file__).with_name("sandbox_runner.py")
KINDS = ("passed", "failed", "error", "syntax", "timeout", "memory", "killed")


@dataclass(frozen=True)
class Limits:
    """What one program may use: wall-clock seconds, CPU seconds (default: the wall clock rounded up),
    address space, bytes per written file and characters of captured output."""

    timeout: float = 10.0
    memory_bytes: int = 2 << 30
    file_bytes: int = 16 << 20
    output_chars: int = 4096
    cpu_seconds: int | None = None

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"--timeout {self.timeout}: must be > 0 seconds")
        if self.memory_bytes < 64 << 20:
            raise ValueError(f"--memory-limit-mb {self.memory_bytes >> 20}: must be >= 64 (Python needs it)")


@dataclass(frozen=True)
class Outcome:
    """How one program ended: `kind` (KINDS), the exception type, a message and the captured output."""

    kind: str
    error: str | None = None
    message: str = ""
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.kind == "passed"


def _child_env(directory: str) -> dict:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": directory,
        "TMPDIR": directory,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _signal_outcome(returncode: int, timed_out: bool) -> Outcome:
    if timed_out:
        return Outcome("timeout", message="wall-clock limit")
    if returncode == -signal.SIGXCPU:
        return Outcome("timeout", message="CPU time limit")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return Outcome("killed", message=f"ended by {name}")
    return Outcome("killed", message=f"exited with status {returncode} without a verdict")


def _read_verdict(read_fd: int) -> dict | None:
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read(1 << 20)
    try:
        return json.loads(data.decode("utf-8").splitlines()[0]) if data.strip() else None
    except (ValueError, IndexError):
        return None


def run_program(program: str, limits: Limits) -> Outcome:
    """Run one program in a fresh temporary directory under `limits`; its outcome."""
    cpu = limits.cpu_seconds or int(limits.timeout) + 1
    with tempfile.TemporaryDirectory(prefix="megatron-eval-") as directory:
        program_path = Path(directory) / "program.py"
        program_path.write_text(program, encoding="utf-8")
        read_fd, write_fd = os.pipe()
        args = [str(program_path), str(write_fd), str(limits.memory_bytes), str(cpu)]
        args += [str(limits.file_bytes), str(limits.output_chars)]
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", str(RUNNER), *args],
                cwd=directory,
                env=_child_env(directory),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        reader = _VerdictReader(read_fd)
        timed_out = False
        try:
            process.wait(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(process)
        verdict = reader.result()
    if verdict is None or timed_out:
        return _signal_outcome(process.returncode, timed_out)
    output = verdict.get("output", "")
    if verdict.get("output_dropped_chars"):
        output += f"\n[... {verdict['output_dropped_chars']} more characters dropped]"
    return Outcome(verdict["kind"], verdict.get("error"), verdict.get("message", ""), output)


class _VerdictReader:
    """Reads the verdict pipe on a thread, so a child that fills it cannot block (it is killed at the
    timeout and the pipe closes)."""

    def __init__(self, read_fd: int) -> None:
        self._verdict = None
        self._thread = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._thread.start()

    def _read(self, read_fd: int) -> None:
        self._verdict = _read_verdict(read_fd)

    def result(self) -> dict | None:
        self._thread.join(timeout=5)
        return self._verdict


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (anything it started too), then reap the child."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def default_workers(limits: Limits) -> int:
    """One worker per core, fewer when the machine's memory cannot hold that many programs at their
    memory limit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return cores
    return max(1, min(cores, memory // limits.memory_bytes))


def run_programs(
    programs: list[str],
    limits: Limits | None = None,
    *,
    workers: int | None = None,
    progress: bool | None = None,
) -> list[Outcome]:
    """The outcome of each program, in order. Each distinct program runs once (duplicates share its
    outcome), `workers` at a time (default: `default_workers`)."""
    limits = limits or Limits()
    limits.validate()
    distinct = list(dict.fromkeys(programs))
    workers = workers or default_workers(limits)
    outcomes: dict[str, Outcome] = {}
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=len(distinct), desc="executing", unit="program", enabled=progress) as bar,
    ):
        futures = {pool.submit(run_program, program, limits): program for program in distinct}
        for future in as_completed(futures):
            outcomes[futures[future]] = future.result()
            bar.update(1)
    return [outcomes[program] for program in programs]
