"""The files of a sharded checkpoint directory: their names, durable writes, manifest entries, and the
housekeeping around the iteration directories (atomic replace, leftovers of interrupted saves,
keep-last-k). See docs/checkpoints.md for the layout.

Fault injection for the kill tests: MEGATRON_CHECKPOINT_FAULT=before_rename|before_tracker makes rank 0
SIGKILL itself after the manifest is written and before the rename, or after the rename and before the
tracker update.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path

from megatron.checkpoint.directory import TRACKER_FILENAME, find_checkpoints
from megatron.log import get_logger

logger = get_logger(__name__)

FORMAT = "megatron-starcoder-dcp/1"
COMMON_FILENAME = "common.json"
MANIFEST_FILENAME = "manifest.json"
METADATA_FILENAME = ".metadata"
RNG_DIRNAME = "rng"
FAULT_ENV = "MEGATRON_CHECKPOINT_FAULT"
FAULT_POINTS = ("before_rename", "before_tracker")
MOMENTS = ("exp_avg", "exp_avg_sq")
_HASH_CHUNK_BYTES = 8 << 20
_LEFTOVER = re.compile(r"^\.(iter_\d+|release)\.(tmp|old|deleting)-[0-9a-f]+$")


def rng_json_name(rank: int) -> str:
    """The file (relative to the checkpoint directory) of one rank's python and numpy generator states."""
    return f"{RNG_DIRNAME}/rank_{rank:05d}.json"


def rng_key(rank: int, what: str) -> str:
    """The DCP key of one rank's generator state tensor `what` (torch, cuda, tracker_cpu, tracker_cuda)."""
    return f"rng/rank_{rank:05d}/{what}"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(obj, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def file_entry(path: Path) -> dict:
    """{"bytes": size, "blake2b": hex digest} of one file."""
    digest = hashlib.blake2b()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "blake2b": digest.hexdigest()}


def relative_files(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file())


def fault(point: str) -> None:
    """MEGATRON_CHECKPOINT_FAULT: die here, as a crash would (kill tests)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(root: Path) -> None:
    """Temporary directories of saves a crash interrupted (only one save runs at a time)."""
    for path in root.iterdir():
        if _LEFTOVER.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{TRACKER_FILENAME}.tmp-"):
            path.unlink(missing_ok=True)


def delete_old(root: Path, just_saved: int, keep_last_k: int) -> None:
    """Keep the `keep_last_k` newest complete checkpoints up to the one just saved; delete older complete
    ones (renamed away first, so a crash never leaves a half-deleted `iter_*`)."""
    older = [
        (iteration, path)
        for iteration, path in find_checkpoints(root)
        if iteration < just_saved and (path / MANIFEST_FILENAME).is_file()
    ]
    for _, path in older[keep_last_k - 1 :]:
        doomed = path.with_name(f".{path.name}.deleting-{secrets.token_hex(4)}")
        try:
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            logger.info(f"> removed checkpoint {path} (--keep-last-k {keep_last_k})")
        except OSError as exc:
            logger.info(f"WARNING: could not remove old checkpoint {path}: {exc}")
