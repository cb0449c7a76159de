"""tools/plot_metrics.py on the metrics files of real runs: one resumed after its last checkpoint was
lost (so its file holds iterations 4-6 twice), one fresh; the picture's lines follow each run's
effective history, against tokens (the sequence length from the runs' start records)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.e2e.runs import REPO_ROOT, TINY_RUN_FLAGS, launch_env, pretrain_args, run_pretrain
from tests.helpers import load_tool

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.slow

SEQ = 64  # TINY_RUN_FLAGS
GLOBAL_BATCH = 4
CADENCE = "--log-interval 1 --eval-interval 3 --eval-iters 1 --save-interval 3"


def _train(run_dir, dataset, tokenizer, *flags: str) -> None:
    args = pretrain_args(run_dir, dataset, tokenizer, TINY_RUN_FLAGS, CADENCE, *flags, save=True, load=True)
    result = run_pretrain(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_plot_of_a_resumed_and_a_fresh_run(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    _train(resumed, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 6")
    ckpt = resumed / "ckpt"
    shutil.rmtree(ckpt / "iter_0000006")  # the last checkpoint lost: the rerun resumes from 3
    (ckpt / "latest_checkpointed_iteration.txt").write_text("3")
    _train(resumed, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 6")
    _train(fresh, tiny_dataset_prefix, tiny_tokenizer_path, "--train-iters 4", "--lr 1e-3")
    raw = (ckpt / "metrics.jsonl").read_text().splitlines()
    assert sum('"lm_loss"' in line for line in raw) == 9  # 1-6, then 4-6 again

    output = tmp_path / "runs.png"
    result = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", str(ckpt), str(fresh / "ckpt" / "metrics.jsonl")]
        + ["--names", "resumed", "fresh", "--output", str(output), "--summary"],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"wrote {output}" and result.stderr == ""
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [line.split()[:2] for line in result.stdout.splitlines()[1:3]] == [
        ["resumed", "6"],
        ["fresh", "4"],
    ]

    plot = load_tool("plot_metrics")
    runs = [plot.load_run(str(ckpt), "resumed"), plot.load_run(str(fresh / "ckpt"), "fresh")]
    assert [run.seq_length for run in runs] == [SEQ, SEQ]
    figure = plot.draw(plot.plot_data(runs))
    for axes, panel in zip(figure.axes, plot.PANELS, strict=True):
        lines = {line.get_label(): list(line.get_xdata()) for line in axes.get_lines()}
        if panel == "valid_loss":  # every --eval-interval and at the end
            assert lines["resumed"] == [i * GLOBAL_BATCH * SEQ for i in (0, 3, 6)]
            assert lines["fresh"] == [i * GLOBAL_BATCH * SEQ for i in (0, 3, 4)]
        else:
            assert lines["resumed"] == [i * GLOBAL_BATCH * SEQ for i in range(1, 7)], panel
            assert lines["fresh"] == [i * GLOBAL_BATCH * SEQ for i in range(1, 5)], panel
    plot.import_pyplot().close(figure)
