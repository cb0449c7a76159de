"""Integrity of a sharded checkpoint: every file the manifest lists, checked for presence, size and BLAKE2b
hash (split across ranks when several verify together), and `common.json`, read with its format checked.
See docs/checkpoints.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron.checkpoint.files import (
    COMMON_FILENAME,
    FORMAT,
    MANIFEST_FILENAME,
    METADATA_FILENAME,
    file_entry,
)
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


def _file_problem(directory: Path, relative: str, expected: dict) -> str | None:
    path = directory / relative
    if not path.is_file():
        return f"{path}: missing (listed in {MANIFEST_FILENAME})"
    size = path.stat().st_size
    if size != expected.get("bytes"):
        return f"{path}: {size} bytes, {MANIFEST_FILENAME} records {expected.get('bytes')} (truncated or overwritten)"
    if file_entry(path)["blake2b"] != expected.get("blake2b"):
        return f"{path}: BLAKE2b hash differs from {MANIFEST_FILENAME} (corrupt)"
    return None


def verification_problems(directory: Path, rank: int, world_size: int, all_gather) -> list[str]:
    """Every problem with `directory`, the same sorted list on every rank; the files are hashed by
    rank `index % world_size`. `all_gather(obj)` returns every rank's object (collective)."""
    files, problem = _read_manifest(directory)
    local = [problem] if problem and rank == 0 else []
    if files is not None:
        for index, relative in enumerate(sorted(files)):
            if index % world_size == rank:
                found = _file_problem(directory, relative, files[relative])
                local += [found] if found else []
    return sorted(problem for problems in all_gather(local) for problem in problems)


def verify_checkpoint(directory, parallel_state: ParallelState | None = None) -> None:
    """Check a checkpoint directory against its manifest: ValueError naming the file and the problem
    (missing, size, hash, missing .metadata or manifest). With a multi-rank `parallel_state` every rank
    must call it; the hashing is split across ranks and every rank gets the same verdict."""
    directory = Path(directory)
    if parallel_state is None or parallel_state.world_size == 1:
        problems = verification_problems(directory, 0, 1, lambda obj: [obj])
    else:
        group = parallel_state.world_group
        problems = verification_problems(
            directory, group.rank, group.size, lambda obj: collectives.all_gather_object(obj, group)
        )
    if problems:
        raise ValueError(f"checkpoint {directory} failed verification: " + "; ".join(problems))


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
