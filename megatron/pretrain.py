"""Entry point: `python -m megatron.pretrain --config configs/tiny-cpu.yaml --data-path PREFIX ...`, or
`torchrun --nproc-per-node N -m megatron.pretrain ... --tensor-model-parallel-size T
--pipeline-model-parallel-size P [--sequence-parallel]` for tensor, pipeline and data parallelism
(data-parallel size = N / (T x P)). Multi-node: one torchrun per node (c10d rendezvous), or under SLURM
one `srun` task per GPU running `python -m megatron.pretrain` directly (`megatron.launch` derives the
ranks from SLURM_*; the batch script exports MASTER_ADDR). See examples/.

The config is parsed and validated before torch is imported, so a bad flag fails (exit status 2) in a
fraction of a second; the tokenizer is checked against the vocabulary next, and only then are the process
groups created (a user error never leaves ranks waiting on each other). Errors found while building the
run also exit with status 2; ranks that do not all meet at the rendezvous within
--distributed-timeout-minutes, or a non-finite loss or gradient norm, exit with status 1.

Restarts (`megatron.training.restarts`): under `torchrun --max-restarts N` (or a SLURM recipe that
retries srun) a lost rank brings the whole group back from the newest checkpoint. A rank whose collective
fails because a peer died exits with status 1 at once, without saving ("peer lost"); a SIGTERM with every
peer alive (a preemption) saves and exits 0. Each start and failure is recorded in SAVE/restarts.jsonl,
and the metrics JSONL gets a start marker; a launch that keeps failing at one iteration is summarised
("crash loop: ..."). An error that ends the run also goes to torchrun's error file (`@record`).

`--dry-run` prints the memory and time plan of `megatron.planner` for the config and layout (WORLD_SIZE,
or --data-parallel-size without it, else 1, sets the data-parallel size; the plan says which) and exits 0
before the tokenizer check and the process groups; it needs no data or tokenizer paths.

A run resumed (--load) from a checkpoint at --train-iters exits 0 at once ("already finished"), one from
a checkpoint past it exits 2 naming the iteration; both read the tracker file before any process group.
"""

from __future__ import annotations

import os
import sys

from megatron.checkpoint.ownership import check_before_start
from megatron.config import ConfigError, exit_with_error, parse_config
from megatron.launch import apply_launch
from megatron.log import get_logger, set_logging
from megatron.training.vocab import checked_tokenizer

logger = get_logger(__name__)


def _summary_line(summary) -> str:
    text = (
        f"> training done: {summary.iterations} iterations, {summary.consumed_samples} samples, "
        f"{summary.skipped_iterations} skipped, last lm loss {summary.final_lm_loss:.4f}, "
        f"{summary.seconds:.1f} s"
    )
    if summary.first_valid_lm_loss is not None and summary.last_valid_lm_loss is not None:
        ratio = summary.last_valid_lm_loss / summary.first_valid_lm_loss
        text += (
            f"; validation loss {summary.first_valid_lm_loss:.4f} -> {summary.last_valid_lm_loss:.4f} "
            f"({100.0 * ratio:.1f}% of the first)"
        )
    return text


def collective_timeout_minutes(cfg) -> float:
    """The collectives' timeout: --distributed-timeout-minutes, raised to --hang-timeout-minutes + 2 while
    the hang watchdog is on, so that a rank stuck inside a collective is reported by the watchdog (every
    rank's stacks, the stuck rank named) before the collective's own timeout error ends the run without
    them. The rendezvous keeps --distributed-timeout-minutes."""
    timeout = cfg.parallel.distributed_timeout_minutes
    hang = cfg.training.hang_timeout_minutes
    return max(timeout, hang + HANG_MARGIN_MINUTES) if hang else timeout


HANG_MARGIN_MINUTES = 2.0


def _initialize(cfg):
    """Join the process group and build the tensor/data-parallel groups (after every input check)."""
    from megatron.parallel.state import ParallelState

    parallel = cfg.parallel
    state = ParallelState.initialize(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        backend=parallel.distributed_backend,
        timeout_minutes=parallel.distributed_timeout_minutes,
        collective_timeout_minutes=collective_timeout_minutes(cfg),
    )
    set_logging(state.is_main_rank)
    return state


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the run, train, print a summary. Returns the process exit status."""
    # paths are checked below, after the dry-run exit: a dry run plans from the flags alone (no data,
    # tokenizer or process group)
    try:
        # under srun (one task per GPU) derive RANK/WORLD_SIZE/LOCAL_RANK/MASTER_PORT from SLURM_*, so the
        # config is validated against the real world size; the rendezvous variables are required later,
        # when the process group is created (a dry run needs none)
        apply_launch(require_rendezvous=False)
    except ValueError as error:
        exit_with_error(str(error))
    cfg = parse_config(argv, check_paths=False)
    if cfg.training.dry_run:
        return _dry_run(cfg)
    try:
        cfg.data.check_paths()  # what parse_config(argv) checks last, so the same errors in the same order
    except ConfigError as error:
        exit_with_error(str(error))
    try:
        tokenizer, _ = checked_tokenizer(cfg)  # before torch is imported: fails fast
        # --save writable, not locked by another run, holding no other run's checkpoints (every rank)
        check_before_start(cfg.checkpoint)
        finished = _run_end_check(cfg, tracked_iteration(cfg.checkpoint))
        if finished is not None:  # the checkpoint to resume is at or past --train-iters: nothing to train
            return finished
        state = _initialize(cfg)  # only after every input check
    except ValueError as error:
        return _error(error, 2)
    except RuntimeError as error:  # RendezvousError: the ranks did not all meet within the timeout
        return _error(error, 1)
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        # @record: an exception that ends the run is written to torchrun's error file for its summary
        return record(_train)(cfg, tokenizer, state)
    finally:
        state.destroy()


def tracked_iteration(ckpt) -> int | None:
    """The iteration a resumed run will start from, read cheaply before any process group: the one
    --load's tracker file names when its directory exists (None without --load, with --finetune, or when
    the load itself must decide: no tracker, 'release', an unreadable tracker, a missing directory)."""
    from megatron.checkpoint.directory import checkpoint_dir, read_tracker

    if not ckpt.load or ckpt.finetune:
        return None
    try:
        tracked = read_tracker(ckpt.load)
    except (OSError, ValueError):  # the load reports it, with its own message
        return None
    if not isinstance(tracked, int) or not checkpoint_dir(ckpt.load, tracked).is_dir():
        return None
    return tracked


def _run_end_check(cfg, iteration: int | None) -> int | None:
    """None when a run resumed at `iteration` has iterations left to train. Otherwise the exit status, the
    reason logged: 0 when the run already finished there (the run length equals the iteration: a rerun of
    a finished run), 2 when the checkpoint is past the run's end (it would train nothing). Every rank
    reads the same iteration, so every rank exits alike."""
    target = cfg.num_train_iters
    if iteration is None or iteration < target:
        return None
    train, load = cfg.training, cfg.checkpoint.load
    if train.train_iters is not None:
        length, more = f"--train-iters {target}", f"--train-iters > {iteration}"
    else:
        batch = train.global_batch_size
        length = f"--train-samples {train.train_samples}: {target} iterations of global batch {batch}"
        more = f"--train-samples >= {(iteration + 1) * batch}"
    if iteration == target:
        if os.environ.get("RANK", "0") == "0":
            logger.info(
                f"> already finished at iteration {iteration} ({length}; checkpoint in --load {load}): "
                f"nothing to train; pass {more} to train further"
            )
        return 0
    return _error(
        ConfigError(
            f"--load {load} holds a checkpoint at iteration {iteration}, past the end of this run "
            f"({length}), so it would train nothing; pass {more} to continue training it, or --finetune "
            "to start a new run from its weights"
        ),
        2,
    )


def _dry_run(cfg) -> int:
    from megatron.planner import format_plan, plan

    try:
        print(format_plan(plan(cfg, cfg.training.dry_run_gpu, cfg.training.dry_run_mfu)), flush=True)
    except ValueError as error:
        return _error(error, 2)
    return 0


def _failed(error: Exception, cfg, state, *, completed: int, reraise: bool = True) -> int:
    """Training ended with an exception: a lost peer exits with status 1 without saving (the launcher
    restarts the job); any other error is re-raised after the restart history records it."""
    from megatron.training import restarts

    peer_lost = restarts.on_failure(
        error, parallel_state=state, completed=completed, save_dir=cfg.checkpoint.save
    )
    if peer_lost or not reraise:
        return 1
    raise error


def worker_error_message(error: Exception) -> str:
    """The message of `error` without the worker traceback a DataLoader's re-raise wraps around it."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else ""
    name = type(error).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last


def _error(error: Exception | str, status: int) -> int:
    logger.error(f"error: {error}")
    return status


def _train(cfg, tokenizer, state) -> int:
    from megatron.data.token_ids import TokenIdError
    from megatron.training.saving import SaveFailedError
    from megatron.training.train import NonFiniteError, build_run, train

    try:
        run = build_run(cfg, state, tokenizer=tokenizer)
    except ValueError as error:
        return _error(error, 2)
    except Exception as error:  # e.g. a peer lost while loading the checkpoint
        return _failed(error, cfg, state, completed=0)
    # what the tracker could not tell (an untracked checkpoint of this job, a fallback to an older one)
    finished = None if cfg.checkpoint.finetune else _run_end_check(cfg, run.state.iteration)
    if finished is not None:
        run.metrics.close()
        if run.checkpointer is not None:
            run.checkpointer.release()
        return finished
    try:
        summary = train(run)
    except TokenIdError as error:  # a dataset built with another tokenizer, found mid-run
        return _error(worker_error_message(error), 2)
    except (NonFiniteError, SaveFailedError) as error:
        _failed(error, cfg, state, completed=run.state.iteration, reraise=False)
        return _error(error, 1)
    except Exception as error:
        return _failed(error, cfg, state, completed=run.state.iteration)
    finally:
        run.metrics.close()
    logger.info(_summary_line(summary))  # printed by the main rank only (set_logging)
    return 0


if __name__ == "__main__":
    sys.exit(main())
