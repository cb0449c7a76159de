"""Plot the metrics of one or more training runs into one picture, runs overlaid.

    python tools/plot_metrics.py RUN [RUN ...] --output metrics.png [--names A B ...]
        [--x tokens|samples|iteration] [--summary]

RUN is a metrics JSONL file (--metrics-jsonl) or a directory holding `metrics.jsonl` (a --save
directory, or the quickstart's directory). Six panels: training loss, validation loss (one line per
validation group), learning rate, grad norm, tokens/s and MFU, against tokens by default. Iterations
whose update was skipped (a non-finite gradient or an fp16 overflow) are marked with an x on the
training-loss line. A resumed run's file holds the iterations it re-ran twice: the records a restart
superseded are dropped (`megatron.training.metrics.read_metrics`), so each run is one uninterrupted
history.

Tokens are consumed samples x the sequence length, read from the run's start records (runs log it) or
from the config of the checkpoint beside the metrics file (DIR or DIR/checkpoints); when neither has it,
the x axis falls back to samples and is labelled so. The picture (PNG, SVG or PDF by --output's
suffix) is written atomically: an existing file is replaced only by a complete one.

Needs matplotlib (`pip install -e .[plot]`). Exit status 2 for a bad input (a missing or empty file, a
file with no training records, a missing output directory) or when matplotlib is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron.training.metrics import effective_records, read_records

METRICS_FILENAME = "metrics.jsonl"
FORMATS = ("png", "svg", "pdf")
X_CHOICES = ("tokens", "samples", "iteration")
# panel key -> (title, record key, scale applied to the value); the loss panels are built separately
SCALAR_PANELS = {
    "lr": ("learning rate", "lr", 1.0),
    "grad_norm": ("grad norm", "grad_norm", 1.0),
    "tokens_per_sec": ("tokens/s", "tokens_per_sec", 1.0),
    "mfu": ("MFU (%)", "mfu", 100.0),
}
PANELS = ("train_loss", "valid_loss", *SCALAR_PANELS)
PANEL_TITLES = {"train_loss": "training loss", "valid_loss": "validation loss"}
PANEL_TITLES.update({key: title for key, (title, _, _) in SCALAR_PANELS.items()})


class PlotError(ValueError):
    """A bad input or output, reported as one line with exit status 2."""


@dataclass
class Run:
    """One run's effective records (see `read_metrics`) and what the x axis needs."""

    name: str
    path: Path
    records: list[dict]
    seq_length: int | None = None

    @property
    def training(self) -> list[dict]:
        return latest_history([r for r in self.records if "lm_loss" in r and "valid_group" not in r])

    @property
    def validation(self) -> list[dict]:
        """Every validation group's records (each group's history in iteration order)."""
        groups: dict[str, list[dict]] = {}
        for record in self.records:
            if "valid_lm_loss" in record:
                groups.setdefault(str(record.get("valid_group", "valid")), []).append(record)
        return [record for records in groups.values() for record in latest_history(records)]


@dataclass
class Series:
    """One line of one panel: `x` and `y` of equal length; `marker` lines are points only."""

    label: str
    run: str
    x: list[float]
    y: list[float]
    marker: bool = False


@dataclass
class PlotData:
    x_label: str
    panels: dict[str, list[Series]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- reading


def metrics_file(run: str) -> Path:
    """The metrics JSONL a RUN argument names (a file, or DIR/metrics.jsonl)."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILENAME
        if not path.is_file():
            raise PlotError(f"{run}: a directory without {METRICS_FILENAME} (give the file or its directory)")
    elif not path.is_file():
        raise PlotError(f"{run}: no such file or directory")
    return path


def default_name(run: str) -> str:
    """The run directory's name (the file's stem for a JSONL not named metrics.jsonl)."""
    path = Path(run).resolve()
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == METRICS_FILENAME else path.stem


def latest_history(records: list[dict]) -> list[dict]:
    """Records of one kind with iterations increasing: a record whose iteration is not past the one
    before it was logged by a re-run (a file without start markers, written before runs logged them),
    and replaces the records from its iteration on."""
    kept: list[dict] = []
    for record in records:
        iteration = _number(record.get("iteration", 0))
        while kept and _number(kept[-1].get("iteration", 0)) >= iteration:
            kept.pop()
        kept.append(record)
    return kept


def _checkpoint_seq_length(directory: Path) -> int | None:
    """seq_length from the config of the tracked (else newest) checkpoint under `directory`."""
    from megatron.checkpoint.directory import checkpoint_dir, find_checkpoints, read_tracker

    try:
        tracked = read_tracker(directory)
        found = find_checkpoints(directory)
    except (OSError, ValueError):
        return None
    candidates = [checkpoint_dir(directory, tracked)] if tracked is not None else []
    candidates += [path for _, path in found]  # newest first
    for candidate in candidates:
        try:
            common = json.loads((candidate / "common.json").read_text(encoding="utf-8"))
            return int(common["config"]["model"]["seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def find_seq_length(path: Path, raw: list[dict]) -> int | None:
    """Tokens per sample: the newest record that states it, else the checkpoint next to the file."""
    for record in reversed(raw):
        value = record.get("seq_length")
        if isinstance(value, int) and value > 0:
            return value
    for directory in (path.parent, path.parent / "checkpoints"):
        if directory.is_dir():
            value = _checkpoint_seq_length(directory)
            if value:
                return value
    return None


def load_run(run: str, name: str | None = None) -> Run:
    """A RUN argument read and checked (PlotError naming the file when it holds no training record)."""
    path = metrics_file(run)
    try:
        raw = read_records(path)  # the start records too: they hold seq_length
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(f"{path}: cannot read ({error})") from None
    if not raw:
        raise PlotError(f"{path}: no metric records (empty, or not a metrics JSONL)")
    loaded = Run(name or default_name(run), path, effective_records(raw), find_seq_length(path, raw))
    if not loaded.training:
        raise PlotError(
            f"{path}: no training records (lines with lm_loss); the run logged none yet "
            "(its first one comes after --log-interval iterations)"
        )
    return loaded


# ---------------------------------------------------------------------------------------- series


def _number(value) -> float:
    """A record's value as a float (the writer stores inf/nan as strings); nan when not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def x_axis(runs: list[Run], kind: str) -> tuple[str, dict[str, float]]:
    """(axis label, {run name: x per unit of the records' key}) for `--x kind`; tokens fall back to
    samples for every run when one run's sequence length is unknown."""
    if kind == "tokens" and all(run.seq_length for run in runs):
        return "tokens", {run.name: float(run.seq_length) for run in runs}
    if kind == "iteration":
        return "iteration", {run.name: 1.0 for run in runs}
    label = "samples" if kind == "samples" else "samples (sequence length unknown: no tokens axis)"
    return label, {run.name: 1.0 for run in runs}


def _x(record: dict, kind: str, scale: float) -> float:
    key = "iteration" if kind == "iteration" else "consumed_samples"
    return _number(record.get(key)) * scale


def plot_data(runs: list[Run], kind: str = "tokens") -> PlotData:
    """Every panel's lines: one per run (per validation group on the validation panel), plus the
    skipped-iteration markers on the training-loss panel."""
    label, scales = x_axis(runs, kind)
    axis = "iteration" if kind == "iteration" else "samples"
    data = PlotData(label, {panel: [] for panel in PANELS})
    for run in runs:
        scale, training = scales[run.name], run.training
        xs = [_x(record, axis, scale) for record in training]
        data.panels["train_loss"].append(
            Series(run.name, run.name, xs, [_number(r["lm_loss"]) for r in training])
        )
        skipped = [
            (x, r) for x, r in zip(xs, training, strict=True) if _number(r.get("skipped_iterations")) > 0
        ]
        if skipped:
            data.panels["train_loss"].append(
                Series(
                    f"{run.name}: skipped iterations",
                    run.name,
                    [x for x, _ in skipped],
                    [_number(r["lm_loss"]) for _, r in skipped],
                    marker=True,
                )
            )
        groups: dict[str, list[dict]] = {}
        for record in run.validation:
            groups.setdefault(str(record.get("valid_group", "valid")), []).append(record)
        for group, records in groups.items():
            name = run.name if list(groups) == ["valid"] else f"{run.name} [{group}]"
            data.panels["valid_loss"].append(
                Series(
                    name,
                    run.name,
                    [_x(record, axis, scale) for record in records],
                    [_number(record["valid_lm_loss"]) for record in records],
                )
            )
        for panel, (_, key, factor) in SCALAR_PANELS.items():
            having = [(x, r) for x, r in zip(xs, training, strict=True) if key in r]
            if having:
                ys = [_number(r[key]) * factor for _, r in having]
                data.panels[panel].append(Series(run.name, run.name, [x for x, _ in having], ys))
    return data


# ---------------------------------------------------------------------------------------- drawing


def import_pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); PlotError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError(
            "matplotlib is not installed; install the plot extra: pip install -e .[plot] "
            "(or pip install matplotlib)"
        ) from None
    return plt


def draw(data: PlotData):
    """The figure (2 x 3 panels, in PANELS order; `figure.axes[i]` is panel PANELS[i])."""
    plt = import_pyplot()
    from matplotlib.ticker import EngFormatter

    figure, grid = plt.subplots(2, 3, figsize=(16, 8.5), layout="constrained")
    colors: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, panel in zip(grid.flat, PANELS, strict=True):
        axes.set_title(PANEL_TITLES[panel])
        axes.set_xlabel(data.x_label)
        axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, 2M: long token counts stay legible
        axes.grid(True, alpha=0.3)
        for series in data.panels[panel]:
            color = colors.setdefault(series.run, palette[len(colors) % len(palette)])
            if series.marker:
                axes.plot(series.x, series.y, "x", color="red", markersize=7, label=series.label)
            else:
                style = "-" if len(series.x) > 20 else ".-"  # a short history shows its points
                axes.plot(series.x, series.y, style, color=color, linewidth=1.4, label=series.label)
        if not data.panels[panel]:
            axes.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axes.transAxes)
        elif panel in ("train_loss", "valid_loss"):
            axes.legend(fontsize="small")
    return figure


def save_figure(figure, output: Path) -> None:
    """Write `figure` to `output` via a temporary sibling renamed at the end (removed on failure)."""
    fmt = output.suffix.lower().lstrip(".")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format=fmt, dpi=110)
        os.replace(tmp, output)
    except OSError as error:
        raise PlotError(f"--output {output}: cannot write ({error.strerror or error})") from None
    finally:
        tmp.unlink(missing_ok=True)


def summary_lines(runs: list[Run]) -> list[str]:
    """One line per run: last iteration, last and lowest training and validation loss."""

    def last_min(values: list[float]) -> str:
        finite = [value for value in values if math.isfinite(value)]
        return f"{finite[-1]:>11.4f} {min(finite):>11.4f}" if finite else f"{'-':>11} {'-':>11}"

    width = max(len(run.name) for run in runs + [Run("run", Path(), [])])
    header = ("iteration", "train last", "train min", "valid last", "valid min")
    lines = [f"{'run':<{width}} {header[0]:>9} " + " ".join(f"{name:>11}" for name in header[1:])]
    for run in runs:
        train = [_number(record["lm_loss"]) for record in run.training]
        valid = [_number(record["valid_lm_loss"]) for record in run.validation]
        iteration = run.training[-1].get("iteration", "?")
        lines.append(f"{run.name:<{width}} {iteration:>9} {last_min(train)} {last_min(valid)}")
    return lines


# ---------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plot_metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="a metrics JSONL or a directory holding metrics.jsonl"
    )
    parser.add_argument("--output", required=True, help="the picture to write: FILE.png (or .svg, .pdf)")
    parser.add_argument(
        "--names",
        nargs="+",
        default=None,
        help="one legend name per RUN (default: each run's directory name)",
    )
    parser.add_argument(
        "--x", choices=X_CHOICES, default="tokens", help="the x axis of every panel (default tokens)"
    )
    parser.add_argument("--summary", action="store_true", help="also print last and lowest losses per run")
    return parser


def _unique(names: list[str], runs: list[str]) -> list[str]:
    """Default names made distinct: a repeated directory name gets its parent's name in front."""
    if len(set(names)) == len(names):
        return names
    return [f"{Path(run).resolve().parent.name}/{name}" for run, name in zip(runs, names, strict=True)]


def run(args) -> Path:
    output = Path(args.output)
    if output.suffix.lower().lstrip(".") not in FORMATS:
        raise PlotError(f"--output {output}: the name must end in .png, .svg or .pdf")
    if not output.parent.is_dir():
        raise PlotError(f"--output {output}: directory {output.parent} does not exist")
    names = args.names or _unique([default_name(path) for path in args.runs], args.runs)
    runs = [load_run(path, name) for path, name in zip(args.runs, names, strict=True)]
    figure = draw(plot_data(runs, args.x))
    try:
        save_figure(figure, output)
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    if args.summary:
        print("\n".join(summary_lines(runs)))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.runs):
        parser.error(f"--names gives {len(args.names)} names for {len(args.runs)} runs; give one per RUN")
    try:
        print(f"wrote {run(args)}")
    except PlotError as error:
        print(f"plot_metrics: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
