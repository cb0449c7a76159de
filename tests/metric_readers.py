"""Reading what the TensorBoard and W&B sinks wrote, with each library's own reader.

TensorBoard: `EventAccumulator` over the event files of a log directory. W&B: an offline run's
transaction log (`run-ID.wandb`) printed as JSON records by W&B's own `wandb leet inspect --json`
(wandb >= 0.31 here; the Python `DataStore` reader of older versions is gone), so the history rows and
the `define_metric` declarations are read back as W&B stored them, with no mock.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def read_tensorboard(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar under `log_dir`, in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def wandb_run_file(wandb_dir: str | Path) -> Path:
    """The one offline run's transaction log under `wandb_dir` (the --wandb-save-dir or --save)."""
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {wandb_dir}, found {files}"
    return files[0]


def read_wandb(run_file: str | Path) -> tuple[list[dict], dict[str, str]]:
    """(history rows in logged order, {metric name: its step metric} from `define_metric`)."""
    wandb_cli = [sys.executable, "-c", "import sys; from wandb.cli.cli import cli; sys.exit(cli())"]
    result = subprocess.run(
        [*wandb_cli, "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows, axes = [], {}
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
        elif record.get("type") == "metric" and "step_metric" in record["metric"]:
            axes[record["metric"]["name"]] = record["metric"]["step_metric"]
    return rows, axes
