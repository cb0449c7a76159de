"""The training loop's side of checkpoint safety: claiming --save before anything is written there (the
run lock and the ownership checks of `Checkpointer.claim`), and what a failed save does
(--on-save-failure). See docs/resilience.md ("Checkpoint ownership, full disks and failing storage").
"""

from __future__ import annotations

from megatron.checkpoint.directory import checkpoint_dir, read_tracker
from megatron.log import get_logger

logger = get_logger(__name__)


class SaveFailedError(RuntimeError):
    """A checkpoint save failed and the run stops: --on-save-failure stop, or the final save (the run
    would otherwise end with its last iterations unsaved). The previous checkpoint is intact."""


def build_checkpointer(cfg, parallel_state, faults=None):
    """The run's Checkpointer (None without --save and --load), with --save claimed: collective; every
    rank raises the same ValueError when another run holds the lock or --save holds another run's
    checkpoints (see `Checkpointer.claim`)."""
    ckpt = cfg.checkpoint
    if not (ckpt.save or ckpt.load):
        return None
    from megatron.checkpoint.checkpointer import Checkpointer

    checkpointer = Checkpointer(
        parallel_state, async_save=ckpt.async_save, keep_last_k=ckpt.keep_last_k, faults=faults
    )
    checkpointer.claim(
        ckpt.save,
        load_dir=ckpt.load,
        finetune=ckpt.finetune,
        overwrite=ckpt.overwrite_checkpoints,
        lock_stale_minutes=ckpt.lock_stale_minutes,
    )
    return checkpointer


def _previous(save_dir) -> str:
    try:
        tracked = read_tracker(save_dir)
    except (OSError, ValueError):
        tracked = None
    if tracked is None:
        return "There is no earlier checkpoint under --save"
    return f"The previous checkpoint, {checkpoint_dir(save_dir, tracked)}, is intact and still tracked"


def save_failed(run, error: Exception, *, final: bool, saving_now: bool = False) -> None:
    """A save raised CheckpointError (every rank gets the same one): stop with SaveFailedError (the final
    save, or --on-save-failure stop), or log it and go on (the next --save-interval tries again;
    `saving_now`: a background save's failure found as the next save starts, which is the retry)."""
    ckpt, iteration = run.cfg.checkpoint, run.state.iteration
    previous = _previous(ckpt.save)
    if final or ckpt.on_save_failure == "stop":
        why = "the final checkpoint could not be saved" if final else "--on-save-failure stop"
        raise SaveFailedError(f"{error}. {previous}. Stopping ({why})") from error
    interval = ckpt.save_interval
    retry = f"iteration {(iteration // interval + 1) * interval}" if interval else "the end of training"
    if not interval or (iteration // interval + 1) * interval >= run.train_iters:
        retry = f"the final save (iteration {run.train_iters})"
    if saving_now:
        retry = f"iteration {iteration} (starting now)"
    logger.info(
        f"WARNING: {error}. {previous}. Training continues (--on-save-failure continue); the next save "
        f"attempt is at {retry}"
    )
