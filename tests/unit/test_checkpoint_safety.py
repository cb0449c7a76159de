"""Checkpoint safety in one process: the run lock on --save (owner named, stale locks, the same job's
restarts), checkpoint lineage (another run's checkpoints refused, untracked ones listed, keep-last-k and
same-iteration replacement touching only this run's), the writability probe, failed saves named by their
cause (ENOSPC, EIO, torch's short write) with the previous checkpoint intact, the --on-save-failure
policy, and the CRC32 check of single-file checkpoints.

The same through the real CLI (and a real full tmpfs) is tests/e2e/test_checkpoint_safety.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron.checkpoint import Checkpointer, CheckpointError, ownership, verify_checkpoint
from megatron.checkpoint.directory import TRACKER_FILENAME, write_tracker
from megatron.checkpoint.files import delete_old, storage_failure, verify_torch_file
from megatron.checkpoint.ownership import LOCK_FILENAME, LockInfo, SaveLock, read_lock
from megatron.config.faults import FaultPlan, parse_faults
from tests.unit.test_checkpoint_sharded import build

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(autouse=True)
def _no_job_ids(monkeypatch):
    """No launcher's run id leaks in from the environment the tests run in."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def _write_lock(root: Path, *, host=None, pid=None, run_id="slurm:424242", age_seconds=0.0) -> Path:
    """A lock file as another run would have left it."""
    root.mkdir(parents=True, exist_ok=True)
    info = LockInfo(
        host or socket.gethostname(), os.getpid() if pid is None else pid, None, run_id, time.time(), "other"
    )
    path = root / LOCK_FILENAME
    path.write_text(info.to_json())
    if age_seconds:
        past = time.time() - age_seconds
        os.utime(path, (past, past))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------- the lock
def test_lock_is_created_with_its_owner_and_released(tmp_path):
    lock = SaveLock.acquire(tmp_path, "torchrun:abc", 30.0)
    held = read_lock(tmp_path)
    assert (held.host, held.pid, held.run_id) == (socket.gethostname(), os.getpid(), "torchrun:abc")
    assert held.token == lock.info.token and held.since <= time.time()
    lock.release()
    assert not (tmp_path / LOCK_FILENAME).exists()
    lock.release()  # idempotent


def test_a_live_lock_of_another_run_is_refused_naming_its_owner(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = _write_lock(tmp_path, pid=sleeper.pid, run_id="slurm:777")
        before = path.read_bytes()
        with pytest.raises(ValueError) as refused:
            SaveLock.acquire(tmp_path, "torchrun:mine", 30.0)
        message = str(refused.value)
        for part in (
            str(path),
            f"pid {sleeper.pid}",
            socket.gethostname(),
            "slurm:777",
            "--lock-stale-minutes",
        ):
            assert part in message, message
        assert path.read_bytes() == before  # untouched
        # a lock on another host cannot be checked for its process: it is in use until it goes stale
        _write_lock(tmp_path, host="elsewhere-host", pid=1, run_id="slurm:778", age_seconds=60)
        with pytest.raises(ValueError, match="elsewhere-host"):
            SaveLock.acquire(tmp_path, None, 30.0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_locks_and_the_same_jobs_lock_are_taken_over(tmp_path):
    cases = {
        "dead process on this host": dict(pid=_dead_pid()),
        "not refreshed for too long": dict(host="elsewhere-host", pid=1, age_seconds=31 * 60),
        "the same job (a restart round)": dict(host="elsewhere-host", pid=1, run_id="torchrun:mine"),
    }
    for name, lock_fields in cases.items():
        root = tmp_path / name.replace(" ", "_")
        _write_lock(root, **lock_fields)
        lock = SaveLock.acquire(root, "torchrun:mine", 30.0)
        assert read_lock(root).token == lock.info.token, name
        lock.release()


def test_release_never_removes_a_lock_another_process_took_over(tmp_path):
    lock = SaveLock.acquire(tmp_path, None, 30.0)
    path = _write_lock(tmp_path, host="elsewhere-host", pid=1)  # taken over meanwhile
    lock.release()
    assert path.is_file() and read_lock(tmp_path).host == "elsewhere-host"


def test_a_forked_child_never_releases_its_parents_lock(tmp_path):
    lock = SaveLock.acquire(tmp_path, None, 30.0)
    pid = os.fork()  # what a data-loader worker is
    if pid == 0:
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert read_lock(tmp_path).token == lock.info.token
    lock.release()
    assert not (tmp_path / LOCK_FILENAME).exists()


def test_the_lock_is_refreshed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(ownership, "_REFRESH_SECONDS", 0.05)
    lock = SaveLock.acquire(tmp_path, None, 30.0)
    try:
        past = time.time() - 3600
        os.utime(lock.path, (past, past))
        deadline = time.time() + 10
        while lock.path.stat().st_mtime < past + 1800 and time.time() < deadline:
            time.sleep(0.05)
        assert lock.path.stat().st_mtime > past + 1800
    finally:
        lock.release()


def test_the_run_id_comes_from_the_launcher():
    assert ownership.job_run_id({"TORCHELASTIC_RUN_ID": "uuid-1", "SLURM_JOB_ID": "5"}) == "torchrun:uuid-1"
    assert ownership.job_run_id({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "5"}) == "slurm:5"
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3"}
    assert ownership.job_run_id(array) == "slurm:8_3"
    static = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    assert ownership.job_run_id(static) == "torchrun:node1:29500"
    assert ownership.job_run_id({}) is None


# ---------------------------------------------------------------------------------------------- writability
def test_an_unwritable_save_is_named_with_its_errno(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"--save .*a_file/ckpt is not writable: .*\(ENOTDIR\)"):
        ownership.check_writable(blocker / "ckpt")
    ownership.check_writable(tmp_path / "new" / "ckpt")  # created, probed, probe removed
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []


# ---------------------------------------------------------------------------------------------- lineage
def _fake_checkpoint(root: Path, iteration: int, lineage: str | None) -> Path:
    directory = root / f"iter_{iteration:07d}"
    directory.mkdir(parents=True)
    common = {"format": "megatron-starcoder-dcp/1", "iteration": iteration}
    if lineage is not None:
        common["lineage"] = lineage
    (directory / "common.json").write_text(json.dumps(common))
    (directory / "manifest.json").write_text("{}")
    return directory


def test_a_save_holding_another_runs_checkpoints_is_refused(tmp_path):
    _fake_checkpoint(tmp_path, 4, "run-a")
    _fake_checkpoint(tmp_path, 8, "run-a")
    write_tracker(tmp_path, 8)
    with pytest.raises(ValueError) as refused:
        ownership.check_ownership(tmp_path, "run-b")
    message = str(refused.value)
    for part in (
        "iter_0000008, iter_0000004",
        "lineage run-a",
        "names 8",
        "--overwrite-checkpoints",
        "--load",
    ):
        assert part in message, message
    ownership.check_ownership(tmp_path, "run-a", tmp_path)  # its own: fine
    (tmp_path / TRACKER_FILENAME).unlink()
    with pytest.raises(ValueError, match=f"no {TRACKER_FILENAME}"):  # without a tracker too
        ownership.check_ownership(tmp_path, "run-b")


def test_the_lineage_is_inherited_from_load_and_fresh_otherwise(tmp_path):
    _fake_checkpoint(tmp_path, 8, "run-a")
    write_tracker(tmp_path, 8)
    assert ownership.planned_lineage(tmp_path, False, None) == "run-a"
    assert ownership.planned_lineage(tmp_path, False, "slurm:5") == "run-a"
    assert ownership.planned_lineage(tmp_path, True, "slurm:5") == "slurm:5"  # --finetune: a new run
    assert ownership.planned_lineage(None, False, "slurm:5") == "slurm:5"
    fresh = ownership.planned_lineage(None, False, None)
    assert fresh.startswith("run-") and fresh != ownership.planned_lineage(None, False, None)


def test_load_with_checkpoints_but_no_tracker_is_refused_listing_them(tmp_path):
    _fake_checkpoint(tmp_path, 4, "slurm:5")
    _fake_checkpoint(tmp_path, 8, None)
    with pytest.raises(ValueError) as refused:
        ownership.planned_lineage(tmp_path, False, "slurm:6")
    message = str(refused.value)
    for part in ("iter_0000008", "iter_0000004", "lineage slurm:5", "echo 8 >", TRACKER_FILENAME):
        assert part in message, message
    assert ownership.untracked_checkpoints(tmp_path / "empty", None) == []


def test_untracked_checkpoints_of_this_job_are_resumed(tmp_path):
    # the job's first round died between its first checkpoint's rename and the tracker update
    _fake_checkpoint(tmp_path, 4, "slurm:5")
    assert ownership.untracked_checkpoints(tmp_path, "slurm:5") == [tmp_path / "iter_0000004"]
    assert ownership.planned_lineage(tmp_path, False, "slurm:5") == "slurm:5"


def test_keep_last_k_deletes_only_its_own_lineage_and_never_a_protected_one(tmp_path):
    for iteration, lineage in ((2, "mine"), (4, "other"), (6, "mine"), (8, "mine"), (10, "mine")):
        _fake_checkpoint(tmp_path, iteration, lineage)
    owns = lambda path: ownership.read_lineage(path) == "mine"  # noqa: E731
    delete_old(tmp_path, 12, 2, owns=owns, protect={6})
    left = sorted(path.name for path in tmp_path.iterdir())
    # k=2 with iteration 12 just saved keeps 10; 8 and 2 go; 6 is protected; 4 is another run's
    assert left == ["iter_0000004", "iter_0000006", "iter_0000010"]


# ---------------------------------------------------------------------------------------------- saving
def _checkpointer(faults: str | None = None, **kwargs) -> tuple[Checkpointer, tuple]:
    state, model, optimizer, scheduler = build()
    plan = FaultPlan(parse_faults(faults)) if faults else FaultPlan()
    return Checkpointer(state, faults=plan, **kwargs), (model, optimizer, scheduler)


def _save(checkpointer: Checkpointer, root: Path, iteration: int, objects) -> Path:
    model, optimizer, scheduler = objects
    return checkpointer.save(
        root, iteration, model, optimizer, scheduler, None, consumed_samples=4 * iteration, config={}
    )


def test_claim_records_the_lineage_and_refuses_another_runs_save(tmp_path):
    first, objects = _checkpointer()
    first.claim(tmp_path, load_dir=None)
    assert (tmp_path / LOCK_FILENAME).is_file()
    _save(first, tmp_path, 2, objects)
    lineage = json.loads((tmp_path / "iter_0000002" / "common.json").read_text())["lineage"]
    assert lineage == first.lineage and lineage.startswith("run-")
    first.release()
    assert not (tmp_path / LOCK_FILENAME).exists()

    second, objects = _checkpointer()
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        second.claim(tmp_path, load_dir=None)
    assert not (tmp_path / LOCK_FILENAME).exists()  # released again after the refusal
    second.claim(tmp_path, load_dir=tmp_path)  # resuming it: its lineage
    assert second.lineage == lineage
    second.release()

    third, objects = _checkpointer()
    third.claim(tmp_path, load_dir=None, overwrite=True)
    _save(
        third, tmp_path, 2, objects
    )  # replaces another run's iteration 2: allowed by --overwrite-checkpoints
    assert json.loads((tmp_path / "iter_0000002" / "common.json").read_text())["lineage"] == third.lineage
    third.release()


def test_a_restart_before_the_first_tracker_update_resumes_its_own_untracked_checkpoint(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    first, objects = _checkpointer()
    first.claim(tmp_path, load_dir=tmp_path)
    _save(first, tmp_path, 2, objects)
    first.release()
    (tmp_path / TRACKER_FILENAME).unlink()  # the round died between the rename and the tracker update

    restarted, (model, optimizer, scheduler) = _checkpointer()  # the same job's next round
    restarted.claim(tmp_path, load_dir=tmp_path)
    loaded = restarted.load(tmp_path, model, optimizer, scheduler, None)
    assert loaded.iteration == 2 and restarted.lineage == "torchrun:job-1"
    restarted.release()

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job: refused, listing what is there
    other, (model, optimizer, scheduler) = _checkpointer()
    with pytest.raises(
        ValueError, match="holds checkpoints but no latest_checkpointed_iteration.txt: iter_0000002"
    ):
        other.load(tmp_path, model, optimizer, scheduler, None)


def test_a_same_iteration_directory_of_another_run_is_never_replaced(tmp_path):
    _fake_checkpoint(tmp_path, 2, "someone-else")
    checkpointer, objects = _checkpointer()
    checkpointer.claim(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="holds a checkpoint of another run"):
        _save(checkpointer, tmp_path, 2, objects)
    assert json.loads((tmp_path / "iter_0000002" / "common.json").read_text())["lineage"] == "someone-else"
    assert not [path for path in tmp_path.iterdir() if ".tmp-" in path.name]
    checkpointer.release()


@pytest.mark.parametrize("async_save", [False, True])
def test_an_enospc_save_names_the_cause_and_keeps_the_previous_checkpoint(tmp_path, async_save):
    checkpointer, objects = _checkpointer("enospc:iter=4", async_save=async_save)
    _save(checkpointer, tmp_path, 2, objects)
    checkpointer.wait()
    with pytest.raises(CheckpointError) as failed:
        _save(checkpointer, tmp_path, 4, objects)
        checkpointer.wait()  # with --async-save the failure surfaces here
    message = str(failed.value)
    assert "No space left on device (ENOSPC) while writing" in message, message
    assert "bytes free on the file system of --save" in message, message
    assert checkpointer.failed_iteration == 4
    assert (tmp_path / TRACKER_FILENAME).read_text() == "2"
    verify_checkpoint(tmp_path / "iter_0000002")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_0000002", TRACKER_FILENAME]
    _save(checkpointer, tmp_path, 6, objects)  # the next save works again
    checkpointer.wait()
    assert (tmp_path / TRACKER_FILENAME).read_text() == "6"


def test_storage_failures_are_named(tmp_path, monkeypatch):
    eio = OSError(errno.EIO, os.strerror(errno.EIO), str(tmp_path / "x.distcp"))
    named = storage_failure(eio, tmp_path)
    assert named.startswith(f"Input/output error (EIO) while writing {tmp_path / 'x.distcp'}: ")
    # DCP hands other ranks' failures over as a dict of (exception, traceback)
    wrapped = RuntimeError("CheckpointException ranks:dict_keys([1])")
    wrapped.failures = {1: (OSError(errno.ENOSPC, "No space left on device"), None)}
    assert storage_failure(wrapped, tmp_path).startswith(
        "rank 1: No space left on device (ENOSPC) while writing"
    )
    short = RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 704 vs 598")
    monkeypatch.setattr("megatron.checkpoint.files.free_bytes", lambda path: 4096)
    assert storage_failure(short, tmp_path).startswith("No space left on device (ENOSPC: a short write")
    monkeypatch.setattr("megatron.checkpoint.files.free_bytes", lambda path: 10 << 30)
    assert "a short write" in storage_failure(
        short, tmp_path
    ) and "10,737,418,240 bytes free" in storage_failure(short, tmp_path)
    assert storage_failure(ValueError("shape mismatch"), tmp_path) is None


def test_the_save_failure_policy(tmp_path):
    from megatron.training.saving import SaveFailedError, save_failed

    write_tracker(tmp_path, 4)

    def run(policy: str):
        checkpoint = SimpleNamespace(save=str(tmp_path), save_interval=4, on_save_failure=policy)
        return SimpleNamespace(
            cfg=SimpleNamespace(checkpoint=checkpoint), state=SimpleNamespace(iteration=8), train_iters=20
        )

    error = CheckpointError("saving iteration 8 failed: No space left on device (ENOSPC)")
    save_failed(run("continue"), error, final=False)  # logged, training goes on
    with pytest.raises(SaveFailedError, match=r"ENOSPC.*iter_0000004, is intact.*--on-save-failure stop"):
        save_failed(run("stop"), error, final=False)
    with pytest.raises(SaveFailedError, match="the final checkpoint could not be saved"):
        save_failed(run("continue"), error, final=True)


# ---------------------------------------------------------------------------------------------- single files
def test_single_file_checkpoints_have_their_record_crcs_checked(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    values = torch.arange(4096, dtype=torch.float32)
    torch.save({"model": {"w": values}}, path)
    verify_torch_file(path)
    data = bytearray(path.read_bytes())
    data[data.find(values.numpy().tobytes()[:256]) + 1000] ^= 0x40
    path.write_bytes(data)
    with pytest.raises(ValueError, match=rf"{path}: .*CRC-32 for file '.*data/0'"):
        verify_torch_file(path)
