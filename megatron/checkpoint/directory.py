"""Megatron's checkpoint directory layout, shared by the sharded and the single-file formats.

```
latest_checkpointed_iteration.txt     the tracker: "1000" (or "release"), replaced atomically
iter_0001000/                         one directory per saved iteration (or release/)
```
What a load returns (`LoadedCheckpoint`) is the same for both formats. See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
_ITERATION_DIR = re.compile(r"^iter_(\d+)$")


def checkpoint_dir(root: str | os.PathLike, iteration: int | str) -> Path:
    """`root/iter_XXXXXXX` (or `root/release`)."""
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    return Path(root) / name


def read_tracker(path) -> int | str | None:
    """The iteration named by `path/latest_checkpointed_iteration.txt`; None when there is none."""
    tracker = Path(path) / TRACKER_FILENAME
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return "release"
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
    return int(text)


def find_checkpoints(root) -> list[tuple[int, Path]]:
    """(iteration, directory) of every `iter_XXXXXXX` directory under `root`, complete or not, newest
    first (temporary directories of unfinished saves are not listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _ITERATION_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, key=lambda item: item[0], reverse=True)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tracker(root: Path, iteration: int | str) -> None:
    """Replace the tracker atomically (written beside it, fsynced, renamed, directory fsynced): a crash
    never leaves it naming a checkpoint that is not complete."""
    tracker = root / TRACKER_FILENAME
    tmp = root / f".{TRACKER_FILENAME}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tracker)
    fsync_dir(root)


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` to `final`; an existing `final` (the same iteration saved again) is moved
    aside first and deleted after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    """Where a loaded checkpoint puts the run: the iteration and samples to continue from."""

    iteration: int
    consumed_samples: int
    directory: Path
    extra: dict
