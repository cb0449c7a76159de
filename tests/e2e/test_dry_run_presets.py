"""Every preset in configs/ dry-runs on a laptop: `python -m megatron.pretrain --config NAME --dry-run`
with no launch environment (no WORLD_SIZE), no data and no tokenizer, exits 0 and states the layout and
vocabulary it assumed and how to change them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from megatron.config.presets import preset_names
from tests.e2e.runs import REPO_ROOT, launch_env


def _pretrain(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron.pretrain", *args],
        cwd=REPO_ROOT, env=launch_env(**env), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_every_preset_is_tested():
    assert set(preset_names()) >= {"starcoderbase-15b", "starcoderbase-1b", "santacoder-1b", "tiny-cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("preset", preset_names())
def test_preset_dry_runs_without_a_launch(preset):
    result = _pretrain("--config", preset, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    header = re.search(r"TP (\d+) x PP (\d+) x DP (\d+)", out)
    assert out.startswith("dry run: ") and header, out
    tp, pp, dp = map(int, header.groups())
    assert dp == 1  # no preset records a data-parallel size: the smallest is planned
    assert f"world size {tp * pp} = TP {tp} x PP {pp} x DP 1, assumed" in out
    assert "--data-parallel-size N or WORLD_SIZE=N" in out
    assert re.search(r"vocabulary [\d,]+ \(", out)
    assert "fits in A100" in out or "does not fit in A100" in out


@pytest.mark.slow
def test_15b_dry_run_at_its_published_layout():
    """The 15.5B run as BigCode launched it, planned from a laptop: 512 GPUs = TP 4 x PP 4 x DP 32, on the
    GPU and peak named by the flags."""
    result = _pretrain(
        "--config", "starcoderbase-15b", "--dry-run", "--data-parallel-size", "32", "--dry-run-gpu", "H100",
        "--peak-tflops", "800",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "15,517,456,384 parameters; TP 4 x PP 4 x DP 32" in result.stdout
    assert "from --data-parallel-size 32 (WORLD_SIZE is not set)" in result.stdout
    assert "800 TFLOP/s per GPU (--peak-tflops)" in result.stdout
    assert "fits in H100 80 GB" in result.stdout


def test_help_lists_the_planning_flags():
    result = _pretrain("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--dry-run-gpu {A100,H100,H200}" in text
    assert "--peak-tflops PEAK_TFLOPS" in text and "--data-parallel-size DATA_PARALLEL_SIZE" in text
