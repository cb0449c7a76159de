"""The files of a sharded checkpoint directory: their names, durable writes, manifest entries, and the
housekeeping around the iteration directories (atomic replace, leftovers of interrupted saves,
keep-last-k). See docs/checkpoints.md for the layout.

Fault injection for the kill tests: MEGATRON_CHECKPOINT_FAULT=before_rename|before_tracker makes rank 0
SIGKILL itself after the manifest is written and before the rename, or after the rename and before the
tracker update.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatron.checkpoint.directory import TRACKER_FILENAME, find_checkpoints
from megatron.log import get_logger

try:  # zlib-ng's CRC32: the same checksum as zlib's (same values), about 5x faster; releases the GIL
    from zlib_ng.zlib_ng import crc32
except ImportError:  # the standard library's (about 4 GB/s per core)
    from zlib import crc32

logger = get_logger(__name__)

FORMAT = "megatron-starcoder-dcp/1"
COMMON_FILENAME = "common.json"
MANIFEST_FILENAME = "manifest.json"
METADATA_FILENAME = ".metadata"
RNG_DIRNAME = "rng"
FAULT_ENV = "MEGATRON_CHECKPOINT_FAULT"
FAULT_POINTS = ("before_rename", "before_tracker")
MOMENTS = ("exp_avg", "exp_avg_sq")
DATA_SUFFIX = ".distcp"
# manifest entries: {"bytes": N, "crc32": "<8 hex>"}; checkpoints written before CRC32 have "blake2b"
CHECKSUMS = {"crc32": "CRC32", "blake2b": "BLAKE2b"}
_HASH_CHUNK_BYTES = 8 << 20
_VERIFY_THREADS = 4
# what a failed save is reported as by name: a full disk or quota, an I/O error, a read-only file system
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")
_SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+")  # torch's zip writer after a short write
_LOW_FREE_BYTES = 1 << 20
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


def file_entry(path: Path, algorithm: str = "crc32") -> dict:
    """{"bytes": size, algorithm: hex digest} of one file (`algorithm`: a key of CHECKSUMS)."""
    assert algorithm in CHECKSUMS, algorithm
    crc, digest, size = 0, hashlib.blake2b() if algorithm == "blake2b" else None, 0
    buffer = memoryview(bytearray(_HASH_CHUNK_BYTES))
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            chunk = buffer[:count]
            if digest is None:
                crc = crc32(chunk, crc)  # releases the GIL: files hash in parallel threads
            else:
                digest.update(chunk)
            size += count
    return {"bytes": size, algorithm: digest.hexdigest() if digest is not None else crc32_hex(crc)}


def crc32_hex(crc: int) -> str:
    return f"{crc:08x}"


def entry_problem(path: Path, expected: dict, checksum: bool = True) -> str | None:
    """What is wrong with one file against its manifest entry: presence, size and (when `checksum`) its
    CRC32 or BLAKE2b hash; None when nothing is."""
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST_FILENAME})"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{path}: {size} bytes, {MANIFEST_FILENAME} records {expected.get('bytes')} (truncated or overwritten)"
    if not checksum:
        return None
    algorithm = next((name for name in CHECKSUMS if name in expected), None)
    if algorithm is None:
        return f"{path}: {MANIFEST_FILENAME} records no checksum for it"
    if file_entry(path, algorithm)[algorithm] != expected[algorithm]:
        return f"{path}: {CHECKSUMS[algorithm]} hash differs from {MANIFEST_FILENAME} (corrupt)"
    return None


def problems_of(checks: list[tuple[Path, dict, bool]], progress=None) -> list[str]:
    """`entry_problem` of several (path, expected entry, checksum) checks, in parallel threads; the
    problems found. `progress(nbytes)`, when given, is called with each file's listed size once it is
    checked (a tool's progress bar)."""

    def check(item: tuple[Path, dict, bool]) -> str | None:
        problem = entry_problem(*item)
        if progress is not None:
            progress(item[1].get("bytes") or 0)
        return problem

    if len(checks) <= 1:
        found = [check(item) for item in checks]
    else:
        with ThreadPoolExecutor(min(_VERIFY_THREADS, len(checks))) as pool:
            found = list(pool.map(check, checks))
    return [problem for problem in found if problem]


class ChecksumWriter(io.BufferedWriter):
    """A file being written that computes its manifest entry from the bytes passing through (CRC32 and
    size), so a save never reads its files back to hash them. A large write is checksummed by a helper
    thread while this one hands the same bytes to the kernel (both release the GIL); the write returns
    when both are done, so no memory is read after the caller got it back."""

    _OVERLAP_BYTES = 1 << 20

    def __init__(self, path) -> None:
        super().__init__(io.FileIO(path, "wb"))
        self.crc, self.nbytes, self.seeked = 0, 0, False
        self._helper = ThreadPoolExecutor(1)

    def write(self, data) -> int:  # thousands of small writes per file: no context manager per call
        try:
            return self._write(data)
        except OSError as exc:
            self._raise_named(exc)
            raise

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as exc:
            self._raise_named(exc)
            raise

    def _raise_named(self, exc: OSError) -> None:
        """ENOSPC or EIO from the kernel names no file: raise it naming this one (the name survives DCP's
        pickling of a rank's failure to the others, where torch's wrapping of it would not); return
        when `exc` needs no name."""
        if exc.errno is not None and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(self.raw.name)) from exc

    def _write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.nbytes += view.nbytes
        if view.nbytes < self._OVERLAP_BYTES:
            self.crc = crc32(view, self.crc)
            return super().write(view)
        checksum = self._helper.submit(crc32, view, self.crc)
        try:
            return super().write(view)
        finally:
            self.crc = checksum.result()

    def seek(self, *args) -> int:  # a skipped region: no checksum from the stream (never done by DCP)
        self.seeked = True
        return super().seek(*args)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:
            self._raise_named(exc)
            raise
        finally:
            self._helper.shutdown()

    def entry(self) -> dict | None:
        """The manifest entry of what was written (None after a seek: hash the file instead)."""
        return None if self.seeked else {"bytes": self.nbytes, "crc32": crc32_hex(self.crc)}


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc`, its causes and contexts, and the per-rank failures DCP's CheckpointException carries."""
    seen: list[BaseException] = []
    stack: list = [exc]
    while stack:
        item = stack.pop()
        if not isinstance(item, BaseException) or any(item is other for other in seen):
            continue
        seen.append(item)
        failures = getattr(item, "failures", None)
        if isinstance(failures, dict):
            stack += [value[0] if isinstance(value, tuple) else value for value in failures.values()]
        stack += [item.__cause__, item.__context__]
    return seen


def free_bytes(path: Path) -> int | None:
    """Bytes available to this user on the file system of `path` (os.statvfs); None if unknown."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def storage_failure(exc: BaseException, root: Path) -> str | None:
    """A failed write's cause by name when it is the storage's: "No space left on device (ENOSPC) while
    writing FILE: N bytes free on the file system of --save ROOT" (also EDQUOT, EIO, EROFS, and torch's
    "unexpected pos" short write, whose cause the free space tells); None for any other failure. DCP's
    failure (every rank gets it) names the ranks it happened on: "rank 3: No space left ..."."""
    message = _storage_cause(_exception_chain(exc), root)
    failures = getattr(exc, "failures", None)
    if message is None or not isinstance(failures, dict) or not failures:
        return message
    ranks = sorted(failures)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {message}"


def _storage_cause(chain: list[BaseException], root: Path) -> str | None:
    free = free_bytes(root)
    where = (
        f"{free:,} bytes free on the file system of --save {root}" if free is not None else f"--save {root}"
    )
    named = []  # (errno, file name or None) of each storage error in the chain
    for item in chain:
        code = item.errno if isinstance(item, OSError) else None
        if code is None and (match := _ERRNO_TEXT.search(str(item))):
            code = int(match.group(1))
        if code in STORAGE_ERRNOS:
            named.append((code, getattr(item, "filename", None)))
    if named:
        code, filename = next((found for found in named if found[1]), named[0])
        target = filename or "the checkpoint"
        return f"{os.strerror(code)} ({errno.errorcode[code]}) while writing {target}: {where}"
    short = next((match.group(0) for item in chain if (match := _SHORT_WRITE.search(str(item)))), None)
    if short is None:
        return None
    if free is not None and free < _LOW_FREE_BYTES:
        return f"No space left on device (ENOSPC: a short write, torch's '{short}') while writing the checkpoint: {where}"
    return (
        f"a short write (torch's '{short}': the file system took fewer bytes than written; full, over quota "
        f"or failing) while writing the checkpoint: {where}"
    )


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


def delete_old(
    root: Path,
    just_saved: int,
    keep_last_k: int,
    *,
    owns=None,
    protect: frozenset[int] | set[int] = frozenset(),
) -> None:
    """Keep the `keep_last_k` newest complete checkpoints up to the one just saved; delete older complete
    ones (renamed away first, so a crash never leaves a half-deleted `iter_*`). Only those `owns(path)`
    accepts (this run's lineage; default every one) count and may go; the iterations in `protect` (the
    last checkpoint before a run of skipped steps) are never deleted and do not count among the k."""
    older = [
        (iteration, path)
        for iteration, path in find_checkpoints(root)
        if iteration < just_saved
        and iteration not in protect
        and (path / MANIFEST_FILENAME).is_file()
        and (owns is None or owns(path))
    ]
    for _, path in older[keep_last_k - 1 :]:
        doomed = path.with_name(f".{path.name}.deleting-{secrets.token_hex(4)}")
        try:
            os.replace(path, doomed)
            shutil.rmtree(doomed)
            logger.info(f"> removed checkpoint {path} (--keep-last-k {keep_last_k})")
        except OSError as exc:
            logger.info(f"WARNING: could not remove old checkpoint {path}: {exc}")


def verify_torch_file(path) -> None:
    """Check what a `torch.save` file carries (single-file and legacy checkpoints): the CRC32 of every
    zip record, which torch.load never checks. ValueError naming the file and the record when one
    differs. Records without a CRC (written with torch's compute_crc32 off) and the pre-zip format
    (torch < 1.6: nothing recorded) cannot be checked and pass."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 or info.is_dir():
                    continue
                crc = 0
                with archive.open(info) as record:
                    while chunk := record.read(8 << 20):
                        crc = crc32(chunk, crc)
                if crc != info.CRC:
                    raise ValueError(
                        f"{path}: record {info.filename} has CRC32 {crc:08x}, the file records "
                        f"{info.CRC:08x} (corrupt)"
                    )
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc}) (corrupt or truncated)") from None
