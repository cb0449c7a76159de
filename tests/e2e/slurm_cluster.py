"""A throwaway one-node SLURM cluster for tests: munged, slurmctld and slurmd started from a temporary
directory, without systemd and without touching /etc/slurm or /etc/munge.

    with slurm_cluster(tmp_dir) as cluster:          # skips the test when SLURM cannot be had
        subprocess.run(["sbatch", "--wait", ...], env=cluster.env(), ...)

`ensure_slurm_installed()` installs Debian's packages (slurmctld, slurmd, slurm-client, munge) when a
program is missing, which needs root and apt-get; where either is missing, or the install fails, it calls
`pytest.skip` with the reason (never a silent pass). `LocalSlurmCluster.start` writes slurm.conf (and an
empty plugstack.conf, so the system's SPANK plugins stay out) under the directory, generates a munge key,
and starts the three daemons in the foreground as children of this process, with every file they write
(state, spool, logs, pid files, the munge key, socket and seed) under the directory (the munge files
in a short /tmp directory instead if the socket's path would be too long). It returns once the node
reports idle, or raises with the daemons' logs. `stop` ends only those three processes, by their ids:
SIGTERM, then SIGKILL after a grace period.

Slurm 22.05 (Debian 12) facts this relies on: `AuthInfo=socket=` points slurm at a non-default munge
socket (clients read it from the same slurm.conf, found through SLURM_CONF); `MinJobAge=5` keeps
`sbatch --wait` from polling at its slow interval; `EnforcePartLimits=ALL` rejects a job asking for more
than the node has instead of leaving it pending; proctrack/linuxproc and task/none keep cgroups out;
`SlurmdParameters=config_overrides` lets the node declare at least 2 CPUs on a 1-CPU machine (jobs of 2
single-CPU tasks then still run, oversubscribed).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# program -> the Debian package providing it
PROGRAMS = {
    "sbatch": "slurm-client",
    "srun": "slurm-client",
    "sinfo": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "munged": "munge",
}
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
NODE_NAME = "localhost"
PARTITION = "debug"
APT_TIMEOUT_S = 600


def which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which(program, path=path)


def missing_programs() -> list[str]:
    return [program for program in PROGRAMS if which(program) is None]


def install_command() -> list[str]:
    """The apt-get command line that installs the packages (run with DEBIAN_FRONTEND=noninteractive)."""
    return ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def install_slurm() -> str | None:
    """Install the packages with apt-get; returns None on success, else why it could not (one line).
    Only when that install fails does it run `apt-get update` and try once more (a fresh image has no
    package lists)."""
    if os.geteuid() != 0:
        return "not root (installing slurm and munge with apt-get needs root)"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine (not Debian/Ubuntu)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")

    def apt(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)

    try:
        result = apt(install_command())
        if result.returncode != 0:
            update = apt(["apt-get", "update"])
            if update.returncode != 0:
                return f"`apt-get update` failed: {_last_line(update.stderr or update.stdout)}"
            result = apt(install_command())
    except subprocess.TimeoutExpired as error:
        return f"`{' '.join(error.cmd)}` ran past {APT_TIMEOUT_S} s"
    if result.returncode != 0:
        return f"`{' '.join(install_command())}` failed: {_last_line(result.stderr or result.stdout)}"
    return None


def ensure_slurm_installed() -> None:
    """Install slurm and munge when a program is missing; `pytest.skip` (with the reason) when that cannot
    be done."""
    missing = missing_programs()
    if not missing:
        return
    why = install_slurm()
    if why is None and missing_programs():
        why = f"still missing after the install: {', '.join(missing_programs())}"
    if why is not None:
        pytest.skip(f"local SLURM cluster unavailable: {', '.join(missing)} missing and {why}")


def node_cpus() -> int:
    """CPUs the node declares: what this process may run on, at least 2 (see the module docstring)."""
    return max(2, len(os.sched_getaffinity(0)))


def _slurm_conf(root: Path, munge_socket: Path, ctld_port: int, slurmd_port: int, cpus: int) -> str:
    lines = {
        "ClusterName": "megatrontest",
        "SlurmctldHost": f"{NODE_NAME}(127.0.0.1)",
        "SlurmctldPort": ctld_port,
        "SlurmdPort": slurmd_port,
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "AuthInfo": f"socket={munge_socket}",
        "CredType": "cred/munge",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid",
        "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldLogFile": root / "slurmctld.log",
        "SlurmdLogFile": root / "slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "PlugStackConfig": root / "plugstack.conf",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "SchedulerType": "sched/builtin",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_CPU",
        "SlurmdParameters": "config_overrides",
        "MpiDefault": "none",
        "MailProg": "/bin/true",
        "ReturnToService": 2,
        "MinJobAge": 5,
        # Job ids (and so the rendezvous ports launch scripts derive from SLURM_JOB_ID) differ between
        # clusters started side by side on one machine.
        "FirstJobId": random.randrange(1000, 1_000_000),
        "EnforcePartLimits": "ALL",
        "KillWait": 5,
        "InactiveLimit": 0,
    }
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    text += f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\n"
    text += f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP\n"
    return text


class LocalSlurmCluster:
    """One node (`localhost`, partition `debug`) run from `root`. Use `env()` for client commands."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = node_cpus()
        self.processes: dict[str, subprocess.Popen] = {}
        self.cleanup: list[Path] = []  # directories made outside `root`, removed by `stop`

    def env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) for a command run against this cluster: SLURM_CONF points at its
        slurm.conf, any other SLURM_* (say, of an enclosing SLURM job) is dropped, the sbin dirs on PATH."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN_DIRS])
        return env

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 (lives as long as the daemon)
        try:
            self.processes[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env()
            )
        finally:
            log.close()

    def logs(self, tail_chars: int = 3000) -> str:
        """The end of each daemon's log (slurmctld and slurmd also print start-up errors on stderr)."""
        parts = []
        for name in ("munged.stdout", "slurmctld.log", "slurmctld.stdout", "slurmd.log", "slurmd.stdout"):
            path = self.root / name
            if path.exists() and path.stat().st_size:
                parts.append(
                    f"--- {path} (last {tail_chars} chars)\n{path.read_text(errors='replace')[-tail_chars:]}"
                )
        return "\n".join(parts) or f"(no daemon logs under {self.root})"

    def start(self, timeout: float = 60.0) -> LocalSlurmCluster:
        ensure_slurm_installed()
        if os.geteuid() != 0:
            pytest.skip("local SLURM cluster unavailable: not root (its daemons run as root, SlurmUser=root)")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge = self.root / "munge"
        if len(str(munge / "munge.socket")) > 100:  # a unix socket path has room for 107 bytes
            munge = Path(tempfile.mkdtemp(prefix="munge-"))
            self.cleanup.append(munge)
        munge.mkdir(exist_ok=True)
        os.chmod(munge, 0o755)  # munged wants its socket directory searchable by everyone
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        (self.root / "plugstack.conf").write_text("")
        self.conf.write_text(
            _slurm_conf(self.root, munge / "munge.socket", free_port(), free_port(), self.cpus)
        )

        self._start(
            "munged",
            [which("munged"), "--foreground", "--force", f"--socket={munge / 'munge.socket'}"]
            + [f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'seed'}"],
        )
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged to create its socket")
        self._start("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", NODE_NAME])
        self._wait(self.node_idle, timeout, f"node {NODE_NAME} to become idle")
        return self

    def node_state(self) -> str:
        result = self._client("sinfo", "-h", "-N", "-n", NODE_NAME, "-o", "%T")
        return result.stdout.strip() if result.returncode == 0 else ""

    def node_idle(self) -> bool:
        return self.node_state() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = {name: p.returncode for name, p in self.processes.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"waiting for {what}: daemon(s) exited {dead}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"waiting for {what}: not ready after {timeout:.0f} s\n{self.logs()}")

    def _client(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [which(argv[0]), *argv[1:]], env=self.env(), capture_output=True, text=True, timeout=30
        )

    def cancel_jobs(self, grace: float = 10.0) -> None:
        """scancel whatever is still queued or running on this cluster (a test that timed out) and wait
        for it to go, so that no job step outlives the daemons."""
        jobs = self._client("squeue", "-h", "-o", "%i").stdout.split()
        if not jobs:
            return
        self._client("scancel", "--full", *jobs)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._client("squeue", "-h", "-o", "%i").stdout.split():
            time.sleep(0.5)

    def stop(self, grace: float = 10.0) -> None:
        """Cancel leftover jobs, then end the daemons this object started (slurmd, slurmctld, munged) by
        process id: SIGTERM, SIGKILL after `grace` seconds."""
        alive = {name for name, process in self.processes.items() if process.poll() is None}
        if {"slurmctld", "munged"} <= alive:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.cancel_jobs(grace)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(grace)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup.clear()


@contextlib.contextmanager
def slurm_cluster(root: Path, timeout: float = 60.0) -> Iterator[LocalSlurmCluster]:
    """A started `LocalSlurmCluster` under `root`, stopped on exit (also when starting it failed)."""
    cluster = LocalSlurmCluster(root)
    try:
        yield cluster.start(timeout)
    finally:
        cluster.stop()
