"""Where this process sits in the job: rank, world size, local rank and the rendezvous address.

Three ways to start a run, told apart from the environment before torch is imported:

- torchrun (single node, or one torchrun per node with `--rdzv-backend c10d`, also the way to run under
  SLURM with one task per node): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
  they are used as they are.
- srun, one task per GPU (no torchrun): Slurm sets SLURM_PROCID, SLURM_LOCALID and the step's task
  count; RANK, WORLD_SIZE and LOCAL_RANK are derived from them. MASTER_ADDR must be exported by the batch
  script (the first host of the allocation: `export MASTER_ADDR=$(scontrol show hostnames
  "$SLURM_JOB_NODELIST" | head -n 1)`); MASTER_PORT defaults to a port derived from SLURM_JOB_ID, the same
  on every task of the job.
- nothing: one process (WORLD_SIZE 1).

`resolve_launch` is a pure function of the environment; `apply_launch` writes the derived variables back
so that torch.distributed's env:// rendezvous and the config validation see them. Errors are ValueErrors
naming the rank, the host and the variable.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

# MASTER_PORT under srun when the batch script sets none: a port in [BASE, BASE + SPAN) picked by job id,
# below Linux's default ephemeral range (32768-60999) so that it rarely collides with client sockets.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000

DERIVED_MARKER = "MEGATRON_LAUNCHER"  # set to "srun" by apply_launch when it wrote RANK etc. from SLURM_*


@dataclass(frozen=True)
class Launch:
    """This process's place in the job, as the launcher described it."""

    launcher: str  # "torchrun", "srun", "RANK/WORLD_SIZE variables" (set by hand or another tool), "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    host: str = ""

    def environment(self) -> dict[str, str]:
        """The torch.distributed env:// variables for this launch (empty for one process)."""
        if self.world_size == 1 and self.launcher == "single":
            return {}
        env = {"WORLD_SIZE": str(self.world_size)}
        if self.launcher == "srun":  # other launchers' own RANK/LOCAL_RANK are already there
            env.update({"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), DERIVED_MARKER: "srun"})
        if self.master_addr is not None:
            env["MASTER_ADDR"] = self.master_addr
        if self.master_port is not None:
            env["MASTER_PORT"] = str(self.master_port)
        return env

    def describe(self) -> str:
        """`rank R of W on host H (launched by L)`: the prefix of launch and rendezvous errors."""
        return f"rank {self.rank} of {self.world_size} on host {self.host} (launched by {self.launcher})"


def _integer(environ: Mapping[str, str], name: str, where: str, minimum: int) -> int:
    value = environ.get(name, "")
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{where}: environment variable {name}={value!r} is not an integer >= {minimum}")
    return number


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """True in a task that srun started (a job step), false in the batch script itself.

    Slurm sets SLURM_PROCID in the batch step too (0) and SLURM_NTASKS to the job's task count there, so
    neither proves that every task runs this program; SLURM_STEP_NUM_TASKS and SLURM_STEP_ID are set by
    srun for its step only.
    """
    return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ


def resolve_launch(
    environ: Mapping[str, str] | None = None, host: str | None = None, *, require_rendezvous: bool = True
) -> Launch:
    """Read the launcher's variables (see the module docstring). Raises ValueError naming the rank, the
    host and the variable that is missing or malformed. require_rendezvous=False derives what it can
    (the world size for validating a config or planning a dry run) without requiring RANK or
    MASTER_ADDR/MASTER_PORT."""
    environ = os.environ if environ is None else environ
    host = host or socket.gethostname()
    torchrun = "TORCHELASTIC_RUN_ID" in environ  # torchrun marks its workers with it
    derived = environ.get(DERIVED_MARKER) == "srun"
    if _in_srun_step(environ) and not torchrun and ("RANK" not in environ or derived):
        # srun started this task directly (torchrun inside an srun step sets TORCHELASTIC_RUN_ID, and a
        # launcher that set RANK itself, e.g. a test harness run inside a SLURM step, keeps its own ranks;
        # RANK set by apply_launch from these same variables is marked)
        return _srun_launch(environ, host, require_rendezvous)
    if "RANK" in environ or "WORLD_SIZE" in environ:
        launcher = "torchrun" if torchrun else "RANK/WORLD_SIZE variables"
        where = f"rank {environ.get('RANK', '?')} on host {host} (launched by {launcher})"
        world_size = _integer(environ, "WORLD_SIZE", where, 1)
        if "RANK" not in environ and (world_size == 1 or not require_rendezvous):
            return Launch("single" if world_size == 1 else launcher, 0, world_size, host=host)
        if world_size > 1 and require_rendezvous:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not environ.get(name)]
            if missing:
                raise ValueError(
                    f"{where}: environment variable(s) {', '.join(missing)} not set; launch with torchrun, "
                    "which sets them, or export RANK, WORLD_SIZE, MASTER_ADDR (the host of rank 0) and "
                    "MASTER_PORT"
                )
        rank = _integer(environ, "RANK", where, 0)
        if rank >= world_size:
            raise ValueError(f"{where}: RANK={rank} is not below WORLD_SIZE={world_size}")
        local_rank = _integer(environ, "LOCAL_RANK", where, 0) if "LOCAL_RANK" in environ else 0
        port = _integer(environ, "MASTER_PORT", where, 1) if environ.get("MASTER_PORT") else None
        return Launch(launcher, rank, world_size, local_rank, environ.get("MASTER_ADDR") or None, port, host)
    return Launch("single", host=host)


def _srun_launch(environ: Mapping[str, str], host: str, require_rendezvous: bool) -> Launch:
    where = f"task {environ.get('SLURM_PROCID', '?')} on host {host} (launched by srun)"
    world_size = _integer(environ, "SLURM_STEP_NUM_TASKS", where, 1)
    rank = _integer(environ, "SLURM_PROCID", where, 0)
    local_rank = _integer(environ, "SLURM_LOCALID", where, 0) if "SLURM_LOCALID" in environ else 0
    if rank >= world_size:
        raise ValueError(f"{where}: SLURM_PROCID={rank} is not below SLURM_STEP_NUM_TASKS={world_size}")
    if world_size == 1:
        return Launch("srun", 0, 1, local_rank, host=host)
    master_addr = environ.get("MASTER_ADDR") or None
    if environ.get("MASTER_PORT"):
        port = _integer(environ, "MASTER_PORT", where, 1)
    elif environ.get("SLURM_JOB_ID", "").isdigit():
        port = SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
    else:
        port = None
    launch = Launch("srun", rank, world_size, local_rank, master_addr, port, host)
    if master_addr is None and require_rendezvous:
        raise ValueError(
            f"{launch.describe()}: environment variable MASTER_ADDR not set; under srun with one task per "
            "GPU the batch script must export the rendezvous host before srun, e.g. "
            '`export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)`'
        )
    if port is None and require_rendezvous:
        raise ValueError(
            f"{launch.describe()}: neither MASTER_PORT nor a numeric SLURM_JOB_ID is set; export MASTER_PORT "
            "(a free port on the MASTER_ADDR host, the same for every task)"
        )
    return launch


def apply_launch(
    environ: MutableMapping[str, str] | None = None, *, require_rendezvous: bool = True
) -> Launch:
    """`resolve_launch`, then set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT in `environ`
    (default os.environ) for torch.distributed's env:// rendezvous. Returns the Launch."""
    environ = os.environ if environ is None else environ
    launch = resolve_launch(environ, require_rendezvous=require_rendezvous)
    environ.update(launch.environment())
    return launch


def rendezvous_error(launch: Launch, timeout_minutes: float, error: BaseException) -> str:
    """The message for a process group that could not be formed: who, where, which address, how long."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    target = f"{launch.master_addr}:{launch.master_port}"
    if launch.rank == 0:
        what = f"rank 0 hosts the rendezvous at {target} but not every rank joined"
    else:
        what = f"could not reach the rendezvous at {target}"
    return (
        f"{launch.describe()}: {what} within --distributed-timeout-minutes {timeout_minutes:g} "
        f"({first_line}); check MASTER_ADDR/MASTER_PORT (rank 0's host and a port open between the nodes) "
        f"and that all {launch.world_size} ranks were started"
    )


# The restart round of this process: torchrun's agent counts its restarts of the worker group; a SLURM
# recipe that retries `srun` (examples/pretrain_tiny.slurm) exports its own counter under the second name.
RESTART_COUNT_VARIABLES = ("TORCHELASTIC_RESTART_COUNT", "MEGATRON_RESTART_COUNT")
MAX_RESTARTS_VARIABLES = ("TORCHELASTIC_MAX_RESTARTS", "MEGATRON_MAX_RESTARTS")


def _first_count(environ: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def restart_attempt(environ: Mapping[str, str] | None = None) -> int:
    """Which (re)start of the job this process belongs to: 0 for the first, 1 after one restart, ...
    (TORCHELASTIC_RESTART_COUNT under torchrun, else MEGATRON_RESTART_COUNT, else 0)."""
    found = _first_count(os.environ if environ is None else environ, RESTART_COUNT_VARIABLES)
    return found or 0


def max_restarts(environ: Mapping[str, str] | None = None) -> int | None:
    """How many restarts the launcher allows (torchrun's --max-restarts, or the recipe's
    MEGATRON_MAX_RESTARTS); None when the launcher does not say."""
    return _first_count(os.environ if environ is None else environ, MAX_RESTARTS_VARIABLES)
