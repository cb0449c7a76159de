"""Bad steps: loss spikes, the skip list, rollback, the divergence stop and the checkpoint pin.

- Spike (--check-for-spiky-loss): the iteration's loss (all-reduced: the same number on every rank, read
  by the step's one host sync) is above --spiky-loss-factor times the largest of the last
  --spiky-loss-window accepted losses. Megatron-LM's rerun state machine uses the same test (loss >= 10x
  the max) against the max of the run's first 100 losses, kept for good; here the window slides, so a
  spike is judged against the recent loss level rather than the early, high losses of the run. No
  decision is made before the window is full. A spike's update is skipped (the optimizer is not
  stepped) and the loss stays out of the window.
- Skip list (--iterations-to-skip, Megatron-LM's flag; 1-based iterations): the iteration's global batch
  is read from the loader, so consumed samples advance exactly, but nothing is trained and the
  learning-rate schedule does not move (like any skipped update).
- Rollback (--rollback-after-spikes K, --rollback-window W): when K spikes fall within W iterations, the
  iterations from the first to the last of them go on the skip list and the run reloads the newest
  checkpoint taken before the first (model, optimizer, random state, data position) and goes on from
  there, skipping that data.
- Divergence (--max-consecutive-nonfinite N, with --skip-nonfinite): N non-finite steps in a row stop
  the run.
- Pin: the newest checkpoint saved with no non-finite or spiky step since the previous save (or since
  the start) is never deleted by --keep-last-k, so a diverged run keeps a checkpoint to go back to.

Everything a resumed run needs to decide the same way (the loss window, the skip list, the spikes in
the window, the consecutive count, the pin) is saved in the checkpoint's `extra` (`state_dict`), so a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron.log import get_logger
from megatron.training.step import StepOutput, next_micro_batches

logger = get_logger(__name__)

EXTRA_KEY = "bad_steps"  # the entry of a checkpoint's extra holding `BadSteps.state_dict()`


class SpikeDetector:
    """Loss > `factor` x the max of the last `window` accepted losses (see the module docstring)."""

    def __init__(self, factor: float, window: int, recent: list[float] | None = None) -> None:
        if factor <= 0 or window < 1:
            raise ValueError(f"spike detector needs factor > 0 and window >= 1, got {factor}, {window}")
        self.factor, self.window = factor, window
        self.recent: deque[float] = deque(recent or [], maxlen=window)

    @property
    def reference(self) -> float | None:
        """The max of the window once it is full, else None (no decision yet)."""
        return max(self.recent) if len(self.recent) == self.window else None

    def is_spike(self, loss: float) -> bool:
        """Whether `loss` is a spike; a non-finite loss is not (the non-finite check handles it)."""
        reference = self.reference
        return math.isfinite(loss) and reference is not None and loss > self.factor * reference

    def accept(self, loss: float) -> None:
        """Add a trained iteration's loss to the window."""
        if math.isfinite(loss):
            self.recent.append(loss)


@dataclass
class BadSteps:
    """The policy's state over the run (see the module docstring); `state_dict` goes in checkpoints."""

    skip: set[int] = field(default_factory=set)  # --iterations-to-skip plus the rolled-back ranges
    detector: SpikeDetector | None = None
    rollback_after: int | None = None
    rollback_window: int = 100
    spikes: list[int] = field(default_factory=list)  # spike iterations not rolled back yet
    consecutive_nonfinite: int = 0
    clean_since_save: bool = True  # no non-finite or spiky step since the last save (or the start)
    pinned: int | None = None  # the checkpoint --keep-last-k must keep
    _before_save: tuple | None = field(default=None, repr=False)  # (iteration, pinned, clean): last save

    @classmethod
    def from_config(cls, training) -> BadSteps:
        """From `cfg.training` (TrainingConfig)."""
        detector = None
        if training.check_for_spiky_loss:
            detector = SpikeDetector(training.spiky_loss_factor, training.spiky_loss_window)
        return cls(
            skip=set(training.iterations_to_skip or ()),
            detector=detector,
            rollback_after=training.rollback_after_spikes,
            rollback_window=training.rollback_window,
        )

    def skips(self, iteration: int) -> bool:
        """Whether iteration `iteration` (1-based) is on the skip list."""
        return iteration in self.skip

    def is_spike(self, loss: float) -> bool:
        """The step's spike test (`train_step(is_spike=...)`): False without --check-for-spiky-loss."""
        return self.detector is not None and self.detector.is_spike(loss)

    def after_step(self, iteration: int, output) -> tuple[int, int] | None:
        """Account iteration `iteration`'s `StepOutput`; returns the (first, last) iterations to skip
        when its spike completes --rollback-after-spikes within the window, else None."""
        if output.nonfinite:
            self.consecutive_nonfinite += 1
            self.clean_since_save = False
            return None
        self.consecutive_nonfinite = 0
        if not output.spike:
            if self.detector is not None and output.update_successful:
                self.detector.accept(output.lm_loss)
            return None
        self.clean_since_save = False
        self.spikes = [it for it in self.spikes if it > iteration - self.rollback_window] + [iteration]
        if self.rollback_after is not None and len(self.spikes) >= self.rollback_after:
            first, last = self.spikes[0], self.spikes[-1]
            self.spikes = []
            self.skip.update(range(first, last + 1))
            return first, last
        return None

    def on_save(self, iteration: int) -> int | None:
        """A checkpoint of `iteration` is being saved: it becomes the pin when clean. Returns the pin."""
        self._before_save = (iteration, self.pinned, self.clean_since_save)
        if self.clean_since_save:
            self.pinned = iteration
        self.clean_since_save = True
        return self.pinned

    def save_failed(self, iteration: int) -> None:
        """The save of `iteration` failed (it is not on disk): the pin goes back to the one before, and
        the steps before that save count again for the next one."""
        if self._before_save is not None and self._before_save[0] == iteration:
            _, self.pinned, clean = self._before_save
            self.clean_since_save = clean and self.clean_since_save
            self._before_save = None

    def state_dict(self) -> dict:
        """JSON-serialisable (floats round-trip exactly through JSON)."""
        return {
            "iterations_to_skip": sorted(self.skip),
            "recent_losses": list(self.detector.recent) if self.detector is not None else [],
            "spikes": list(self.spikes),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "pinned": self.pinned,
        }

    def load_state_dict(self, state: dict, *, keep_skips: bool = True) -> None:
        """Restore from a checkpoint's `state_dict`; the skip list is the union of both when
        `keep_skips` (a rollback keeps the range it just added)."""
        saved_skips = {int(it) for it in state.get("iterations_to_skip", [])}
        self.skip = self.skip | saved_skips if keep_skips else saved_skips
        if self.detector is not None:
            self.detector.recent = deque(
                (float(v) for v in state.get("recent_losses", [])), maxlen=self.detector.window
            )
        self.spikes = [int(it) for it in state.get("spikes", [])]
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.pinned = state.get("pinned")
        self.clean_since_save = True  # the loaded checkpoint is where the run stands


def sample_range(consumed_before: int, global_batch_size: int) -> str:
    """'samples [a, b)' of one iteration's global batch, for the log lines."""
    return f"samples [{consumed_before}, {consumed_before + global_batch_size})"


def rollback_target(checkpoints: list[tuple[int, object]], first_bad: int) -> int | None:
    """The iteration of the newest checkpoint saved before iteration `first_bad` ran (its iteration is
    below `first_bad`), given (iteration, path) pairs; None when there is none."""
    before = [iteration for iteration, _ in checkpoints if iteration < first_bad]
    return max(before) if before else None


# ---------------------------------------------------------------- the training loop's side (train.py)
def apply_loaded(run, loaded, *, finetune: bool = False) -> None:
    """The run's progress from a loaded checkpoint (its `extra`): iteration, samples, skip counts and
    the bad-step state (the skip list is the union of the run's and the checkpoint's)."""
    run.state.iteration = loaded.iteration
    run.state.consumed_samples = loaded.consumed_samples
    extra = {} if finetune else loaded.extra
    run.state.skipped_iterations = int(extra.get("skipped_iterations", 0))
    run.state.nonfinite_iterations = int(extra.get("nonfinite_iterations", 0))
    run.bad_steps.load_state_dict(extra.get(EXTRA_KEY, {}), keep_skips=True)
    if run.bad_steps.pinned is not None and run.checkpointer is not None:
        run.checkpointer.protected = {run.bad_steps.pinned}


def checkpoint_extra(run) -> dict:
    """What a checkpoint of `run` records beyond model and optimizer: the skip counts and the bad-step
    state; the checkpoint becomes the --keep-last-k pin when no bad step came since the previous one."""
    failed = getattr(run.checkpointer, "failed_iteration", None)
    if failed is not None:  # a save that failed (--on-save-failure continue) pins nothing
        run.bad_steps.save_failed(failed)
    pinned = run.bad_steps.on_save(run.state.iteration)
    if pinned is not None:
        run.checkpointer.protected = {pinned}  # keep-last-k never deletes it
    return {
        "skipped_iterations": run.state.skipped_iterations,
        "nonfinite_iterations": run.state.nonfinite_iterations,
        EXTRA_KEY: run.bad_steps.state_dict(),
    }


def log_spike(run, output: StepOutput) -> None:
    detector = run.bad_steps.detector
    logger.info(
        f"WARNING: iteration {run.state.iteration + 1}: loss spike, lm loss {output.lm_loss:.6E} > "
        f"{detector.factor:g} x {detector.reference:.6E} (the max of the last {detector.window}); update "
        f"skipped, {sample_range(run.state.consumed_samples, run.global_batch_size)} not trained on"
    )


def skip_listed(run, data_iterator) -> StepOutput:
    """An iteration on the skip list: its global batch is read (consumed samples advance), not trained."""
    next_micro_batches(data_iterator, run.num_micro_batches, torch.device("cpu"))
    logger.info(
        f"> iteration {run.state.iteration + 1}: skipped (on the skip list: --iterations-to-skip or a "
        f"rollback): {sample_range(run.state.consumed_samples, run.global_batch_size)} read, not trained on"
    )
    return StepOutput(float("nan"), 0, None, update_successful=False, skipped_by_list=True)


def roll_back(run) -> bool:
    """--rollback-after-spikes (`run.rollback` = the range just put on the skip list): every rank reloads
    the newest complete checkpoint saved before the range's first iteration with `Checkpointer.load` (model,
    optimizer, scheduler, loss scale, random state) and takes the run's progress from it. False (logged,
    training goes on) when no checkpoint precedes the range. The caller finishes pending saves first and
    rebuilds the data iterator after."""
    from megatron.checkpoint.directory import find_checkpoints
    from megatron.checkpoint.files import MANIFEST_FILENAME

    (first, last), run.rollback = run.rollback, None
    run.optimizer.finish_param_sync()  # --overlap-param-gather: no gather may land after the load
    save_dir, now = run.cfg.checkpoint.save, run.state.iteration
    complete = [
        (it, path) for it, path in find_checkpoints(Path(save_dir)) if (path / MANIFEST_FILENAME).is_file()
    ]
    target = rollback_target(complete, first)
    spikes = f"{run.cfg.training.rollback_after_spikes} loss spikes in iterations {first}-{last}"
    if target is None:
        logger.info(f"WARNING: {spikes}, but no checkpoint under {save_dir} precedes them: no rollback")
        return False
    run.watchdog.beat(now, "rolling back: loading a checkpoint")  # --hang-timeout-minutes
    ckpt = run.checkpointer.load(
        save_dir, run.model, run.optimizer, run.scheduler, run.scaler, iteration=target
    )
    apply_loaded(run, ckpt)
    first_sample = ckpt.consumed_samples + (first - 1 - ckpt.iteration) * run.global_batch_size
    skipped = f"[{first_sample}, {first_sample + (last - first + 1) * run.global_batch_size})"
    logger.info(
        f"WARNING: {spikes} (--rollback-after-spikes, --rollback-window {run.cfg.training.rollback_window}): "
        f"rolled back from iteration {now} to {ckpt.directory} (iteration {ckpt.iteration}); iterations "
        f"{first}-{last} (samples {skipped}) will be read and not trained on"
    )
    record = {"event": "rollback", "resumed_from_iteration": ckpt.iteration, "rollback_from": now}
    record.update(skip_first=first, skip_last=last)
    run.metrics.write(record, ckpt.iteration)
    return True
