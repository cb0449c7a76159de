"""Metric sinks: the readable stdout line, JSON lines, TensorBoard and Weights & Biases.

Every sink receives the same flat dict of numbers (plus a few strings) for a training log interval or a
validation pass. TensorBoard and W&B are optional: asked for but not installed gives one clear log line
and the run goes on without them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from megatron.log import get_logger

logger = get_logger(__name__)


def _json_value(value):
    """JSON has no inf/nan: write them as strings so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class Throughput:
    """Numbers for tokens/s, TFLOP/s per device and MFU."""

    tokens_per_iteration: int
    flops_per_token: float
    world_size: int
    peak_flops: float
    peak_name: str


class IntervalStats:
    """Sums over the iterations since the last log line."""

    def __init__(self) -> None:
        self.lr = 0.0
        self.reset()

    def reset(self) -> None:
        self.iterations = 0
        self.loss_sum = 0.0
        self.num_losses = 0
        self.skipped = 0
        self.seconds = 0.0
        self.waited_seconds = 0.0  # of `seconds`, blocked waiting for peers (the straggler report)
        self.grad_norm = None
        self.last_update_applied = False  # the interval's last iteration stepped the optimizer

    def add(self, output, seconds: float, *, lr: float, skipped: bool, waited: float = 0.0) -> None:
        """Account one iteration (`output` is its `StepOutput`) that took `seconds`, `waited` of them
        blocked waiting for peers."""
        self.iterations += 1
        self.lr = lr
        self.seconds += seconds
        self.waited_seconds += waited
        self.skipped += int(skipped)
        self.last_update_applied = not skipped
        if math.isfinite(output.lm_loss):  # an fp16 overflow skips the update, yet its loss is valid
            self.loss_sum += output.lm_loss
            self.num_losses += 1
        if output.grad_norm is not None and math.isfinite(output.grad_norm):
            self.grad_norm = output.grad_norm


def interval_metrics(
    stats: IntervalStats,
    tp: Throughput,
    *,
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    total_skipped: int,
    loss_scale: float | None,
    global_batch_size: int | None = None,
) -> dict:
    """The metrics of one log line (also the JSONL/TensorBoard/W&B record). `mfu` is None when the
    computed value exceeds 1: the reference peak (a CPU's measured matmul rate) was below what the run
    achieved, so no utilisation can be stated."""
    seconds_per_iter = stats.seconds / max(stats.iterations, 1)
    tokens_per_sec = tp.tokens_per_iteration / seconds_per_iter if seconds_per_iter > 0 else 0.0
    tflops = tokens_per_sec * tp.flops_per_token / tp.world_size / 1e12
    mfu = tflops * 1e12 / tp.peak_flops if tp.peak_flops > 0 else 0.0
    metrics = {
        "iteration": iteration,
        "train_iters": train_iters,
        "consumed_samples": consumed_samples,
        "global_batch_size": global_batch_size,
        "world_size": tp.world_size,
        "ms_per_iteration": seconds_per_iter * 1000.0,
        "lr": stats.lr,
        "lm_loss": stats.loss_sum / stats.num_losses if stats.num_losses else float("nan"),
        "grad_norm": stats.grad_norm if stats.grad_norm is not None else float("nan"),
        "skipped_iterations": stats.skipped,
        "total_skipped_iterations": total_skipped,
        "tokens_per_sec": tokens_per_sec,
        "tflops_per_device": tflops,
        "mfu": mfu if mfu <= 1.0 else None,
        "peak_device": tp.peak_name,
    }
    if global_batch_size is None:
        del metrics["global_batch_size"]
    if loss_scale is not None:
        metrics["loss_scale"] = loss_scale
    return metrics


def log_interval_metrics(run, stats: IntervalStats) -> dict:
    """The metrics of a log interval of the training loop's `run` (`megatron.training.train.Run`), with
    --log-params-norm / --log-num-zeros-in-grad the parameter norm and the gradient's zero count after
    the interval's last step (`num_zeros` only when that step updated the weights, as Megatron). Every
    rank calls this at the same iterations: the norms are a collective."""
    metrics = interval_metrics(
        stats,
        run.throughput,
        iteration=run.state.iteration,
        train_iters=run.train_iters,
        consumed_samples=run.state.consumed_samples,
        total_skipped=run.state.skipped_iterations,
        loss_scale=run.optimizer.loss_scale,
        global_batch_size=run.global_batch_size,
    )
    logging_config = run.cfg.logging
    if logging_config.log_params_norm or logging_config.log_num_zeros_in_grad:
        params_norm, num_zeros = run.optimizer.params_norm_and_zeros()
        if logging_config.log_params_norm:
            metrics["params_norm"] = params_norm
        if logging_config.log_num_zeros_in_grad and stats.last_update_applied:
            metrics["num_zeros"] = num_zeros
    return metrics


def format_training_line(metrics: dict) -> str:
    """The readable log line (Megatron's layout, plus throughput)."""
    width = len(str(metrics["train_iters"]))
    parts = [
        f" iteration {metrics['iteration']:>{width}}/{metrics['train_iters']}",
        f"consumed samples: {metrics['consumed_samples']}",
        f"elapsed time per iteration (ms): {metrics['ms_per_iteration']:.1f}",
        f"learning rate: {metrics['lr']:.3E}",
        f"lm loss: {metrics['lm_loss']:.6E}",
        f"grad norm: {metrics['grad_norm']:.3f}",
    ]
    if "loss_scale" in metrics:
        parts.append(f"loss scale: {metrics['loss_scale']:.1f}")
    if "num_zeros" in metrics:
        parts.append(f"num zeros: {metrics['num_zeros']}")
    if "params_norm" in metrics:
        parts.append(f"params norm: {metrics['params_norm']:.3f}")
    mfu = metrics["mfu"]
    parts += [
        f"skipped iterations: {metrics['skipped_iterations']}",
        f"tokens/s: {metrics['tokens_per_sec']:.0f}",
        f"TFLOP/s/device: {metrics['tflops_per_device']:.3f}",
        f"MFU: {100.0 * mfu:.1f}%"
        if mfu is not None
        else "MFU: n/a (above the reference peak; pass --peak-tflops with the real peak)",
    ]
    return " | ".join(parts)


class JsonlWriter:
    """Appends one JSON object per line (appending keeps the history of a resumed run)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        if self._file.tell() > 0 and not _ends_with_newline(self.path):
            self._file.write("\n")  # a run killed mid-line: its half record stays alone on its line

    def write(self, metrics: dict, step: int) -> None:
        line = json.dumps({key: _json_value(value) for key, value in metrics.items()})
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def effective_records(records: list[dict]) -> list[dict]:
    """The metric records of a metrics JSONL as one uninterrupted run would have written them.

    A resumed run appends to the file: each (re)start writes an event record `{"event": "start",
    "attempt": A, "resumed_from_iteration": I, ...}` and re-runs the iterations after I, which the
    interrupted run may have logged already. Records of iterations after I written before that marker are
    dropped (the re-run's are the ones that count), as are event records. A rollback after loss spikes
    (`{"event": "rollback", "resumed_from_iteration": I, ...}`) re-runs the iterations after I the same way."""
    kept: list[dict] = []
    for record in records:
        if record.get("event") in ("start", "rollback"):
            resumed = record.get("resumed_from_iteration", 0)
            kept = [old for old in kept if old.get("iteration", 0) <= resumed]
        elif "event" not in record:
            kept.append(record)
    return kept


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a metrics JSONL file, events included; a line cut short by a killed process (or
    anything else that is not a JSON object) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """`effective_records` of a metrics JSONL file (`read_records`)."""
    return effective_records(read_records(path))


# metrics-file key -> TensorBoard/W&B name of a training record: Megatron-LM's names, then this
# framework's extra numbers. Other numeric keys (the straggler report's...) keep their key, with dashes.
TRAINING_SCALARS = {
    "lm_loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "loss_scale": "loss-scale",
    "global_batch_size": "batch-size",
    "world_size": "world-size",
    "num_zeros": "num-zeros",
    "params_norm": "params-norm",
    "tflops_per_device": "throughput",  # Megatron's "throughput": TFLOP/s per GPU
    "tokens_per_sec": "tokens-per-sec",
    "mfu": "mfu",
    "skipped_iterations": "skipped-iterations",
    "total_skipped_iterations": "total-skipped-iterations",
}
NOT_SCALARS = ("iteration", "train_iters", "consumed_samples", "ms_per_iteration")
SAMPLES_AXIS = " vs samples"  # suffix of the series plotted against consumed samples


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _evaluation_prefix(metrics: dict) -> tuple[str, str] | None:
    """(split, TensorBoard name of its loss) of a validation or test record, else None. Validation is
    Megatron's `lm loss validation`; a named group of --valid-weighted-split-paths-path other than
    "valid" is BigCode Megatron-LM's `lm-loss-validation/GROUP/lm loss validation`; the test set is
    `lm loss test` (Megatron-LM writes it under the validation names, mixing the two curves)."""
    if "valid_group" in metrics:
        group = metrics["valid_group"]
        return (
            "valid",
            "lm loss validation" if group == "valid" else f"lm-loss-validation/{group}/lm loss validation",
        )
    if "test_group" in metrics:
        return "test", "lm loss test"
    return None


def megatron_scalars(metrics: dict) -> dict[str, float]:
    """The TensorBoard/W&B scalars of one metrics record (the dict the JSONL line holds), by the names a
    Megatron-LM user's dashboards expect; `SAMPLES_AXIS` series are added by the writers. A value that is
    None (an MFU above 100%) is left out."""
    evaluation = _evaluation_prefix(metrics)
    if evaluation is not None:
        split, name = evaluation
        names = {
            f"{split}_lm_loss": name,
            f"{split}_ppl": f"{name} ppl",
            f"{split}_loss_tokens": f"{name} tokens",
        }
        return {
            names[key]: float(value) for key, value in metrics.items() if key in names and _is_number(value)
        }
    scalars = {}
    if _is_number(metrics.get("ms_per_iteration")):
        scalars["iteration-time"] = metrics["ms_per_iteration"] / 1000.0  # Megatron's unit: seconds
    for key, value in metrics.items():
        if key not in NOT_SCALARS and _is_number(value):
            scalars[TRAINING_SCALARS.get(key, key.replace("_", "-"))] = float(value)
    return scalars


class TensorBoardWriter:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    def write(self, metrics: dict, step: int) -> None:
        """Each scalar at `step` (the iteration) and, as `NAME vs samples`, at the consumed samples."""
        samples = metrics.get("consumed_samples")
        for name, value in megatron_scalars(metrics).items():
            self._writer.add_scalar(name, value, step)
            if samples is not None:
                self._writer.add_scalar(name + SAMPLES_AXIS, value, samples)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise "online" only if the W&B server (WANDB_BASE_URL, default
    api.wandb.ai) accepts a connection within 2 seconds, name lookup included, else "offline"."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (80 if url.scheme == "http" else 443)
    return "online" if _reachable(url.hostname or "api.wandb.ai", port, timeout=2.0) else "offline"


def _reachable(host: str, port: int, *, timeout: float) -> bool:
    """A TCP connection to host:port within `timeout` seconds. The probe runs in a daemon thread: a
    name lookup, which the socket timeout does not bound, cannot hold the run up either."""
    connected: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                connected.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


class WandbWriter:
    """One W&B run per (re)start of training. Every record is logged with its x-axes, `iteration` and
    `samples` (consumed samples), and each name is declared once with `define_metric`: NAME against
    `iteration`, NAME vs samples against `samples`. W&B's own step is left to count rows, so a rollback
    (iterations re-run) or a run resumed into the same W&B run (WANDB_RUN_ID, WANDB_RESUME) never logs
    to a step below an earlier one, which W&B would drop."""

    def __init__(self, logging_config, config_dict: dict, default_dir: str | None) -> None:
        import wandb

        cfg = logging_config
        self.mode = wandb_mode()
        directory = cfg.wandb_save_dir or default_dir
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._run = wandb.init(
            project=cfg.wandb_project_name,
            entity=cfg.wandb_entity_name,
            name=cfg.wandb_exp_name,
            dir=directory,
            config=config_dict,
            mode=self.mode,
        )
        self._run.define_metric("iteration")
        self._run.define_metric("samples")
        self._defined: set[str] = set()
        if self.mode == "offline":
            run_dir = Path(self._run.dir).parent  # run.dir is the run's files/ folder
            logger.info(
                f"> W&B is offline: the run is kept in {run_dir}; upload it later with `wandb sync {run_dir}`"
            )

    def write(self, metrics: dict, step: int) -> None:
        row = {"iteration": step}
        if metrics.get("consumed_samples") is not None:
            row["samples"] = metrics["consumed_samples"]
        for name, value in megatron_scalars(metrics).items():
            row[name] = value
            if "samples" in row:
                row[name + SAMPLES_AXIS] = value
        for name in row.keys() - self._defined - {"iteration", "samples"}:
            axis = "samples" if name.endswith(SAMPLES_AXIS) else "iteration"
            self._run.define_metric(name, step_metric=axis)
            self._defined.add(name)
        self._run.log(row)

    def close(self) -> None:
        self._run.finish()


def _optional_writer(label: str, module: str, factory):
    """Build an optional sink; one log line (and no sink) when its package is missing."""
    try:
        __import__(module)
    except ImportError:
        logger.info(
            f"WARNING: {label} logging was asked for but `{module}` is not installed; "
            f"install the `logging` extra (pip install -e .[logging]) to enable it. Continuing without it."
        )
        return None
    return factory()


class MetricsLogger:
    """Fans one metrics dict out to every configured sink."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    def write(self, metrics: dict, step: int) -> None:
        for writer in self.writers:
            writer.write(metrics, step)

    def event(self, record: dict) -> None:
        """A record that is not a metric (`{"event": "start", ...}`): the JSON lines file only."""
        for writer in self.writers:
            if isinstance(writer, JsonlWriter):
                writer.write(record, 0)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def metrics_jsonl_path(logging_config, save_dir: str | None) -> str | None:
    """`--metrics-jsonl`, else SAVE/metrics.jsonl when `--save` is given, else None."""
    if logging_config.metrics_jsonl:
        return logging_config.metrics_jsonl
    if save_dir:
        return os.path.join(save_dir, "metrics.jsonl")
    return None


def build_metrics_logger(
    logging_config, *, save_dir: str | None, config_dict: dict, is_main_rank: bool = True
) -> MetricsLogger:
    """The sinks asked for by `logging_config` (none on ranks other than the main one)."""
    if not is_main_rank:
        return MetricsLogger([])
    writers: list = []
    jsonl = metrics_jsonl_path(logging_config, save_dir)
    if jsonl:
        writers.append(JsonlWriter(jsonl))
        logger.info(f"> writing metrics to {jsonl}")
    if logging_config.tensorboard_dir:
        writers.append(
            _optional_writer(
                "TensorBoard", "tensorboard", lambda: TensorBoardWriter(logging_config.tensorboard_dir)
            )
        )
    if logging_config.wandb_project_name:
        writers.append(
            _optional_writer(
                "Weights & Biases", "wandb", lambda: WandbWriter(logging_config, config_dict, save_dir)
            )
        )
    return MetricsLogger([writer for writer in writers if writer is not None])
