"""Who may write a `--save` directory: the run lock, checkpoint lineage, and the checks made before
training starts. Standard library only (no torch): `check_before_start` runs before the process groups.

- The lock, `SAVE/megatron-run.lock`: one JSON line (host, pid, the process's start time, run id, since
  when, a random token), created atomically (written beside it with O_CREAT|O_EXCL, fsynced, then
  hard-linked into place, which fails when the lock exists) by rank 0 and refreshed (its mtime) every
  minute by a thread. It is abandoned (stale) when its process no longer exists on this host, or when it
  was not refreshed for --lock-stale-minutes; a stale lock is taken over, and so is the lock of the same
  job (the same run id: a torchrun restart round, a SLURM requeue or retry). Released at exit.
- The run id: TORCHELASTIC_RUN_ID (torchrun's --rdzv-id; --standalone makes a fresh one per torchrun
  invocation, kept by its restarts), else SLURM's job id (array job and task for array jobs), else, under
  torchrun without --rdzv-id, the rendezvous address; else none (a plain process: a fresh id).
- Lineage: every checkpoint's common.json records the lineage it belongs to. A fresh run starts one (the
  run id when there is one, so the restarted rounds of a job that had not saved yet continue it, else a
  random id); a run resumed with --load continues the lineage of the checkpoint it loads (None for
  checkpoints written before lineages were recorded). A run refuses to start on a --save holding
  `iter_*` directories of another lineage unless --overwrite-checkpoints, and keep-last-k and the
  replacement of a same-iteration directory only touch its own lineage's.

See docs/resilience.md ("Checkpoint ownership, full disks and failing storage").
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron.checkpoint.directory import TRACKER_FILENAME, checkpoint_dir, find_checkpoints, read_tracker
from megatron.log import get_logger

logger = get_logger(__name__)

LOCK_FILENAME = "megatron-run.lock"
COMMON_FILENAME = "common.json"  # the same name as files.COMMON_FILENAME (files imports torch-free too)
UNRECORDED = "unrecorded (written before lineages were recorded)"
_REFRESH_SECONDS = 60.0


def errno_name(code: int | None) -> str:
    """'ENOSPC' for errno.ENOSPC ('errno N' when unknown)."""
    return errno.errorcode.get(code, f"errno {code}") if code is not None else "no errno"


def job_run_id(env=None) -> str | None:
    """The id every rank and every restart of one job shares (module docstring), or None."""
    env = os.environ if env is None else env
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun:{rdzv}"
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if rdzv == "none" and env.get("MASTER_ADDR"):
        return f"torchrun:{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '')}"
    return None


def fresh_lineage(run_id: str | None) -> str:
    """The lineage a fresh run starts: its run id, or a random one."""
    return (
        run_id if run_id is not None else f"run-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
    )


# ---------------------------------------------------------------------------------------------- checks
def check_writable(save) -> None:
    """Create `save` if needed and write, fsync and remove a probe file in it; ValueError naming the path
    and the errno otherwise (a read-only or full --save fails before training, not at the first save)."""
    root = Path(save)
    probe = root / f".write-probe-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    step = f"cannot create directory {root}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        step = f"cannot write {probe}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"megatron write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        step = f"cannot remove {probe}"
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--save {root} is not writable: {step}: {exc.strerror or exc} ({errno_name(exc.errno)})"
        ) from None


def check_before_start(ckpt) -> None:
    """Every rank, before the process groups (`ckpt`: the CheckpointConfig): --save writable, not locked
    by a live run of another job, holding no other run's checkpoints (unless --overwrite-checkpoints),
    and --load not a directory of untracked checkpoints. ValueError saying what and how to proceed.
    Rank 0 repeats the lock and ownership checks atomically once the groups exist
    (`Checkpointer.claim`)."""
    run_id = job_run_id()
    if ckpt.save:
        check_writable(ckpt.save)
    lineage = planned_lineage(ckpt.load, ckpt.finetune, run_id)
    if not ckpt.save:
        return
    held = read_lock(ckpt.save)
    if held is not None and takeover_reason(held, run_id, ckpt.lock_stale_minutes) is None:
        raise ValueError(held.owner_message(ckpt.lock_stale_minutes))
    if not ckpt.overwrite_checkpoints:
        check_ownership(ckpt.save, lineage, ckpt.load)


# ---------------------------------------------------------------------------------------------- lineage
def read_lineage(directory) -> str | None:
    """The lineage recorded in a checkpoint directory's common.json; None when it records none
    (single-file checkpoints, sharded ones written before lineages, unreadable ones)."""
    try:
        common = json.loads((Path(directory) / COMMON_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lineage = common.get("lineage") if isinstance(common, dict) else None
    return lineage if isinstance(lineage, str) else None


def planned_lineage(load, finetune: bool, run_id: str | None) -> str | None:
    """The lineage this run will write: the tracked checkpoint's under --load (resumed, not --finetune),
    else a fresh one. ValueError when --load holds `iter_*` directories but no tracker, unless they are
    all this job's own (a restart before its first tracker update: they are resumed from)."""
    fresh = fresh_lineage(run_id)
    if not load or finetune:
        return fresh
    tracked = read_tracker(load)
    if tracked is not None:
        return read_lineage(checkpoint_dir(load, tracked))
    untracked_checkpoints(load, fresh)
    return fresh


def untracked_checkpoints(load, own_lineage: str | None) -> list[Path]:
    """--load without a tracker: [] when it holds no `iter_*` directory; those directories (newest first)
    when every one belongs to `own_lineage` (this job wrote them: resume from the newest complete one);
    else ValueError listing what is there (loading nothing and saving over them would lose them)."""
    found = find_checkpoints(load)
    if not found:
        return []
    lineages = {path.name: read_lineage(path) for _, path in found}
    if own_lineage is not None and all(lineage == own_lineage for lineage in lineages.values()):
        return [path for _, path in found]
    listed = ", ".join(f"{name} (lineage {lineage or UNRECORDED})" for name, lineage in lineages.items())
    newest = found[0][0]
    raise ValueError(
        f"--load {load} holds checkpoints but no {TRACKER_FILENAME}: {listed}. Starting from scratch "
        f"would later overwrite them. To resume the newest, write its iteration into the tracker "
        f"(echo {newest} > {Path(load) / TRACKER_FILENAME}) and run again; to start a new run, give it "
        "a --load/--save directory of its own"
    )


def foreign_checkpoints(root, lineage: str | None) -> list[tuple[str, str | None]]:
    """(name, lineage) of every `iter_*` directory under `root` that is not of `lineage`, newest first."""
    return [
        (path.name, found) for _, path in find_checkpoints(root) if (found := read_lineage(path)) != lineage
    ]


def check_ownership(save, lineage: str | None, load=None) -> None:
    """ValueError when --save holds `iter_*` directories of another lineage than `lineage` (this run's)."""
    foreign = foreign_checkpoints(save, lineage)
    if not foreign:
        return
    names = ", ".join(name for name, _ in foreign[:8]) + (
        f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
    )
    theirs = sorted({found or UNRECORDED for _, found in foreign})
    tracked = read_tracker(save)
    tracker = f"{TRACKER_FILENAME} names {tracked}" if tracked is not None else f"no {TRACKER_FILENAME}"
    resumed = load and read_tracker(load) is not None
    mine = (
        f"continues lineage {lineage or UNRECORDED} from --load {load}" if resumed else "starts a new lineage"
    )
    raise ValueError(
        f"--save {save} holds checkpoints of another run: {names} (lineage {', '.join(theirs)}; {tracker}), "
        f"while this run {mine}. To continue that run, pass --load {save}; to keep its checkpoints, give "
        "this run another --save; to let this run replace and delete them, pass --overwrite-checkpoints"
    )


# ---------------------------------------------------------------------------------------------- the lock
def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    identifies a process (pids are reused). None where /proc is not there."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[19]


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return start is None or _process_start(pid) in (None, start)


@dataclass
class LockInfo:
    """What the lock file says about its owner; `refreshed`: its mtime (0 when unknown)."""

    host: str = "?"
    pid: int = -1
    process_start: str | None = None
    run_id: str | None = None
    since: float = 0.0
    token: str = ""
    refreshed: float = 0.0
    path: str = ""

    @classmethod
    def mine(cls, run_id: str | None) -> LockInfo:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _process_start(pid), run_id, time.time(), secrets.token_hex(8))

    def to_json(self) -> str:
        fields = asdict(self)
        for name in ("refreshed", "path"):
            del fields[name]
        fields["since_utc"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return json.dumps(fields) + "\n"

    def owner_message(self, stale_minutes: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since)) if self.since else "?"
        age = max(0.0, time.time() - self.refreshed) / 60.0
        return (
            f"--save {Path(self.path).parent} is in use by another run: {self.path} is held by pid {self.pid} "
            f"on host {self.host} (run id {self.run_id or 'none'}) since {since}, refreshed {age:.1f} "
            f"minutes ago. Wait for that run to end or give this run another --save. If that run is gone "
            f"(its host died), the lock counts as abandoned {stale_minutes:g} minutes after its last "
            f"refresh (--lock-stale-minutes); or, once you are sure, delete {self.path}"
        )


def read_lock(root) -> LockInfo | None:
    """The lock on `root` (None when there is none); an unreadable one is owned by nobody known."""
    path = Path(root) / LOCK_FILENAME
    try:
        refreshed = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
        known = {name: fields[name] for name in LockInfo.__dataclass_fields__ if name in fields}
        info = LockInfo(**known)
    except (ValueError, TypeError):
        info = LockInfo()
    info.refreshed, info.path = refreshed, str(path)
    return info


def takeover_reason(held: LockInfo, run_id: str | None, stale_minutes: float) -> str | None:
    """Why `held` may be taken over (the same job or process, or abandoned); None when it is in use."""
    if held.host == socket.gethostname() and held.pid == os.getpid():
        return "held by this process"
    if run_id is not None and held.run_id == run_id:
        return f"held by an earlier round of this job (run id {run_id}, pid {held.pid} on {held.host})"
    if held.host == socket.gethostname() and not _process_alive(held.pid, held.process_start):
        return f"abandoned: its process {held.pid} on this host ({held.host}) no longer exists"
    age = time.time() - held.refreshed
    if age > stale_minutes * 60.0:
        return (
            f"abandoned: not refreshed for {age / 60.0:.1f} minutes (--lock-stale-minutes {stale_minutes:g})"
        )
    return None


def _create(path: Path, info: LockInfo) -> bool:
    """Create the lock atomically with its whole content; False when it exists."""
    tmp = path.with_name(f".{path.name}.new-{info.token}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        os.write(fd, info.to_json().encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic and fails when the lock exists
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # a file system without hard links: exclusive create of the lock itself
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, info.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_same(path: Path, held: LockInfo) -> bool:
    """Remove the lock if it is still `held` (renamed away first, so a lock another process created
    meanwhile is put back, not deleted)."""
    aside = path.with_name(f".{path.name}.stale-{secrets.token_hex(4)}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return True
    try:
        current = json.loads(aside.read_text(encoding="utf-8")).get("token", "")
    except (OSError, ValueError, AttributeError):
        current = ""
    if current == held.token:
        aside.unlink(missing_ok=True)
        return True
    with contextlib.suppress(OSError):  # not the one judged stale: put it back (unless another exists)
        os.link(aside, path)
    aside.unlink(missing_ok=True)
    return False


class SaveLock:
    """The lock this process holds on a --save directory (rank 0 of a run): refreshed every minute by a
    daemon thread, released by `release` (also at interpreter exit)."""

    def __init__(self, path: Path, info: LockInfo, stale_minutes: float) -> None:
        self.path, self.info = path, info
        self._stop = threading.Event()
        interval = min(_REFRESH_SECONDS, stale_minutes * 60.0 / 4.0)
        self._thread = threading.Thread(target=self._refresh, args=(interval,), name="save-lock", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    @classmethod
    def acquire(cls, root, run_id: str | None, stale_minutes: float) -> SaveLock:
        """Take the lock on `root` (taking over an abandoned one or this job's own, logged); ValueError
        naming the owner when another run holds it."""
        path = Path(root) / LOCK_FILENAME
        Path(root).mkdir(parents=True, exist_ok=True)
        info = LockInfo.mine(run_id)
        for _ in range(5):
            if _create(path, info):
                return cls(path, info, stale_minutes)
            held = read_lock(root)
            if held is None:
                continue  # released meanwhile
            reason = takeover_reason(held, run_id, stale_minutes)
            if reason is None:
                raise ValueError(held.owner_message(stale_minutes))
            if _remove_if_same(path, held):
                logger.info(f"> took over the lock {path}: {reason}")
        raise ValueError(f"could not take the lock {path}: other processes keep creating it")

    def holds(self) -> bool:
        held = read_lock(self.path.parent)
        return held is not None and held.token == self.info.token

    def _refresh(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if not self.holds():
                    logger.info(f"WARNING: the lock {self.path} was taken over by another process")
                    return
                os.utime(self.path)
            except OSError as exc:  # storage trouble: the next save reports it; keep trying
                logger.info(f"WARNING: could not refresh the lock {self.path}: {exc}")

    def release(self) -> None:
        """Stop refreshing and remove the lock if it is still this process's (idempotent)."""
        if self._stop.is_set() or os.getpid() != self.info.pid:  # a forked child never releases it
            return
        self._stop.set()
        atexit.unregister(self.release)
        try:
            if self.holds():
                self.path.unlink()
        except OSError as exc:
            logger.info(f"WARNING: could not remove the lock {self.path}: {exc}")
