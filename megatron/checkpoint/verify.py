"""Integrity of a sharded checkpoint: every file the manifest lists, checked for presence, size and
checksum (CRC32; BLAKE2b in checkpoints written before), split across ranks when several verify together
and hashed in parallel threads, and `common.json`, read with its format checked. A load checks the data
files' checksums as it reads them (`data_problems`). See docs/checkpoints.md.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from megatron.checkpoint.files import (
    COMMON_FILENAME,
    DATA_SUFFIX,
    FORMAT,
    MANIFEST_FILENAME,
    METADATA_FILENAME,
    problems_of,
)
from megatron.log import progress_bar
from megatron.parallel import collectives
from megatron.parallel.state import ParallelState


def _read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(the manifest's file table, None) or (None, the problem)."""
    path = directory / MANIFEST_FILENAME
    if not directory.is_dir():
        return None, f"{directory}: does not exist"
    if not path.is_file():
        return None, f"{path}: missing (an incomplete save: the manifest is written last)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable manifest ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(entry, dict) for entry in files.values()):
        return None, f"{path}: unreadable manifest (no table of files)"
    if manifest.get("format") != FORMAT:
        return None, f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}"
    for required in (METADATA_FILENAME, COMMON_FILENAME):
        if required not in files:
            return None, f"{path}: does not list {required}"
    return files, None


def verification_problems(
    directory: Path, rank: int, world_size: int, all_gather, *, data_checksums: bool = True, progress=None
) -> list[str]:
    """Every problem with `directory`, the same sorted list on every rank; the files are checked by rank
    `index % world_size`. `all_gather(obj)` returns every rank's object (collective). With
    `data_checksums=False` the data files are checked for presence and size only (`data_problems`
    checks their checksums after a load has read them). `progress(nbytes)`: see `problems_of`."""
    files, problem = _read_manifest(directory)
    local = [problem] if problem and rank == 0 else []
    if files is not None:
        checks = []
        for index, relative in enumerate(sorted(files)):
            if index % world_size == rank:
                checksum = data_checksums or not relative.endswith(DATA_SUFFIX)
                checks.append((directory / relative, files[relative], checksum))
        local += problems_of(checks, progress)
    return sorted(problem for problems in all_gather(local) for problem in problems)


def data_problems(
    directory: Path, rank: int, world_size: int, all_gather, read: dict[str, dict]
) -> list[str]:
    """The data files' checksums after a load (collective; the same sorted list on every rank). `read`:
    the entries this rank computed for the files it read whole (`dcp_streams.checksummed_reads`); the
    data files no rank read whole are hashed now, split across ranks."""
    files, problem = _read_manifest(directory)
    if files is None:
        return [problem]
    local, covered = [], []
    for relative, entry in sorted(read.items()):
        expected = files.get(relative, {})
        if "crc32" not in expected:  # not listed, or an older checkpoint's BLAKE2b: hashed below
            continue
        covered.append(relative)
        if entry["bytes"] != expected.get("bytes") or entry["crc32"] != expected["crc32"]:
            local.append(f"{directory / relative}: CRC32 hash differs from {MANIFEST_FILENAME} (corrupt)")
    gathered = all_gather((covered, local))
    done = {relative for names, _ in gathered for relative in names}
    rest = sorted(r for r in files if r.endswith(DATA_SUFFIX) and r not in done)
    local = problems_of(
        [(directory / r, files[r], True) for i, r in enumerate(rest) if i % world_size == rank]
    )
    found = {p for _, problems in gathered for p in problems} | {p for ps in all_gather(local) for p in ps}
    return sorted(found)


def verify_checkpoint(directory, parallel_state: ParallelState | None = None, *, progress=None) -> None:
    """Check a checkpoint directory against its manifest: ValueError naming the file and the problem
    (missing, size, hash, missing .metadata or manifest). With a multi-rank `parallel_state` every rank
    must call it; the hashing is split across ranks and every rank gets the same verdict.
    `progress(nbytes)` is called as each file is checked (one process only: a tool's progress bar)."""
    directory = Path(directory)
    if parallel_state is None or parallel_state.world_size == 1:
        problems = verification_problems(directory, 0, 1, lambda obj: [obj], progress=progress)
    else:
        group = parallel_state.world_group
        problems = verification_problems(
            directory, group.rank, group.size, lambda obj: collectives.all_gather_object(obj, group)
        )
    if problems:
        raise ValueError(f"checkpoint {directory} failed verification: " + "; ".join(problems))


def verify_with_progress(directory, *, enabled: bool | None = None, desc: str = "verifying") -> None:
    """`verify_checkpoint` in one process with a progress bar over the manifest's bytes (for tools;
    `enabled`: see `megatron.log.progress_bar`)."""
    files, _ = _read_manifest(Path(directory))
    total = sum(entry.get("bytes") or 0 for entry in files.values()) if files else None
    lock = threading.Lock()  # files are hashed in parallel threads
    with progress_bar(total=total, desc=desc, unit="B", enabled=enabled) as bar:

        def advance(nbytes: int) -> None:
            with lock:
                bar.update(nbytes)

        verify_checkpoint(directory, progress=advance)


def read_common(directory) -> dict:
    """common.json of a checkpoint: format, iteration, consumed_samples, extra, scheduler, grad_scaler,
    config, layout. ValueError when it is missing, unreadable or of another format."""
    path = Path(directory) / COMMON_FILENAME
    try:
        common = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except ValueError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from None
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        found = common.get("format") if isinstance(common, dict) else None
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return common
