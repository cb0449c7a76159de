"""Checkpoint safety through the real CLI (`python -m megatron.pretrain`, CPU; one run under torchrun):

- a second run on a --save that a running run holds stops before training, naming the owner; a fresh run
  on a directory of another run's checkpoints (with or without its tracker) is refused unless
  --overwrite-checkpoints; no file under the other run's iter_* directories changes (hashed);
- a read-only --save fails before the process groups, naming the path and the errno;
- ENOSPC injected during a save (MEGATRON_FAULTS enospc, on one rank of two): named, the previous
  checkpoint intact and loadable, no temporary directory left, training continues or stops per
  --on-save-failure (with --async-save the failure surfaces at the next wait); and a real full tmpfs
  when the tests run as root (training continues to the final save, whose failure exits non-zero);
- one flipped byte in a data file: generate, convert_to_hf, checkpoint_util verify and training refuse
  the checkpoint, naming the file.

The pieces are tested one process at a time in tests/unit/test_checkpoint_safety.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron.parallel.testing import free_port
from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain
from tests.helpers import load_tool

pytestmark = pytest.mark.slow

TRACKER = "latest_checkpointed_iteration.txt"
LOCK = "megatron-run.lock"
FLAGS = (TINY_RUN_FLAGS, "--lr-warmup-iters 2 --log-interval 1 --eval-iters 0 --num-workers 0")
FIRST = "--train-iters 8 --save-interval 4"  # the other run: iter_0000004 and iter_0000008
TRAINING = "> training "  # the line every run prints when its training loop starts


def _output(result) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under the iter_* directories of `root`."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.glob("iter_*/**/*"))
        if path.is_file()
    }


def _leftovers(root: Path) -> list[str]:
    return [path.name for path in root.iterdir() if ".tmp-" in path.name]


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, tiny_dataset_prefix, tiny_tokenizer_path) -> Path:
    """A run directory whose ckpt/ holds another run's checkpoints of iterations 4 and 8 (copied by each
    test that changes it)."""
    root = tmp_path_factory.mktemp("other_run")
    args = pretrain_args(root, tiny_dataset_prefix, tiny_tokenizer_path, *FLAGS, FIRST, save=True, load=True)
    result = run_pretrain(args)
    assert result.returncode == 0, _output(result)
    assert (root / "ckpt" / TRACKER).read_text() == "8"
    return root


def _copy(other_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(other_run / "ckpt", tmp_path / "ckpt")
    shutil.copytree(other_run / "cache", tmp_path / "cache")
    return tmp_path / "ckpt"


def _args(tmp_path, dataset, tokenizer, *flags, save=True, load=True) -> list[str]:
    return pretrain_args(tmp_path, dataset, tokenizer, *FLAGS, *flags, save=save, load=load)


def test_another_run_is_refused_and_nothing_it_did_not_write_changes(
    tmp_path, other_run, tiny_dataset_prefix, tiny_tokenizer_path
):
    ckpt = _copy(other_run, tmp_path)
    before = _hashes(ckpt)
    fresh = _args(
        tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 4 --save-interval 4", load=False
    )

    # A fresh run (no --load) on a --save holding another run's checkpoints: refused before training.
    result = run_pretrain(fresh)
    assert result.returncode == 2, _output(result)
    assert "holds checkpoints of another run: iter_0000008, iter_0000004" in result.stderr, _output(result)
    assert "--overwrite-checkpoints" in result.stderr and TRAINING not in result.stdout

    # --load on that directory with its tracker gone: refused, listing what is there.
    (ckpt / TRACKER).rename(tmp_path / "tracker")
    resume = _args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 12 --save-interval 4")
    result = run_pretrain(resume)
    assert result.returncode == 2, _output(result)
    assert f"holds checkpoints but no {TRACKER}: iter_0000008" in result.stderr, _output(result)
    assert "iter_0000004" in result.stderr and TRAINING not in result.stdout
    (tmp_path / "tracker").rename(ckpt / TRACKER)
    assert _hashes(ckpt) == before and not (ckpt / LOCK).exists()

    # Told to overwrite, a fresh run replaces iteration 4 and moves the tracker; iteration 8 is left alone.
    result = run_pretrain([*fresh, "--overwrite-checkpoints"])
    assert result.returncode == 0, _output(result)
    assert (ckpt / TRACKER).read_text() == "4"
    lineage = {
        it: json.loads((ckpt / f"iter_{it:07d}" / "common.json").read_text())["lineage"] for it in (4, 8)
    }
    assert lineage[4] != lineage[8]
    assert {k: v for k, v in _hashes(ckpt).items() if k.startswith("iter_0000008")} == {
        k: v for k, v in before.items() if k.startswith("iter_0000008")
    }


def test_a_second_run_on_a_save_in_use_stops_before_training_naming_the_owner(
    tmp_path, other_run, tiny_dataset_prefix, tiny_tokenizer_path
):
    ckpt = _copy(other_run, tmp_path)
    resume = _args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 100000")
    log = tmp_path / "first.log"
    with open(log, "w") as output:
        first = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron.pretrain",
                *resume,
                "--metrics-jsonl",
                str(tmp_path / "m.jsonl"),
            ],
            cwd=REPO_ROOT,
            env=launch_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while TRAINING not in log.read_text():  # the first run holds the lock and trains
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run did not start training in time"
            time.sleep(0.2)
        lock = json.loads((ckpt / LOCK).read_text())
        assert lock["pid"] == first.pid and lock["run_id"] is None

        second = run_pretrain(resume)  # the natural "resume if there is something" command, again
    finally:
        first.terminate()  # SIGTERM: saves and exits
        first.wait(timeout=120)
    assert second.returncode == 2, _output(second)
    message = second.stderr
    assert f"--save {ckpt} is in use by another run" in message, _output(second)
    assert f"held by pid {first.pid} on host {lock['host']}" in message and "since " in message
    assert TRAINING not in second.stdout
    assert first.returncode == 0, log.read_text()[-3000:]
    assert not (ckpt / LOCK).exists()  # released at exit


def _read_only_dir(tmp_path: Path) -> tuple[Path, str, callable]:
    """A read-only directory (a read-only tmpfs as root, where permissions do not bind; else mode 0555),
    the errno name expected, and the cleanup."""
    target = tmp_path / "read_only"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        return target, "EACCES", lambda: target.chmod(0o755)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    return target, "EROFS", lambda: subprocess.run(["umount", str(target)], check=False)


def test_a_read_only_save_fails_before_the_process_groups(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    target, errno_name, cleanup = _read_only_dir(tmp_path)
    try:
        args = _args(
            tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 4", save=False, load=False
        )
        result = run_pretrain([*args, "--save", str(target / "ckpt")])
    finally:
        cleanup()
    assert result.returncode == 2, _output(result)
    assert f"--save {target / 'ckpt'} is not writable" in result.stderr and f"({errno_name})" in result.stderr
    assert "> parallel layout" not in result.stdout and "> tokenizer" not in result.stdout  # no run was built


def test_enospc_on_one_rank_of_two_is_named_and_training_continues(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron.pretrain"]
    args = _args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FIRST, "--tensor-model-parallel-size 2")
    result = subprocess.run(
        [*torchrun, *args, "--distributed-backend", "gloo"],
        cwd=REPO_ROOT,
        env=launch_env(MEGATRON_FAULTS="enospc:rank=1,iter=4"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, _output(result)
    ckpt = tmp_path / "ckpt"
    warning = next((line for line in result.stdout.splitlines() if "saving iteration 4" in line), "")
    assert warning.startswith("WARNING: saving iteration 4 to"), _output(result)
    assert "rank 1: No space left on device (ENOSPC) while writing" in warning and "bytes free" in warning
    assert (
        "Training continues (--on-save-failure continue); the next save attempt is at the final save"
        in warning
    )
    assert (ckpt / TRACKER).read_text() == "8" and not (ckpt / "iter_0000004").exists()
    assert not _leftovers(ckpt)
    from megatron.checkpoint import verify_checkpoint

    verify_checkpoint(ckpt / "iter_0000008")


def test_enospc_with_async_save_and_stop_exits_with_the_previous_checkpoint_intact(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path
):
    from megatron.checkpoint import load_full_state

    args = _args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 10 --save-interval 4")
    result = run_pretrain(
        [*args, "--async-save", "--on-save-failure", "stop"], launch_env(MEGATRON_FAULTS="enospc:iter=8")
    )
    assert result.returncode == 1, _output(result)
    assert "No space left on device (ENOSPC) while writing" in result.stderr, _output(result)
    assert "Stopping (--on-save-failure stop)" in result.stderr
    ckpt = tmp_path / "ckpt"
    assert (ckpt / TRACKER).read_text() == "4" and not _leftovers(ckpt)
    assert sorted(path.name for path in ckpt.glob("iter_*")) == ["iter_0000004"]
    assert load_full_state(ckpt / "iter_0000004")  # verified and readable
    assert "training done" not in result.stdout


def test_a_real_full_file_system(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small_disk"
    disk.mkdir()
    # one checkpoint of the tiny model (~2.1 MB) fits, a second one beside it does not
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        args = _args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, FIRST, save=False, load=False)
        args += ["--save", str(disk / "ckpt"), "--metrics-jsonl", str(tmp_path / "metrics.jsonl")]
        result = run_pretrain(args)  # --on-save-failure continue: on to the final save, which fails too
        assert result.returncode == 1, _output(result)
        warning = next((line for line in result.stdout.splitlines() if "saving iteration 8" in line), "")
        assert warning.startswith("WARNING: saving iteration 8"), _output(result)
        assert "No space left on device (ENOSPC) while writing" in warning and "Training continues" in warning
        assert "0 bytes free on the file system of --save" in warning
        assert "Stopping (the final checkpoint could not be saved)" in result.stderr, _output(result)
        assert (disk / "ckpt" / TRACKER).read_text() == "4" and not _leftovers(disk / "ckpt")
        shutil.copytree(disk / "ckpt" / "iter_0000004", tmp_path / "iter_0000004")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    from megatron.checkpoint import load_full_state

    assert load_full_state(tmp_path / "iter_0000004")


def test_every_reader_refuses_a_flipped_byte_naming_the_file(
    tmp_path, other_run, tiny_dataset_prefix, tiny_tokenizer_path, capsys
):
    ckpt = _copy(other_run, tmp_path)
    damaged = ckpt / "iter_0000008" / "__0_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x40
    damaged.write_bytes(data)
    named = f"{damaged}: CRC32 hash differs from manifest.json (corrupt)"

    generate = load_tool("generate").main(
        ["--load", str(ckpt), "--prompt", "def f(", "--max-new-tokens", "2"]
    )
    assert generate != 0 and named in capsys.readouterr().err
    convert = load_tool("convert_to_hf").main(["--load", str(ckpt), "--save", str(tmp_path / "hf")])
    assert convert != 0 and named in capsys.readouterr().err and not (tmp_path / "hf").exists()
    verify = load_tool("checkpoint_util").main(["verify", str(ckpt)])
    assert verify == 1 and named in capsys.readouterr().out

    # training refuses it too, naming the file, and resumes from the newest checkpoint that verifies
    result = run_pretrain(_args(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 9"))
    assert result.returncode == 0, _output(result)
    assert f"is not usable: {named}" in result.stdout, _output(result)
    assert "loaded checkpoint" in result.stdout and f"{ckpt / 'iter_0000004'}: iteration 4" in result.stdout


def _claim(save_dir: str) -> tuple[int, str]:
    """One of two gloo ranks: claim `save_dir` (rank 0 takes the lock and broadcasts the outcome); this
    rank's pid and the outcome, the same on every rank."""
    from megatron.checkpoint import Checkpointer
    from megatron.parallel.state import ParallelState

    state = ParallelState.initialize(1, 1, backend="gloo")
    checkpointer = Checkpointer(state)
    try:
        checkpointer.claim(save_dir)
    except ValueError as error:
        return os.getpid(), f"refused: {error}"
    outcome = f"claimed as lineage {checkpointer.lineage}"
    checkpointer.release()
    return os.getpid(), outcome


def test_rank_0_claims_after_the_groups_exist_and_every_rank_gets_its_verdict(tmp_path):
    from megatron.checkpoint.ownership import LockInfo
    from megatron.parallel.testing import run_distributed

    save = tmp_path / "ckpt"
    save.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        holder = LockInfo(socket.gethostname(), sleeper.pid, None, "slurm:31337", time.time(), "theirs")
        (save / LOCK).write_text(holder.to_json())
        refused = run_distributed(_claim, 2, str(save), timeout=180)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert refused[0][1] == refused[1][1] and refused[0][1].startswith(f"refused: --save {save} is in use")
    assert f"pid {sleeper.pid}" in refused[0][1] and "slurm:31337" in refused[0][1]
    assert json.loads((save / LOCK).read_text())["token"] == "theirs"  # left as it was

    (save / LOCK).unlink()
    claimed = run_distributed(_claim, 2, str(save), timeout=180)
    assert claimed[0][1] == claimed[1][1] and claimed[0][1].startswith("claimed as lineage ")
    assert not (save / LOCK).exists()  # released
