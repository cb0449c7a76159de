"""Megatron/BigCode flags that existing launch scripts pass but that have no effect here.

They are accepted (so the scripts keep working) and reported once by `Config.notes()`. Anything not in
this table or in the config dataclasses is rejected.
"""

from __future__ import annotations

_FUSION = "Megatron's fused CUDA kernels are not used here (--torch-compile fuses these operations)"
_LOGGING = "not implemented; the standard metrics are logged every --log-interval"
_ALWAYS_LOGGED = "always written to TensorBoard and W&B (see docs/observability.md)"

# flag name (without dashes) -> (takes a value, why it has no effect)
NO_EFFECT_FLAGS: dict[str, tuple[bool, str]] = {
    "DDP-impl": (True, "gradients are reduced by this framework's own data-parallel code"),
    "no-bias-gelu-fusion": (False, _FUSION),
    "no-bias-dropout-fusion": (False, _FUSION),
    "no-masked-softmax-fusion": (False, _FUSION),
    "no-gradient-accumulation-fusion": (False, _FUSION),
    "no-async-tensor-model-parallel-allreduce": (False, _FUSION),
    "no-persist-layer-norm": (False, _FUSION),
    "apply-query-key-layer-scaling": (False, "the softmax runs in fp32, where this scaling cancels out"),
    "no-query-key-layer-scaling": (False, "the softmax runs in fp32, where this scaling cancels out"),
    "accumulate-allreduce-grads-in-fp32": (False, "gradients are always accumulated and reduced in fp32"),
    "use-cpu-initialization": (False, "initialisation is already layout-invariant and device-independent"),
    "structured-logs": (False, "use --metrics-jsonl for machine-readable logs"),
    "structured-logs-dir": (True, "use --metrics-jsonl for machine-readable logs"),
    "kill-switch-path": (True, "not implemented; stop the run with a signal instead"),
    "tensorboard-queue-size": (True, "TensorBoard is flushed at every log"),
    "tensorboard-log-interval": (True, "TensorBoard is written every --log-interval"),
    "log-timers-to-tensorboard": (False, "iteration-time and throughput are " + _ALWAYS_LOGGED),
    "log-validation-ppl-to-tensorboard": (False, "lm loss validation ppl is " + _ALWAYS_LOGGED),
    "log-memory-to-tensorboard": (False, _LOGGING),
    "log-world-size-to-tensorboard": (False, "world-size is " + _ALWAYS_LOGGED),
    "log-batch-size-to-tensorboard": (False, "batch-size is " + _ALWAYS_LOGGED),
    "log-throughput": (
        False,
        "throughput (TFLOP/s per device) is printed every --log-interval and " + _ALWAYS_LOGGED,
    ),
    "timing-log-level": (True, _LOGGING),
    "empty-unused-memory-level": (True, "the CUDA cache is left to PyTorch's allocator"),
    "distribute-saved-activations": (
        False,
        "checkpointed inputs are kept whole on every tensor-parallel rank (sequence parallelism already "
        "splits them)",
    ),
    "valid-num-workers": (True, "validation loaders use --num-workers"),
    "override-opt_param-scheduler": (False, "the lr schedule always follows the flags"),
    "use-checkpoint-opt_param-scheduler": (False, "the lr schedule always follows the flags"),
}
