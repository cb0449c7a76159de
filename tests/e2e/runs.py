"""What the end-to-end tests share: a clean environment to launch `megatron.pretrain` (or a script or
launcher around it) in, running it, and the loss sequence of a run's metrics file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What an outer launcher (torchrun, an enclosing SLURM job, megatron.launch, a recipe's knobs) may have
# left in the test's own environment; none of it may leak into the runs a test starts.
LAUNCHER_VARIABLES = (
    *("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"),
    *("MEGATRON_LAUNCHER", "MEGATRON_CHECKPOINT_FAULT", "LAUNCHER", "DRY_RUN"),
)


def launch_env(**extra: str) -> dict:
    """os.environ with the repository on PYTHONPATH, this interpreter as PYTHON (for the example scripts),
    one thread per process, no launcher variables or SLURM_*; then `extra`."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, PYTHON=sys.executable)
    for name in list(env):
        if name in LAUNCHER_VARIABLES or name.startswith("SLURM_"):
            del env[name]
    env.update(extra)
    return env


def run_pretrain(
    args: list[str], env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m megatron.pretrain ARGS` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "megatron.pretrain", *args],
        cwd=REPO_ROOT,
        env=launch_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_losses(path: Path) -> tuple[list[float], list[float]]:
    """(training lm losses, validation lm losses) in the order a `--metrics-jsonl` file logged them."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    train = [r["lm_loss"] for r in records if "lm_loss" in r]
    valid = [r["valid_lm_loss"] for r in records if "valid_lm_loss" in r]
    return train, valid
