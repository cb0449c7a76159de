"""The training loop: steps, periodic logging, evaluation and checkpointing.

`pretrain(cfg)` is the whole run from a validated `Config`; `build_run(cfg)` and `train(run)` are its two
halves, used by tests to drive the loop with a prepared model or data.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from megatron.log import get_logger
from megatron.parallel.collectives import all_reduce
from megatron.parallel.debug import check_replicas
from megatron.parallel.state import ParallelState
from megatron.training import builders, code_eval, restarts, saving, spikes, stragglers
from megatron.training.evaluate import evaluate, perplexity
from megatron.training.faults import Faults
from megatron.training.metrics import (
    IntervalStats,
    MetricsLogger,
    Throughput,
    build_metrics_logger,
    format_training_line,
    log_interval_metrics,
)
from megatron.training.optimizer import PRECISION_DTYPES
from megatron.training.spikes import BadSteps
from megatron.training.step import StepOutput, next_micro_batches, train_step
from megatron.training.vocab import checked_tokenizer
from megatron.training.watchdog import Watchdog

logger = get_logger(__name__)


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm stopped the run (without --skip-nonfinite)."""


@dataclass
class TrainState:
    """Progress of the run; what a checkpoint restores."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0  # fp16 overflows, non-finite steps (--skip-nonfinite), spikes, skip list
    nonfinite_iterations: int = 0


@dataclass
class Run:
    """Everything the loop needs, built once by `build_run`."""

    cfg: object
    parallel_state: ParallelState
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    scaler: object
    tokenizer: object
    data: builders.DataSplits
    train_iters: int
    num_micro_batches: int
    global_batch_size: int
    throughput: Throughput
    metrics: MetricsLogger
    state: TrainState = field(default_factory=TrainState)
    losses: list[float] = field(default_factory=list)  # lm loss of every iteration (for tests)
    valid_history: list[dict] = field(default_factory=list)
    eval_loaders: dict = field(default_factory=dict)
    schedule_logged: bool = False  # --log-pipeline-schedule prints the first iteration only
    checkpointer: object | None = None  # megatron.checkpoint.Checkpointer with --save / --load
    stop_requested: bool = False  # SIGTERM arrived: save and exit after the current iteration
    bad_steps: BadSteps = field(default_factory=BadSteps)  # spikes, skip list, divergence, the pin
    rollback: tuple[int, int] | None = None  # spikes asked to roll back and skip these iterations
    faults: Faults = field(default_factory=Faults)  # test-only MEGATRON_FAULTS (inactive when unset)
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(0))  # --hang-timeout-minutes (0: off)


def _throughput(cfg, vocab_size: int, parallel_state: ParallelState, global_batch: int) -> Throughput:
    from megatron.model import flops

    dtype, peak_tflops = PRECISION_DTYPES[cfg.training.precision], cfg.training.peak_tflops
    peak, name = flops.device_peak_flops(parallel_state.device, dtype, peak_tflops=peak_tflops)
    return Throughput(
        tokens_per_iteration=global_batch * cfg.model.seq_length,
        flops_per_token=flops.flops_per_token(cfg.model, vocab_size),
        world_size=parallel_state.world_size,
        peak_flops=peak,
        peak_name=name,
    )


def build_run(cfg, parallel_state: ParallelState | None = None, *, tokenizer=None) -> Run:
    """Seed, tokenizer (unless given), data, model, optimizer, scheduler, metrics sinks, and the
    checkpoint to resume."""
    parallel_state = parallel_state or ParallelState.single()
    faults = Faults.from_env()  # test-only MEGATRON_FAULTS: a bad value fails before anything is built
    # the batch arithmetic is the config's: the process groups must have the layout it was validated for
    dp_sizes = (parallel_state.data_parallel_size, cfg.data_parallel_size)
    assert dp_sizes[0] == dp_sizes[1], f"data-parallel size {dp_sizes[0]}, config validated for {dp_sizes[1]}"
    # --save claimed (run lock, no other run's checkpoints) before anything is written there
    checkpointer = saving.build_checkpointer(cfg, parallel_state, faults)
    builders.set_seed(cfg.training.seed, parallel_state)
    builders.log_config_notes(cfg)
    if tokenizer is None:
        tokenizer, vocab_size = checked_tokenizer(cfg)
    else:
        from megatron.config import check_vocab_size

        vocab_size = check_vocab_size(cfg, tokenizer.vocab_size)
    logger.info(f"> tokenizer {tokenizer.name}: {tokenizer.vocab_size} tokens, model vocabulary {vocab_size}")
    data = builders.build_data(cfg, tokenizer, parallel_state)
    model = builders.build_model(cfg, vocab_size, parallel_state)
    optimizer, scheduler, scaler = builders.build_optimization(cfg, model, parallel_state)
    global_batch = cfg.training.global_batch_size
    run = Run(
        cfg=cfg,
        parallel_state=parallel_state,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        tokenizer=tokenizer,
        data=data,
        train_iters=cfg.num_train_iters,
        num_micro_batches=cfg.num_micro_batches,
        global_batch_size=global_batch,
        throughput=_throughput(cfg, vocab_size, parallel_state, global_batch),
        metrics=build_metrics_logger(
            cfg.logging,
            save_dir=cfg.checkpoint.save,
            config_dict=cfg.to_dict(),
            is_main_rank=parallel_state.is_main_rank,
        ),
        faults=faults,
        watchdog=Watchdog.for_run(cfg.training.hang_timeout_minutes, parallel_state, cfg.checkpoint.save),
    )
    # The training random stream (dropout) starts from the seed whatever building consumed (e.g. the
    # CPU peak measurement runs only once per process); a resumed run then restores it from the checkpoint.
    builders.set_seed(cfg.training.seed, parallel_state)
    run.bad_steps = BadSteps.from_config(cfg.training)
    run.checkpointer = checkpointer
    with run.watchdog.armed(0, "loading checkpoint"):
        _maybe_load(run)
    return run


def _maybe_load(run: Run) -> None:
    ckpt = run.cfg.checkpoint
    if not ckpt.load:
        return
    loaded = run.checkpointer.load(
        ckpt.load,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler,
        finetune=ckpt.finetune,
        load_optim=not ckpt.no_load_optim,
        load_rng=not ckpt.no_load_rng,
    )
    if loaded is None:
        logger.info(
            f"WARNING: --load {ckpt.load} holds no checkpoint (no tracker file); starting from scratch"
        )
        return
    spikes.apply_loaded(run, loaded, finetune=ckpt.finetune)
    what = (
        "weights only (--finetune), iteration reset to 0"
        if ckpt.finetune
        else f"iteration {loaded.iteration}"
    )
    logger.info(f"> loaded checkpoint {loaded.directory}: {what}")


def save(run: Run, *, final: bool = False) -> None:
    """Checkpoint the run under --save (every rank writes its shards); with --async-save the write
    continues in the background and the previous pending save is finished first. A failed save (a full
    disk...) stops the run or is logged and training goes on, per --on-save-failure (`saving`)."""
    from megatron.checkpoint.checkpointer import CheckpointError

    start = time.perf_counter()
    finish_saving(run, saving_now=True)
    run.watchdog.beat(run.state.iteration, f"saving checkpoint iter_{run.state.iteration:07d}")
    run.optimizer.finish_param_sync()  # --overlap-param-gather: the parameters are read below
    try:
        directory = _write_checkpoint(run)
    except CheckpointError as error:
        saving.save_failed(run, error, final=final)
        return
    seconds = time.perf_counter() - start
    if run.cfg.checkpoint.async_save:
        logger.info(
            f"> started saving checkpoint {directory} in the background ({seconds:.2f} s of training stall)"
        )
    else:
        logger.info(f"> saved checkpoint {directory} in {seconds:.2f} s")


def _write_checkpoint(run: Run):
    return run.checkpointer.save(
        run.cfg.checkpoint.save,
        run.state.iteration,
        run.model,
        run.optimizer,
        run.scheduler,
        run.scaler,
        consumed_samples=run.state.consumed_samples,
        config=run.cfg.to_dict(),
        extra=spikes.checkpoint_extra(run),
    )


def finish_saving(run: Run, *, final: bool = False, saving_now: bool = False) -> None:
    """Wait for a background save (--async-save); its failure is handled here as a failed save is
    (--on-save-failure; `final`: the run's last save, whose failure stops the run)."""
    from megatron.checkpoint.checkpointer import CheckpointError

    if run.checkpointer is None:
        return
    run.watchdog.beat(run.state.iteration, "waiting for the checkpoint save")
    try:
        directory = run.checkpointer.wait()
    except CheckpointError as error:
        saving.save_failed(run, error, final=final, saving_now=saving_now)
        return
    if directory is not None and run.cfg.checkpoint.async_save:
        logger.info(f"> saved checkpoint {directory} (background write complete)")


def run_evaluation(run: Run, *, split: str = "valid") -> list[dict]:
    """Evaluate every validation group (or the test set); log and record one metrics dict per group."""
    cfg = run.cfg
    if cfg.training.eval_iters <= 0:
        return []
    run.optimizer.finish_param_sync()  # --overlap-param-gather (a forward would also wait)
    groups = run.data.valid if split == "valid" else [("test", run.data.test)] if run.data.test else []
    results = []
    for name, dataset in groups:
        if dataset is None:
            continue
        key = (split, name)
        run.watchdog.beat(run.state.iteration, f"evaluation ({split}, {name})")
        if key not in run.eval_loaders:  # built once: persistent workers are reused by each evaluation
            run.eval_loaders[key] = builders.build_loader(
                cfg, dataset, run.tokenizer, run.parallel_state, consumed_samples=0, cyclic=True
            )
        loss, tokens = evaluate(
            run.model,
            run.eval_loaders[key],
            eval_iters=cfg.training.eval_iters,
            num_micro_batches=run.num_micro_batches,
            parallel_state=run.parallel_state,
        )
        metrics = {
            "iteration": run.state.iteration,
            "consumed_samples": run.state.consumed_samples,
            f"{split}_group": name,
            f"{split}_lm_loss": loss,
            f"{split}_ppl": perplexity(loss),
            f"{split}_loss_tokens": tokens,
        }
        logger.info(
            f" {split} loss at iteration {run.state.iteration} [{name}] | lm loss: {loss:.6E} | "
            f"lm loss PPL: {perplexity(loss):.3f}"
        )
        run.metrics.write(metrics, run.state.iteration)
        results.append(metrics)
    if split == "valid":
        run.valid_history.extend(results)
    return results


def _handle_nonfinite(run: Run, output: StepOutput) -> None:
    """Stop the run, or count the skipped step under --skip-nonfinite (and stop after
    --max-consecutive-nonfinite of them in a row). Stopping saves nothing: the last checkpoint stays the
    newest, and the last one before the non-finite steps is kept by --keep-last-k."""
    training, iteration = run.cfg.training, run.state.iteration + 1
    value = {"loss": output.lm_loss, "grad norm": output.grad_norm}.get(output.nonfinite)
    what = f"non-finite {output.nonfinite}" + (f" ({value})" if value is not None else "")
    if output.nonfinite_where:
        what += "; non-finite local gradients on " + "; ".join(output.nonfinite_where)
    consecutive = run.bad_steps.consecutive_nonfinite
    if not training.skip_nonfinite or consecutive >= training.max_consecutive_nonfinite:
        finish_saving(run)  # a background save of an earlier iteration completes; nothing new is saved
        kept = (
            f"; the last checkpoint before them is iteration {run.bad_steps.pinned}"
            if run.bad_steps.pinned
            else ""
        )
        if not training.skip_nonfinite:
            why = "Lower --lr, check the data, or pass --skip-nonfinite to skip such steps"
        else:
            why = (
                f"{consecutive} consecutive non-finite iterations (--max-consecutive-nonfinite "
                f"{training.max_consecutive_nonfinite}): the run has diverged; nothing saved{kept}"
            )
        raise NonFiniteError(f"iteration {iteration}: {what}; stopping. {why}")
    run.state.nonfinite_iterations += 1
    logger.info(
        f"WARNING: iteration {iteration}: {what}; step skipped (--skip-nonfinite), "
        f"{run.state.nonfinite_iterations} so far, {consecutive} in a row"
    )


def _after_step(run: Run, output: StepOutput) -> None:
    """Bad-step accounting of a trained iteration: non-finite (stop or count), spike (log; a rollback
    when --rollback-after-spikes is reached)."""
    run.rollback = run.bad_steps.after_step(run.state.iteration + 1, output)
    if output.nonfinite:
        _handle_nonfinite(run, output)
    if output.spike:
        spikes.log_spike(run, output)


def _train_step(run: Run, data_iterator) -> StepOutput:
    """Read the global batch and train on it (`train_step`), then the bad-step accounting."""
    batches = next_micro_batches(data_iterator, run.num_micro_batches, run.parallel_state.device)
    run.watchdog.beat(run.state.iteration + 1, "forward/backward")
    trace = [] if run.cfg.logging.log_pipeline_schedule and not run.schedule_logged else None
    training = run.cfg.training
    output = train_step(
        run.model,
        run.optimizer,
        batches,
        run.parallel_state,
        trace=trace,
        stop_requested=lambda: run.stop_requested,
        faults=run.faults,
        check_grads=training.check_for_nan_in_loss_and_grad and training.precision != "fp16",
        is_spike=run.bad_steps.is_spike if training.check_for_spiky_loss else None,
    )
    if trace is not None:
        _print_schedule(run.parallel_state, trace)
        run.schedule_logged = True
    _after_step(run, output)
    return output


def _one_iteration(run: Run, data_iterator, stats: IntervalStats) -> StepOutput:
    start, waited = time.perf_counter(), stragglers.host_wait_seconds()
    if run.faults.active:  # MEGATRON_FAULTS (tests): kill, hang or slow this rank; arm nan and spike
        run.faults.at_iteration_start(run)
    run.watchdog.beat(run.state.iteration + 1, "waiting for data")
    lr = run.optimizer.param_groups[0]["lr"]
    if run.bad_steps.skips(run.state.iteration + 1):
        output = spikes.skip_listed(run, data_iterator)
    else:
        output = _train_step(run, data_iterator)
    if output.update_successful:
        run.scheduler.step(run.global_batch_size)
    else:
        run.state.skipped_iterations += 1
    run.state.iteration += 1
    run.state.consumed_samples += run.global_batch_size
    run.losses.append(output.lm_loss)
    waited = stragglers.host_wait_seconds() - waited
    stats.add(output, time.perf_counter() - start, lr=lr, skipped=not output.update_successful, waited=waited)
    return output


def _print_schedule(state: ParallelState, trace: list) -> None:
    """--log-pipeline-schedule: this rank's forward/backward order (every rank prints, not only rank 0)."""
    from megatron.parallel.pipeline import format_trace

    line = (
        f"[rank {state.rank}: pipeline stage {state.pipeline_model_parallel_rank}, tensor rank "
        f"{state.tensor_model_parallel_rank}, data rank {state.data_parallel_rank}] schedule: {format_trace(trace)}"
    )
    sys.stdout.write(line + "\n")  # one write: ranks sharing a pipe do not cut into each other's line
    sys.stdout.flush()


def _log_interval(run: Run, stats: IntervalStats) -> None:
    metrics = log_interval_metrics(run, stats)  # a collective with --log-params-norm/--log-num-zeros-in-grad
    logger.info(format_training_line(metrics))
    metrics.update(stragglers.log_interval(run.cfg.logging, stats, run.parallel_state, run.state.iteration))
    run.metrics.write(metrics, run.state.iteration)
    stats.reset()


def _periodic(run: Run, stats: IntervalStats) -> bool:
    """Log / evaluate / save after an iteration; True when --exit-interval says stop."""
    cfg, it = run.cfg, run.state.iteration
    if it % cfg.logging.log_interval == 0:
        _log_interval(run, stats)
    if cfg.training.eval_iters > 0 and it % cfg.training.eval_interval == 0:
        run_evaluation(run)
    code_eval.maybe_evaluate_code(run)
    if cfg.checkpoint.save and cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
        save(run)
    check = cfg.parallel.check_replicas_interval
    if check and it % check == 0:
        run.optimizer.finish_param_sync()  # --overlap-param-gather: compare the gathered parameters
        compared = check_replicas(run.model, run.parallel_state, iteration=it)
        logger.info(f"> replica check at iteration {it}: {compared} parameter replicas bit-identical")
    exit_interval = cfg.training.exit_interval
    return bool(exit_interval and it % exit_interval == 0)


@dataclass
class TrainSummary:
    """What `train` reports at the end."""

    iterations: int
    consumed_samples: int
    skipped_iterations: int
    final_lm_loss: float
    first_valid_lm_loss: float | None
    last_valid_lm_loss: float | None
    seconds: float
    exited_early: bool = False


def train(run: Run) -> TrainSummary:
    """Train from `run.state` to `run.train_iters` (or --exit-interval); evaluate and save at the end.
    The hang watchdog (--hang-timeout-minutes) watches from here to the end. The --save lock is
    released at the end, also when training fails."""
    try:
        with run.watchdog.armed(run.state.iteration, "starting training"):
            return _train(run)
    finally:
        if run.checkpointer is not None:
            run.checkpointer.release()


def _train(run: Run) -> TrainSummary:
    start = time.perf_counter()
    _log_start(run)
    restarts.mark_start(run)  # the (re)start marker in the metrics JSONL and the restart history
    data_iterator = _train_iterator(run)
    if run.state.iteration == 0:
        run_evaluation(run)
    stats, exited = IntervalStats(), False
    with _sigterm_requests_stop(run):
        while run.state.iteration < run.train_iters and not exited:
            output = _one_iteration(run, data_iterator, stats)
            if run.rollback is not None:  # --rollback-after-spikes
                finish_saving(run)
                if spikes.roll_back(run):
                    save(run)  # the checkpoint again, now with the skip list: a restart skips it too
                    data_iterator = _train_iterator(run)
                    stats.reset()
                    continue
            exited = _periodic(run, stats)
            if not exited and _stop_requested(run, output):
                exited = "signal"
        if stats.iterations:  # the last, partial log interval
            _log_interval(run, stats)
        _finish(run, exited)
    return _summary(run, time.perf_counter() - start, bool(exited))


def _train_iterator(run: Run):
    """An iterator over the training split from `run.state.consumed_samples` on."""
    rank = run.parallel_state.rank  # MEGATRON_FAULTS data_hang (tests) wraps the split
    train_data = run.faults.wrap_dataset(
        run.data.train, samples_per_iteration=run.global_batch_size, rank=rank
    )
    loader = builders.build_loader(
        run.cfg,
        train_data,
        run.tokenizer,
        run.parallel_state,
        consumed_samples=run.state.consumed_samples,
        cyclic=False,
    )
    with torch.random.fork_rng(devices=[]):  # creating the iterator draws from the global RNG
        return iter(loader)


class _sigterm_requests_stop:
    """While training, SIGTERM (SLURM's preemption notice, `kill`) asks the loop to stop after the current
    iteration, save and exit cleanly, instead of dying mid-step. Only in the main thread (Python runs
    signal handlers there)."""

    def __init__(self, run: Run) -> None:
        self.run, self.previous = run, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.run.stop_requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _stop_requested(run: Run, output: StepOutput) -> bool:
    """True when any rank got SIGTERM. With several ranks, the flags polled after the iteration's backward
    were summed over all ranks inside the step and read with its one host sync, so every rank sees the
    same answer and they save and stop together (a signal arriving later is acted on one iteration later);
    one process reads its own flag now."""
    if run.parallel_state.world_size == 1:
        return run.stop_requested
    return output.stop_requested


def _log_start(run: Run) -> None:
    cfg, tp = run.cfg, run.throughput
    num_params = logical_num_parameters(run.model, run.parallel_state)
    logger.info(f"> parallel layout: {run.parallel_state.describe()}")
    logger.info(
        f"> model: {num_params:,} parameters, {tp.flops_per_token / 1e9:.3f} GFLOP per token (fwd+bwd); "
        f"{cfg.training.precision} on {run.parallel_state.device}"
    )
    logger.info(f"> MFU reference: {tp.peak_name}, peak {tp.peak_flops / 1e12:.3f} TFLOP/s")
    logger.info(
        f"> training {run.train_iters} iterations from iteration {run.state.iteration}: global batch "
        f"{run.global_batch_size} = micro batch {cfg.training.micro_batch_size} x {run.num_micro_batches} "
        f"accumulation steps x data-parallel {run.parallel_state.data_parallel_size}, seq length "
        f"{cfg.model.seq_length}"
    )


def logical_num_parameters(model: torch.nn.Module, parallel_state: ParallelState) -> int:
    """Parameters of the whole (unsplit) model: each tensor-parallel shard counted at its full shape, the
    pipeline stages summed, the last stage's copy of the tied word embedding not counted again.
    Collective over the pipeline group."""
    local = sum(
        math.prod(getattr(p, "full_shape", p.shape))
        for p in model.parameters()
        if not getattr(p, "pipeline_duplicate", False)
    )
    total = torch.tensor(float(local), dtype=torch.float64, device=parallel_state.device)
    return int(all_reduce(total, parallel_state.pp_group).item())


def _finish(run: Run, exited) -> None:
    """Final evaluation and checkpoint. `exited`: False (ran to the end), True (--exit-interval) or
    "signal" (SIGTERM): the last two skip the final evaluation, every case saves."""
    cfg, it = run.cfg, run.state.iteration
    run.optimizer.finish_param_sync()  # --overlap-param-gather: the run ends with gathered parameters
    evaluated = cfg.training.eval_iters > 0 and it % cfg.training.eval_interval == 0
    if not evaluated and not exited:
        run_evaluation(run)
    if not exited:
        run_evaluation(run, split="test")
    saved = cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0
    if cfg.checkpoint.save and (not saved or run.checkpointer.failed_iteration == it):
        save(run, final=True)  # also retries a failed save of this iteration
    finish_saving(run, final=True)
    if exited == "signal":
        logger.info(
            f"> SIGTERM: stopped at iteration {it}"
            + (" after saving a checkpoint" if cfg.checkpoint.save else "")
        )
    elif exited:
        logger.info(f"> exiting at iteration {it} (--exit-interval {cfg.training.exit_interval})")


def _summary(run: Run, seconds: float, exited: bool) -> TrainSummary:
    valid = [m["valid_lm_loss"] for m in run.valid_history]
    finite = [loss for loss in run.losses if math.isfinite(loss)]
    return TrainSummary(
        iterations=run.state.iteration,
        consumed_samples=run.state.consumed_samples,
        skipped_iterations=run.state.skipped_iterations,
        final_lm_loss=finite[-1] if finite else float("nan"),
        first_valid_lm_loss=valid[0] if valid else None,
        last_valid_lm_loss=valid[-1] if valid else None,
        seconds=seconds,
        exited_early=exited,
    )


def pretrain(cfg, parallel_state: ParallelState | None = None) -> TrainSummary:
    """The whole run for a validated config; closes the metrics sinks however it ends."""
    run = build_run(cfg, parallel_state)
    try:
        return train(run)
    finally:
        run.metrics.close()
