"""Checkpoints: sharded (`sharded`: DCP, any layout, atomic, async), the single-process `basic` format
it supersedes, and Hugging Face GPTBigCode conversion (`gpt_bigcode`).

The sharded API is importable from here; it is loaded on first use, so importing `megatron.checkpoint.basic`
does not pull in torch.distributed.checkpoint.
"""

_SHARDED_NAMES = (
    "FORMAT",
    "CheckpointError",
    "Checkpointer",
    "LoadedCheckpoint",
    "find_checkpoints",
    "iter_tensors",
    "load_full_state",
    "read_common",
    "read_metadata",
    "tensor_metadata",
    "verify_checkpoint",
)

__all__ = list(_SHARDED_NAMES)


def __getattr__(name: str):
    if name in _SHARDED_NAMES:
        from megatron.checkpoint import sharded

        return getattr(sharded, name)
    raise AttributeError(f"module 'megatron.checkpoint' has no attribute {name!r}")
