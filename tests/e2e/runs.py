"""What the end-to-end tests share: a clean environment to launch `megatron.pretrain` (or a script or
launcher around it) in, the arguments of a tiny run, running it, and the loss sequence of a run's metrics
file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# What an outer launcher (torchrun, an enclosing SLURM job, megatron.launch, a recipe's knobs) may have
# left in the test's own environment; none of it may leak into the runs a test starts.
LAUNCHER_VARIABLES = (
    *("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"),
    *("MEGATRON_LAUNCHER", "MEGATRON_CHECKPOINT_FAULT", "MEGATRON_FAULTS", "LAUNCHER", "DRY_RUN"),
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


# The model and training of the single-process CLI runs that spell their flags out (no preset): MQA over 64
# tokens in fp32, FIM on, a 95/5 train/validation split. Each test adds its length, cadence and extras.
TINY_RUN_FLAGS = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
    "--seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine "
    "--weight-decay 0.1 --clip-grad 1.0 --fp32 --seed 1234 "
    "--split 95,5,0 --tokenizer-type TokenizerFromFile --fim-rate 0.5 --num-workers 1"
)


def pretrain_args(
    run_dir: Path,
    dataset: str,
    tokenizer: Path | str,
    *flags: str,
    metrics: str | None = None,
    save: bool = False,
    load: bool = False,
) -> list[str]:
    """The arguments of a `megatron.pretrain` run that writes under `run_dir`: `flags` (each a string of
    whitespace-separated arguments, e.g. "--config tiny-cpu" or TINY_RUN_FLAGS), then `dataset` (a data
    prefix), the tokenizer file and the index cache run_dir/cache; with `metrics`, the metrics file
    run_dir/METRICS.jsonl; with `save` / `load`, --save / --load run_dir/ckpt."""
    args = [arg for text in flags for arg in text.split()]
    args += ["--data-path", dataset, "--tokenizer-file", str(tokenizer)]
    args += ["--data-cache-path", str(run_dir / "cache")]
    if metrics is not None:
        args += ["--metrics-jsonl", str(run_dir / f"{metrics}.jsonl")]
    if save:
        args += ["--save", str(run_dir / "ckpt")]
    if load:
        args += ["--load", str(run_dir / "ckpt")]
    return args


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
    """(training lm losses, validation lm losses) in the order a `--metrics-jsonl` file logged them, read
    as one run: after a restart's start marker, the re-run iterations' records replace the earlier ones
    (`megatron.training.metrics.read_metrics`)."""
    from megatron.training.metrics import read_metrics

    records = read_metrics(path)
    train = [r["lm_loss"] for r in records if "lm_loss" in r]
    valid = [r["valid_lm_loss"] for r in records if "valid_lm_loss" in r]
    return train, valid
