"""Name and shape mapping from `GPTModel` to Hugging Face GPTBigCode (the released StarCoder's class).

Used today by the logit-parity tests and bench/train_step.py; the converters of the Hugging Face
issue (tools/convert_to_hf.py and back) build on it. Plain dicts only: `transformers` is not imported.
"""

from __future__ import annotations

import torch

# Per-layer modules whose weight and bias map one to one.
_LAYER_NAMES = {
    "input_layernorm": "ln_1",
    "post_attention_layernorm": "ln_2",
    "attention.dense": "attn.c_proj",
    "mlp.dense_h_to_4h": "mlp.c_fc",
    "mlp.dense_4h_to_h": "mlp.c_proj",
}
_HF_ACTIVATIONS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def gpt_bigcode_config_kwargs(config, vocab_size: int, **overrides) -> dict:
    """Keyword arguments of `transformers.GPTBigCodeConfig` for a ModelConfig (overrides win)."""
    kwargs = {
        "vocab_size": vocab_size,
        "n_positions": config.max_position_embeddings,
        "n_embd": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "n_inner": config.ffn_hidden_size,
        "multi_query": config.attention_head_type == "multiquery",
        "activation_function": _HF_ACTIVATIONS[config.activation],
        "resid_pdrop": config.hidden_dropout,
        "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.layernorm_epsilon,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    kwargs.update(overrides)
    return kwargs


def to_gpt_bigcode_state_dict(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Our state dict under GPTBigCode names. HF's `c_attn` is [query; key_value] for multi-query and
    our head-major fused `query_key_value` for multi-head; `lm_head` is the (tied or untied) output."""
    output_name = (
        "output_layer.weight"
        if config.untie_embeddings_and_output_weights
        else "embedding.word_embeddings.weight"
    )
    out = {
        "transformer.wte.weight": state_dict["embedding.word_embeddings.weight"],
        "transformer.wpe.weight": state_dict["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": state_dict["final_layernorm.weight"],
        "transformer.ln_f.bias": state_dict["final_layernorm.bias"],
        "lm_head.weight": state_dict[output_name],
    }
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            for our_name, hf_name in _LAYER_NAMES.items():
                out[f"{theirs}{hf_name}.{kind}"] = state_dict[f"{ours}{our_name}.{kind}"]
            if config.attention_head_type == "multiquery":
                parts = [state_dict[f"{ours}attention.{name}.{kind}"] for name in ("query", "key_value")]
                out[f"{theirs}attn.c_attn.{kind}"] = torch.cat(parts)
            else:
                out[f"{theirs}attn.c_attn.{kind}"] = state_dict[f"{ours}attention.query_key_value.{kind}"]
    return out
