"""Read legacy Megatron checkpoints in BigCode's layout (how `starcoderbase-megatron` was released).

```
DIR/latest_checkpointed_iteration.txt           an integer, or "release"
DIR/iter_0001000/mp_rank_TT/model_optim_rng.pt      (PP = 1)
DIR/iter_0001000/mp_rank_TT_PPP/model_optim_rng.pt  (PP > 1)
DIR/release/...                                  the same layout for released weights
```
Each file is a torch pickle: `args` (argparse.Namespace), `checkpoint_version`, `iteration`, `model`
(weights under `model["language_model"]`, nested dicts or dotted names), optimizer and RNG states.
Files are read with `torch.load(weights_only=True)`, allow-listing only `argparse.Namespace` and the
numpy classes of the saved RNG states, never arbitrary unpickling.

`read_legacy_checkpoint` merges the tensor-parallel shards (vocabulary-parallel embedding rows, query /
fused QKV and h->4h split on dim 0, dense and 4h->h split on dim 1, replicated multi-query key_value,
LayerNorms and row-parallel biases) and the pipeline stages (stage-local layer numbers -> global) into
our logical parameter names. `save_converted_checkpoint` writes any such state as our sharded checkpoint
(both converters use it).
"""

from __future__ import annotations

import argparse
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron.checkpoint.directory import TRACKER_FILENAME
from megatron.checkpoint.files import verify_torch_file
from megatron.checkpoint.mismatch import check_fits
from megatron.log import progress_bar

MODEL_FILENAME = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")

# How a tensor-parallel shard sits in the full tensor: concatenated along dim 0 or 1, or replicated.
_SPLIT_DIM0 = (
    "word_embeddings.weight",
    "self_attention.query.weight",
    "self_attention.query.bias",
    "self_attention.query_key_value.weight",
    "self_attention.query_key_value.bias",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_h_to_4h.bias",
    "output_layer.weight",
)
_SPLIT_DIM1 = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


@dataclass
class LegacyCheckpoint:
    """What `read_legacy_checkpoint` returns: our logical names -> full tensors, and where from."""

    state_dict: dict[str, torch.Tensor]
    model_config: dict  # ModelConfig keyword arguments
    args: argparse.Namespace
    iteration: int  # 0 for "release"
    directory: Path
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int


def _safe_globals() -> list:
    import numpy as np

    allowed = [argparse.Namespace, np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    allowed.append(core.multiarray._reconstruct)
    allowed += [type(np.dtype(name)) for name in ("uint32", "int64", "float64", "uint8")]
    return allowed


def safe_load(path: Path) -> dict:
    """torch.load with weights_only=True and only the legacy files' harmless classes allow-listed;
    ValueError naming the file when it needs anything else or cannot be read, or when a record's CRC32
    differs from the one the file records (`verify_torch_file`)."""
    verify_torch_file(path)
    serialization = torch.serialization
    try:
        if hasattr(serialization, "safe_globals"):
            with serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        serialization.add_safe_globals(_safe_globals())  # torch 2.4: no context manager yet
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors of several types become one message
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: refused or unreadable as a legacy checkpoint ({first_line})") from None


def _iteration_directory(directory: Path) -> tuple[Path, int]:
    """The directory holding mp_rank_* and its iteration (0 for release)."""
    if any(_RANK_DIR.match(p.name) for p in directory.iterdir() if p.is_dir()):
        match = re.match(r"^iter_(\d+)$", directory.name)
        return directory, int(match.group(1)) if match else 0
    tracker = directory / TRACKER_FILENAME
    if not tracker.is_file():
        raise ValueError(
            f"{directory}: no {TRACKER_FILENAME} and no mp_rank_* directories (not a legacy checkpoint)"
        )
    text = tracker.read_text(encoding="utf-8").strip()
    if text == "release":
        return directory / "release", 0
    if not text.isdigit():
        raise ValueError(f"{tracker}: {text!r} is neither an iteration number nor 'release'")
    return directory / f"iter_{int(text):07d}", int(text)


def _rank_files(directory: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> model_optim_rng.pt, checking the grid is complete."""
    if not directory.is_dir():
        raise ValueError(f"{directory}: missing (named by the tracker)")
    files = {}
    for path in directory.iterdir():
        match = _RANK_DIR.match(path.name)
        if match and path.is_dir():
            files[(int(match.group(1)), int(match.group(2) or 0))] = path / MODEL_FILENAME
    if not files:
        raise ValueError(f"{directory}: no mp_rank_* directories")
    tp = max(t for t, _ in files) + 1
    pp = max(p for _, p in files) + 1
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
            path = directory / name / MODEL_FILENAME
            if not path.is_file():
                raise ValueError(f"{path}: missing (the checkpoint has TP {tp} x PP {pp} ranks)")
            files[(t, p)] = path
    return files


def _flatten(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def _merge_tp(name: str, shards: list[torch.Tensor], source: str) -> torch.Tensor:
    if name.endswith(_SPLIT_DIM0):
        return torch.cat(shards, dim=0)
    if name.endswith(_SPLIT_DIM1):
        return torch.cat(shards, dim=1)
    for rank, shard in enumerate(shards[1:], start=1):
        if shard.shape != shards[0].shape or not torch.equal(shard, shards[0]):
            raise ValueError(f"{source}: {name} should be replicated across TP ranks but rank {rank} differs")
    return shards[0]


def _our_name(name: str, layer_offset: int) -> str | None:
    """Legacy language_model name -> ours (None for names we drop)."""
    for encoder in ("encoder.", "transformer."):
        if name.startswith(encoder):
            rest = name[len(encoder) :]
            match = re.match(r"^layers\.(\d+)\.(.*)$", rest)
            if match:
                layer = int(match.group(1)) + layer_offset
                return f"layers.{layer}." + match.group(2).replace("self_attention.", "attention.")
            return rest  # final_layernorm.*
    if name.startswith("embedding.") or name.startswith("output_layer."):
        return name
    return None


def model_config_from_args(args: argparse.Namespace, source: str) -> dict:
    """ModelConfig keyword arguments from a legacy run's argparse Namespace."""

    def need(key):
        if getattr(args, key, None) is None:
            raise ValueError(f"{source}: args has no {key!r}")
        return getattr(args, key)

    hidden = need("hidden_size")
    # Megatron's fused bias-GELU (on by default) and --openai-gelu are the tanh GELU; else erf.
    tanh = getattr(args, "openai_gelu", False) or getattr(args, "bias_gelu_fusion", True)
    return {
        "num_layers": need("num_layers"),
        "hidden_size": hidden,
        "num_attention_heads": need("num_attention_heads"),
        "ffn_hidden_size": getattr(args, "ffn_hidden_size", None) or 4 * hidden,
        "kv_channels": getattr(args, "kv_channels", None) or hidden // need("num_attention_heads"),
        "attention_head_type": getattr(args, "attention_head_type", None) or "multihead",
        "seq_length": need("seq_length"),
        "max_position_embeddings": getattr(args, "max_position_embeddings", None) or need("seq_length"),
        "layernorm_epsilon": getattr(args, "layernorm_epsilon", 1e-5),
        "hidden_dropout": getattr(args, "hidden_dropout", 0.1),
        "attention_dropout": getattr(args, "attention_dropout", 0.1),
        "init_method_std": getattr(args, "init_method_std", 0.02),
        "activation": "gelu_tanh" if tanh else "gelu",
        "untie_embeddings_and_output_weights": bool(
            getattr(args, "untie_embeddings_and_output_weights", False)
        ),
    }


def read_legacy_checkpoint(directory, *, progress: bool | None = False) -> LegacyCheckpoint:
    """Merge a legacy checkpoint's TP shards and PP stages into our logical names (see module).
    `progress`: a bar over the rank files' bytes (for tools; None: only on a terminal)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"--load {directory}: no such directory")
    iteration_dir, iteration = _iteration_directory(directory)
    files = _rank_files(iteration_dir)
    tp = max(t for t, _ in files) + 1
    pp = max(p for _, p in files) + 1
    total = sum(path.stat().st_size for path in files.values())
    with progress_bar(total=total, desc="reading", unit="B", enabled=progress) as bar:
        return _merge_stages(files, tp, pp, iteration, iteration_dir, bar)


def _merge_stages(files: dict, tp: int, pp: int, iteration, iteration_dir: Path, bar) -> LegacyCheckpoint:
    """Read the rank files stage by stage (`bar` counts their bytes) and merge their tensors."""
    state: dict[str, torch.Tensor] = {}
    args = None
    for stage in range(pp):
        loaded = []
        for t in range(tp):
            loaded.append(safe_load(files[(t, stage)]))
            bar.update(files[(t, stage)].stat().st_size)
        if args is None:
            args = loaded[0].get("args")
            if not isinstance(args, argparse.Namespace):
                raise ValueError(f"{files[(0, 0)]}: no 'args' Namespace")
            num_layers = model_config_from_args(args, str(files[(0, 0)]))["num_layers"]
            if num_layers % pp:
                raise ValueError(f"{files[(0, 0)]}: num_layers {num_layers} does not split over {pp} stages")
        offset = stage * (num_layers // pp)
        trees = []
        for t, content in enumerate(loaded):
            model = content.get("model")
            if not isinstance(model, dict) or "language_model" not in model:
                raise ValueError(f"{files[(t, stage)]}: no model['language_model']")
            trees.append(_flatten(model["language_model"]))
        for name in trees[0]:
            ours = _our_name(name, offset)
            if ours is None:
                continue
            missing = [files[(t, stage)] for t in range(tp) if name not in trees[t]]
            if missing:
                raise ValueError(f"{missing[0]}: missing {name} (present on TP rank 0)")
            if ours in state:
                raise ValueError(
                    f"{files[(0, stage)]}: {name} maps to {ours}, already read from another stage"
                )
            state[ours] = _merge_tp(name, [tree[name] for tree in trees], str(files[(0, stage)]))
        del loaded, trees
    model_config = model_config_from_args(args, str(files[(0, 0)]))
    return LegacyCheckpoint(state, model_config, args, iteration, iteration_dir, tp, pp)


def save_converted_checkpoint(
    state_dict: dict[str, torch.Tensor],
    model_config,
    save,
    *,
    run_config: dict,
    iteration: int = 0,
    extra: dict | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write `state_dict` (our logical names, full tensors) as our sharded checkpoint under `save`,
    checking every name and shape against a GPTModel of `model_config` first (ValueError naming the
    key). Written into a temporary sibling, with `files` (name -> source path) copied beside the
    tracker, then renamed to `save`: a failure leaves nothing. `save` must not exist or be empty."""
    from megatron.checkpoint.checkpointer import Checkpointer
    from megatron.model import GPTModel
    from megatron.parallel.state import ParallelState

    out = Path(save)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--save {out} already exists and is not an empty directory")
    vocab = state_dict.get("embedding.word_embeddings.weight")
    if vocab is None:
        raise ValueError("the weights hold no embedding.word_embeddings.weight")
    model = GPTModel(model_config, vocab.shape[0], device="meta")
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    found = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    check_fits("the weights", expected, found, found_name="weights")
    model.load_state_dict({k: v.contiguous() for k, v in state_dict.items()}, assign=True, strict=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        Checkpointer(ParallelState.single("cpu")).save(
            tmp, iteration, model, None, None, None, consumed_samples=0, config=run_config, extra=extra
        )
        for name, source in (files or {}).items():
            shutil.copyfile(source, tmp / name)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
