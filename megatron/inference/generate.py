"""Minimal greedy generation (no KV cache: the whole window is re-run for every new token).

Enough for the quickstart's completion of a code prompt; the inference issue adds the KV cache,
sampling and FIM prompting.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _context_length(model: torch.nn.Module, max_context: int | None) -> int:
    if max_context is not None:
        return max_context
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise ValueError("pass max_context: the model has no config.max_position_embeddings")


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    vocab_size: int | None = None,
    stop_id: int | None = None,
    max_context: int | None = None,
) -> list[int]:
    """Greedy continuation of `prompt_ids`: up to `max_new_tokens` ids (stopping after `stop_id`).

    `vocab_size` restricts the argmax to real tokens (the padded rows of the output layer are never
    chosen); the model sees at most the last `max_context` tokens.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    context = _context_length(model, max_context)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, t]
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        window = tokens[:, -context:]
        logits = model(window)  # [1, t, vocab]
        next_logits = logits[0, -1, :vocab_size] if vocab_size else logits[0, -1]
        next_id = int(next_logits.float().argmax())
        if stop_id is not None and next_id == stop_id:
            break
        new_ids.append(next_id)
        tokens = torch.cat([tokens, tokens.new_tensor([[next_id]])], dim=1)
    model.train(was_training)
    return new_ids


def generate(
    model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int, *, max_context: int | None = None
) -> str:
    """Greedy completion of `prompt` (the text generated after it), stopping at end-of-document."""
    new_ids = generate_ids(
        model,
        tokenizer.encode(prompt),
        max_new_tokens,
        vocab_size=tokenizer.vocab_size,
        stop_id=tokenizer.eod,
        max_context=max_context,
    )
    return tokenizer.decode(new_ids)


def _sharded_directory(load_dir) -> Path | None:
    """The checkpoint directory when `load_dir` names a sharded (DCP) checkpoint: an iteration directory
    itself or a --save directory whose tracked iteration is one; None for a basic checkpoint."""
    from megatron.checkpoint.basic import checkpoint_dir, read_tracker

    root = Path(load_dir)
    if (root / "common.json").is_file() or (root / ".metadata").is_file():
        return root
    iteration = read_tracker(root)
    if iteration is None:
        raise ValueError(f"--load {load_dir}: no checkpoint there (no latest_checkpointed_iteration.txt)")
    directory = checkpoint_dir(root, iteration)
    if (directory / "common.json").is_file() or (directory / ".metadata").is_file():
        return directory
    return None


def read_checkpoint_config(load_dir) -> dict:
    """The run's config (`Config.to_dict()`: {"model": {...}, "data": {...}, ...}) stored with the latest
    checkpoint under `load_dir`, sharded or basic, without reading the weights into memory."""
    directory = _sharded_directory(load_dir)
    if directory is not None:
        from megatron.checkpoint.sharded import read_common

        return read_common(directory)["config"]
    return _read_basic(load_dir, mmap=True)["args"]


def _read_basic(load_dir, *, mmap: bool = False) -> dict:
    from megatron.checkpoint.basic import MODEL_FILENAME, checkpoint_dir, read_tracker

    iteration = read_tracker(load_dir)
    file = checkpoint_dir(load_dir, iteration) / MODEL_FILENAME
    if not file.is_file():
        raise ValueError(
            f"--load {load_dir}: iteration {iteration} has neither a sharded checkpoint (common.json) nor {file}"
        )
    return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def _check_file_sizes(directory: Path) -> None:
    """Every file the manifest lists exists with its recorded size (a truncated or half-copied
    checkpoint fails here, naming the file). Hashes are not checked: that reads the whole checkpoint,
    optimizer state included (`tools/checkpoint_util.py verify` does it)."""
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise ValueError(f"{manifest}: missing (an incomplete checkpoint)")
    for relative, entry in json.loads(manifest.read_text(encoding="utf-8"))["files"].items():
        path = directory / relative
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise ValueError(f"{path}: {found}, manifest.json records {entry['bytes']} bytes")


def _model_weights(load_dir) -> tuple[dict, dict]:
    """(config dict, {parameter name: full tensor}) of the latest checkpoint under `load_dir`.

    Sharded checkpoints saved at any TP x PP x DP layout read back as full logical tensors in one
    process (`load_full_state`); basic ones are one file."""
    directory = _sharded_directory(load_dir)
    if directory is None:
        state = _read_basic(load_dir)
        return state["args"], state["model"]
    from megatron.checkpoint.sharded import load_full_state, read_common

    _check_file_sizes(directory)
    config = read_common(directory)["config"]
    prefix = "model/"
    weights = {
        (name[len(prefix) :] if name.startswith(prefix) else name): tensor
        for name, tensor in load_full_state(directory, prefix).items()
    }
    return config, weights


def load_model_from_checkpoint(load_dir, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the GPTModel saved under `load_dir` from its stored config, in fp32 and eval mode.

    `load_dir` is a --save directory (its tracked iteration) or a sharded checkpoint's iteration
    directory; sharded checkpoints of any saving layout and basic single-file ones both load. The model
    is built without initialising weights (meta device) and takes the loaded tensors as they are, so the
    weights are in memory once."""
    from megatron.config import ModelConfig
    from megatron.model import GPTModel

    config, weights = _model_weights(load_dir)
    model_config = ModelConfig(**config["model"])
    vocab_name = next((name for name in weights if name.endswith("word_embeddings.weight")), None)
    if vocab_name is None:
        raise ValueError(
            f"--load {load_dir}: the checkpoint holds no word embedding (model/...word_embeddings)"
        )
    model = GPTModel(model_config, weights[vocab_name].shape[0], device="meta")
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if expected != found:
        differences = sorted(
            f"{name}: model {expected.get(name)}, checkpoint {found.get(name)}"
            for name in set(expected) | set(found)
            if expected.get(name) != found.get(name)
        )
        raise ValueError(f"--load {load_dir}: weights do not match the stored config: {differences[:5]}")
    model.load_state_dict(weights, assign=True)
    return model.float().to(device).eval()
