"""tools/plot_metrics.py: the panels' lines against the records, resumed runs, the x axis, bad inputs.

The metrics files are written by the training loop's own code (`interval_metrics`, `JsonlWriter`,
`restarts.start_record`), so the records carry exactly the keys a run writes. The lines are read back
from the drawn figure (`Axes.get_lines()`), not from the tool's intermediate lists.
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from megatron.training.metrics import IntervalStats, JsonlWriter, Throughput, interval_metrics
from megatron.training.restarts import start_record
from tests.helpers import load_tool

pytest.importorskip("matplotlib")

SEQ_A = 64
GLOBAL_BATCH = 4
STALE_LOSS = 99.0  # logged by an attempt a restart superseded: must not be plotted


@pytest.fixture(scope="module")
def plot():
    return load_tool("plot_metrics")


def _training(iteration: int, loss: float, *, skipped: bool = False, train_iters: int = 10) -> dict:
    stats = IntervalStats()
    output = SimpleNamespace(lm_loss=loss, grad_norm=0.5 + iteration / 100)
    stats.add(output, 0.05, lr=1e-3 / iteration, skipped=skipped)
    throughput = Throughput(SEQ_A * GLOBAL_BATCH, 6e6, 1, 1e12, "test peak")
    return interval_metrics(
        stats,
        throughput,
        iteration=iteration,
        train_iters=train_iters,
        consumed_samples=iteration * GLOBAL_BATCH,
        total_skipped=int(skipped),
        loss_scale=None,
    )


def _validation(iteration: int, loss: float, group: str = "valid") -> dict:
    """The keys train.py's evaluation writes."""
    return {
        "iteration": iteration,
        "consumed_samples": iteration * GLOBAL_BATCH,
        "valid_group": group,
        "valid_lm_loss": loss,
        "valid_ppl": 2.718**loss,
        "valid_loss_tokens": 512,
    }


def _write(path, records) -> None:
    writer = JsonlWriter(path)
    for record in records:
        writer.write(record, record.get("iteration", 0))
    writer.close()


@pytest.fixture()
def resumed_run(tmp_path):
    """Run A: 8 iterations logged, killed, resumed from its iteration-5 checkpoint to 10. Iteration 7
    skipped its update in the re-run. Effective: training 1..10, validation at 0, 5, 10."""
    directory = tmp_path / "run_a"
    first = [{**start_record(0, 1), "seq_length": SEQ_A}, _validation(0, 7.0)]
    first += [_training(i, 7.0 - i / 10) for i in range(1, 6)] + [_validation(5, 6.6)]
    first += [_training(i, STALE_LOSS) for i in (6, 7, 8)]
    second = [{**start_record(5, 1), "seq_length": SEQ_A, "attempt": 1}]
    second += [_training(i, 7.0 - i / 10, skipped=i == 7) for i in range(6, 11)] + [_validation(10, 6.2)]
    _write(directory / "metrics.jsonl", first + second)
    return directory


@pytest.fixture()
def checkpointed_run(tmp_path):
    """Run B: 6 iterations, no seq_length in its records (an older run); its --save directory holds a
    checkpoint whose config says seq_length 32."""
    directory = tmp_path / "run_b"
    records = [start_record(0, 1), _validation(0, 7.1)]
    records += [_training(i, 7.1 - i / 20, train_iters=6) for i in range(1, 7)] + [_validation(6, 6.9)]
    _write(directory / "metrics.jsonl", records)
    (directory / "latest_checkpointed_iteration.txt").write_text("6")
    (directory / "iter_0000006").mkdir()
    common = {"iteration": 6, "config": {"model": {"seq_length": 32}}}
    (directory / "iter_0000006" / "common.json").write_text(json.dumps(common))
    return directory


def _lines(figure, plot) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel: {label: (x, y)}} read from the drawn axes."""
    out = {}
    for axes, panel in zip(figure.axes, plot.PANELS, strict=True):
        assert axes.get_title() == plot.PANEL_TITLES[panel]
        out[panel] = {
            line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()
        }
    return out


def test_two_runs_overlaid_with_one_line_per_panel_and_run(plot, resumed_run, checkpointed_run, tmp_path):
    output = tmp_path / "metrics.png"
    assert (
        plot.main([str(resumed_run), str(checkpointed_run / "metrics.jsonl"), "--output", str(output)]) == 0
    )
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    runs = [plot.load_run(str(resumed_run)), plot.load_run(str(checkpointed_run))]
    assert [run.name for run in runs] == ["run_a", "run_b"]
    assert [run.seq_length for run in runs] == [SEQ_A, 32]  # from the start record; from the checkpoint
    figure = plot.draw(plot.plot_data(runs))
    lines = _lines(figure, plot)
    plot.import_pyplot().close(figure)
    assert figure.axes[0].get_xlabel() == "tokens"
    for panel in ("train_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert len(lines[panel]["run_a"][0]) == 10 and len(lines[panel]["run_b"][0]) == 6, panel
    assert len(lines["valid_loss"]["run_a"][0]) == 3 and len(lines["valid_loss"]["run_b"][0]) == 2
    x_a, y_a = lines["train_loss"]["run_a"]
    assert x_a == [i * GLOBAL_BATCH * SEQ_A for i in range(1, 11)]
    assert STALE_LOSS not in y_a  # the superseded attempt's iterations 6-8 are not drawn
    assert lines["train_loss"]["run_b"][0][-1] == 6 * GLOBAL_BATCH * 32
    assert lines["train_loss"]["run_a: skipped iterations"] == (
        [7 * GLOBAL_BATCH * SEQ_A],
        [pytest.approx(6.3)],
    )
    assert "run_b: skipped iterations" not in lines["train_loss"]
    record = _training(3, 1.0)
    assert lines["mfu"]["run_a"][1][2] == pytest.approx(100 * record["mfu"])


def test_names_x_axis_and_summary(plot, resumed_run, tmp_path, capsys):
    (resumed_run / "metrics.jsonl").rename(tmp_path / "a.jsonl")  # no checkpoint, no directory name
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    _write(tmp_path / "old.jsonl", [r for r in lines if "seq_length" not in r])  # no sequence length
    output = tmp_path / "out.svg"
    argv = [str(tmp_path / "a.jsonl"), str(tmp_path / "old.jsonl"), "--output", str(output)]
    assert plot.main([*argv, "--names", "first", "second", "--summary"]) == 0
    out = capsys.readouterr().out
    assert output.read_text().lstrip().startswith("<?xml")
    assert "first" in out and "second" in out and f"wrote {output}" in out
    assert "6.2000" in out.splitlines()[1]  # run A's last validation loss

    runs = [plot.load_run(str(tmp_path / "a.jsonl")), plot.load_run(str(tmp_path / "old.jsonl"))]
    assert [run.name for run in runs] == ["a", "old"]
    data = plot.plot_data(runs, "tokens")  # one run without a sequence length: samples for all
    assert data.x_label.startswith("samples")
    assert data.panels["train_loss"][0].x == [i * GLOBAL_BATCH for i in range(1, 11)]
    assert plot.plot_data(runs, "iteration").panels["valid_loss"][0].x == [0, 5, 10]

    with pytest.raises(SystemExit) as exit_info:
        plot.main([*argv, "--names", "only-one"])
    assert exit_info.value.code == 2


def test_rerun_without_start_markers_keeps_the_latest_records(plot, tmp_path):
    records = [_training(i, 5.0) for i in range(1, 6)] + [_training(i, 4.0) for i in range(3, 8)]
    _write(tmp_path / "metrics.jsonl", records)
    run = plot.load_run(str(tmp_path))
    assert [r["iteration"] for r in run.training] == list(range(1, 8))
    assert [r["lm_loss"] for r in run.training] == [5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file or directory"),
        ("empty", "no metric records"),
        ("validation_only", "no training records"),
        ("directory", "a directory without metrics.jsonl"),
    ],
)
def test_bad_inputs_exit_2_naming_the_file(plot, tmp_path, capsys, case, message):
    path = tmp_path / "bad.jsonl"
    if case == "empty":
        path.write_text("")
    elif case == "validation_only":
        _write(path, [start_record(0, 1), _validation(0, 7.0)])
    elif case == "directory":
        path = tmp_path / "somedir"
        path.mkdir()
    output = tmp_path / "out.png"
    assert plot.main([str(path), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_metrics: error: ") and str(path) in err and message in err
    assert "Traceback" not in err and not output.exists()


def test_bad_outputs_and_a_failed_write_keep_the_old_picture(
    plot, resumed_run, tmp_path, capsys, monkeypatch
):
    assert plot.main([str(resumed_run), "--output", str(tmp_path / "nodir" / "m.png")]) == 2
    assert "nodir does not exist" in capsys.readouterr().err
    assert plot.main([str(resumed_run), "--output", str(tmp_path / "m.txt")]) == 2
    assert ".png, .svg or .pdf" in capsys.readouterr().err

    output = tmp_path / "m.png"
    output.write_bytes(b"old picture")
    from matplotlib.figure import Figure

    def full_disk(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert plot.main([str(resumed_run), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(output) in err
    assert output.read_bytes() == b"old picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "run_a"]  # no temporary left


def test_missing_matplotlib_says_how_to_install_it(plot, resumed_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    output = tmp_path / "m.png"
    assert plot.main([str(resumed_run), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install -e .[plot]" in err
    assert not output.exists()
