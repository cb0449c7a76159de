"""bench/gpu_train_step.py end to end at its tiny CPU shape: the printed table parses, every peer is timed
against the same FLOP count, the printed ratios follow from the printed rates, and the peers' first-step
losses agree (the same model, weights and batches). The Megatron-core peer runs where MCORE_PATH names a
directory holding megatron-core (`pip install --target DIR --no-deps megatron-core==0.16.1`); its guard
against importing this repository's `megatron` instead is checked everywhere."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.e2e.runs import REPO_ROOT, launch_env

BENCH = REPO_ROOT / "bench" / "gpu_train_step.py"
PEER = REPO_ROOT / "bench" / "peers" / "mcore_peer.py"
MCORE_PATH = os.environ.get("MCORE_PATH")
# fp32 on both sides from the same weights: only the summation order of the two implementations differs
LOSS_TOLERANCE = 1e-4


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_table(output: str) -> dict[str, dict]:
    """The rows of the printed peer table, by peer: floats where the cell is a number."""
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] == "peer" or len(cells) != 7:
            continue
        names = ("tokens_per_sec", "tflops", "mfu", "peak_gib", "first_loss", "flops_per_token")
        rows[cells[0]] = {name: _number(cell) for name, cell in zip(names, cells[1:])}
    return rows


def _number(cell: str):
    try:
        return float(cell.rstrip("%"))
    except ValueError:
        return cell


def check_run(
    done: subprocess.CompletedProcess, peers: list[str], json_path, loss_tolerance=LOSS_TOLERANCE
) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    rows = parse_table(done.stdout)
    assert sorted(rows) == sorted(peers), done.stdout
    flops = {row["flops_per_token"] for row in rows.values()}
    assert len(flops) == 1, f"peers timed against different FLOP counts: {flops}"
    (fpt,) = flops
    header = re.search(r"FLOP/token (\S+) \(all peers\)", done.stdout)
    assert header and float(header.group(1)) == fpt
    for peer, row in rows.items():
        assert row["tokens_per_sec"] > 0, (peer, row)
        # TFLOP/s is printed to 4 significant digits
        assert math.isclose(row["tflops"], row["tokens_per_sec"] * fpt / 1e12, rel_tol=2e-3), (peer, row)
    printed = {m.group(1): float(m.group(2)) for m in re.finditer(r"ratio ours/(\S+): ([\d.]+)", done.stdout)}
    assert sorted(printed) == sorted(p for p in peers if p != "ours"), done.stdout
    for peer, ratio in printed.items():
        expected = rows["ours"]["tokens_per_sec"] / rows[peer]["tokens_per_sec"]
        # rates printed to 0.1 token/s, ratios to 3 decimals
        assert math.isclose(ratio, expected, rel_tol=2e-3, abs_tol=1.5e-3), (peer, ratio, expected)
    losses = {peer: row["first_loss"] for peer, row in rows.items()}
    assert max(losses.values()) - min(losses.values()) < loss_tolerance, losses
    assert abs(losses["ours"] - math.log(512)) < 0.5, losses  # a fresh model over 512 tokens
    (summary,) = json.loads(json_path.read_text())["shapes"]
    assert summary["flops_per_token"] == pytest.approx(fpt, rel=1e-5)
    assert summary["peers"]["ours"]["first_loss"] == pytest.approx(losses["ours"], abs=1e-5)
    return rows


@pytest.mark.slow
def test_ours_and_transformers_side_by_side_on_cpu(tmp_path):
    out = tmp_path / "numbers.json"
    done = run_bench("--device", "cpu", "--shape", "tiny", "--peers", "ours,transformers", "--json", str(out))
    check_run(done, ["ours", "transformers"], out)


@pytest.mark.slow
@pytest.mark.skipif(not MCORE_PATH, reason="MCORE_PATH (a directory holding megatron-core) is not set")
def test_megatron_core_peer_on_cpu(tmp_path):
    out = tmp_path / "numbers.json"
    peers = ["ours", "mcore-local", "mcore-sdpa"]
    done = run_bench("--device", "cpu", "--shape", "tiny", "--peers", ",".join(peers), "--mcore-path", MCORE_PATH,
                     "--json", str(out))  # fmt: skip
    check_run(done, peers, out)
    assert "megatron-core 0.16.1, local spec" in done.stdout


@pytest.mark.slow
def test_peer_refuses_this_repository_as_megatron_core():
    """Both packages are named `megatron`: with this repository importable and no megatron-core first on
    the path, the peer says so and how to fix it instead of failing on a missing module."""
    done = subprocess.run(
        [sys.executable, str(PEER), "--device", "cpu"],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "has no `megatron.core`" in done.stderr and "PYTHONPATH" in done.stderr
    assert str(REPO_ROOT) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_cpu_refuses_the_gpu_shapes():
    done = run_bench("--device", "cpu", "--shape", "1b", timeout=120)
    assert done.returncode == 2
    assert "only --shape tiny runs on a CPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ours_and_transformers_side_by_side_on_gpu(tmp_path):
    out = tmp_path / "numbers.json"
    done = run_bench(
        "--device", "cuda", "--shape", "tiny", "--peers", "ours,transformers", "--json", str(out)
    )
    # fp32 on a GPU: the two models' attention kernels may differ (flash is bf16/fp16 only)
    check_run(done, ["ours", "transformers"], out, loss_tolerance=1e-3)
    (summary,) = json.loads(out.read_text())["shapes"]
    assert all(peer["peak_memory_bytes"] > 0 for peer in summary["peers"].values()), summary
