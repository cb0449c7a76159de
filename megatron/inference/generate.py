"""Minimal greedy generation (no KV cache: the whole window is re-run for every new token).

Enough for the quickstart's completion of a code prompt; the inference issue adds the KV cache,
sampling and FIM prompting.
"""

from __future__ import annotations

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


def load_model_from_checkpoint(load_dir, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the GPTModel saved under `load_dir` (basic checkpoint) from its stored config, in eval mode."""
    from megatron.checkpoint.basic import read_checkpoint
    from megatron.config import ModelConfig
    from megatron.model import GPTModel

    state = read_checkpoint(load_dir)
    if state is None:
        raise ValueError(f"--load {load_dir}: no checkpoint there (no latest_checkpointed_iteration.txt)")
    model_config = ModelConfig(**state["args"]["model"])
    weights = state["model"]
    vocab_name = next(name for name in weights if name.endswith("word_embeddings.weight"))
    model = GPTModel(model_config, weights[vocab_name].shape[0])
    model.load_state_dict(weights)
    return model.to(device).eval()
