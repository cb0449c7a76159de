"""Helpers shared by the unit, distributed and end-to-end tests: the tiny model shape they build and the
import of a script from tools/. Import as `from tests.helpers import ...` (tests/conftest.py puts the
repository root on sys.path, and spawned ranks inherit it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# The tiny GPT most tests build: small enough for two shared CPU cores, with MQA (StarCoder's attention)
# and no dropout, so runs in different layouts compute the same numbers.
TINY_MODEL = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    attention_head_type="multiquery",
    seq_length=16,
    attention_dropout=0.0,
    hidden_dropout=0.0,
)


def tiny_model_config(*, dropout: float | None = None, **overrides):
    """`ModelConfig` of TINY_MODEL with `overrides` (ModelConfig field names); `dropout` sets the attention
    and the hidden dropout together. max_position_embeddings is seq_length unless overridden."""
    from megatron.config import ModelConfig

    fields = dict(TINY_MODEL)
    if dropout is not None:
        fields.update(attention_dropout=dropout, hidden_dropout=dropout)
    fields.update(overrides)
    fields.setdefault("max_position_embeddings", fields["seq_length"])
    return ModelConfig(**fields)


def load_tool(name: str):
    """Import `tools/<name>.py` as a module (tools/ is a script folder, not a package); a fresh module
    on every call."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a tool look their module up
    spec.loader.exec_module(module)
    return module
