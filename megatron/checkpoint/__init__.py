"""Checkpoints: the sharded format (DCP, any layout, atomic, async; `checkpointer` and the modules beside
it), the single-process `single_file` format it supersedes, both in Megatron's directory layout
(`directory`), legacy Megatron checkpoints (`legacy`) and Hugging Face GPTBigCode conversion
(`gpt_bigcode`). See docs/checkpoints.md.

The sharded API is importable from here; it is loaded on first use, so importing
`megatron.checkpoint.single_file` does not pull in torch.distributed.checkpoint.
"""

import importlib

# public name -> the module of megatron.checkpoint that defines it
_SHARDED_NAMES = {
    "FORMAT": "files",
    "CheckpointError": "checkpointer",
    "Checkpointer": "checkpointer",
    "LoadedCheckpoint": "directory",
    "find_checkpoints": "directory",
    "iter_tensors": "readers",
    "load_full_state": "readers",
    "read_common": "verify",
    "read_metadata": "dcp_io",
    "tensor_metadata": "readers",
    "verify_checkpoint": "verify",
}

__all__ = list(_SHARDED_NAMES)


def __getattr__(name: str):
    if name in _SHARDED_NAMES:
        module = importlib.import_module(f"megatron.checkpoint.{_SHARDED_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'megatron.checkpoint' has no attribute {name!r}")
