"""Name and shape mapping between `GPTModel` and Hugging Face GPTBigCode (the released StarCoder's class).

Both directions: `to_gpt_bigcode_state_dict` / `hf_names_of` (ours -> HF, whole or one tensor at a time
for the streaming tools/convert_to_hf.py) and `from_gpt_bigcode_state_dict` /
`model_config_from_gpt_bigcode` (HF -> ours, for tools/convert_from_hf.py), with key and shape checks
that name the offending key. Used as well by the logit-parity tests and the benchmarks. Plain dicts
only: `transformers` is not imported.
"""

from __future__ import annotations

import torch

from megatron.checkpoint.mismatch import check_fits

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


# --------------------------------------------------------------------------- Hugging Face -> ours

CONFIG_FILENAME = "config.json"
ARCHITECTURE = "GPTBigCodeForCausalLM"
# "gelu_new" is the same tanh formula as "gelu_pytorch_tanh" (HF's NewGELUActivation).
_OUR_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _hf_value(hf_config: dict, key: str, source: str):
    if key not in hf_config:
        raise ValueError(f"{source}: missing {key!r}")
    return hf_config[key]


def model_config_from_gpt_bigcode(hf_config: dict, source: str = CONFIG_FILENAME) -> dict:
    """`ModelConfig` keyword arguments for a GPTBigCode config.json dict. ValueError naming `source`
    (the config.json path) for another model type or architecture, or a setting we cannot express."""
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or [ARCHITECTURE]
    if model_type != "gpt_bigcode" or ARCHITECTURE not in architectures:
        raise ValueError(
            f"{source}: model_type {model_type!r} / architectures {architectures} is not a GPTBigCode model "
            f"(expected model_type 'gpt_bigcode' and {ARCHITECTURE})"
        )
    activation = hf_config.get("activation_function", "gelu_pytorch_tanh")
    if activation not in _OUR_ACTIVATIONS:
        raise ValueError(
            f"{source}: activation_function {activation!r} is not supported; "
            f"valid: {', '.join(_OUR_ACTIVATIONS)}"
        )
    if not hf_config.get("scale_attn_weights", True):
        raise ValueError(f"{source}: scale_attn_weights false is not supported (our attention scales)")
    hidden = _hf_value(hf_config, "n_embd", source)
    heads = _hf_value(hf_config, "n_head", source)
    if hidden % heads:
        raise ValueError(f"{source}: n_embd {hidden} is not divisible by n_head {heads}")
    positions = _hf_value(hf_config, "n_positions", source)
    return {
        "num_layers": _hf_value(hf_config, "n_layer", source),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": hf_config.get("n_inner") or 4 * hidden,
        "kv_channels": hidden // heads,
        "attention_head_type": "multiquery" if hf_config.get("multi_query", True) else "multihead",
        "seq_length": positions,
        "max_position_embeddings": positions,
        "activation": _OUR_ACTIVATIONS[activation],
        "layernorm_epsilon": hf_config.get("layer_norm_epsilon", 1e-5),
        "hidden_dropout": hf_config.get("resid_pdrop", 0.1),
        "attention_dropout": hf_config.get("attn_pdrop", 0.1),
        "init_method_std": hf_config.get("initializer_range", 0.02),
        "untie_embeddings_and_output_weights": not hf_config.get("tie_word_embeddings", True),
        "attention_softmax_in_fp32": hf_config.get("attention_softmax_in_fp32", True),
    }


def gpt_bigcode_shapes(config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a GPTBigCode checkpoint of this ModelConfig holds (lm_head
    only when untied)."""
    h, d, f = config.hidden_size, config.kv_channels, config.ffn_hidden_size
    qkv = h + 2 * d if config.attention_head_type == "multiquery" else 3 * h
    shapes = {
        "transformer.wte.weight": (vocab_size, h),
        "transformer.wpe.weight": (config.max_position_embeddings, h),
        "transformer.ln_f.weight": (h,),
        "transformer.ln_f.bias": (h,),
    }
    if config.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (vocab_size, h)
    per_layer = {
        "ln_1.weight": (h,),
        "ln_1.bias": (h,),
        "attn.c_attn.weight": (qkv, h),
        "attn.c_attn.bias": (qkv,),
        "attn.c_proj.weight": (h, h),
        "attn.c_proj.bias": (h,),
        "ln_2.weight": (h,),
        "ln_2.bias": (h,),
        "mlp.c_fc.weight": (f, h),
        "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (h, f),
        "mlp.c_proj.bias": (h,),
    }
    for i in range(config.num_layers):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in per_layer.items()})
    return shapes


def check_shapes(
    state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str, *, extra_ok=()
) -> None:
    """ValueError naming `source`, the counts, the likely flag and the first few missing, unexpected or
    wrongly shaped keys (`megatron.checkpoint.mismatch`)."""
    found = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    check_fits(source, expected, found, extra_ok=extra_ok, found_name="weights")


def from_gpt_bigcode_state_dict(
    hf_sd: dict[str, torch.Tensor], config, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Inverse of `to_gpt_bigcode_state_dict`: GPTBigCode names -> ours, after checking every key and
    shape (ValueError naming `source` and the key). A tied model's `lm_head.weight`, when present, must
    equal `transformer.wte.weight`."""
    vocab_size = hf_sd["transformer.wte.weight"].shape[0] if "transformer.wte.weight" in hf_sd else 0
    check_shapes(hf_sd, gpt_bigcode_shapes(config, vocab_size), source, extra_ok=("lm_head.weight",))
    tied = not config.untie_embeddings_and_output_weights
    lm_head = hf_sd.get("lm_head.weight")
    if tied and lm_head is not None and not torch.equal(lm_head, hf_sd["transformer.wte.weight"]):
        raise ValueError(
            f"{source}: lm_head.weight differs from transformer.wte.weight although the config ties "
            "them (tie_word_embeddings); set tie_word_embeddings false in config.json"
        )
    out = {
        "embedding.word_embeddings.weight": hf_sd["transformer.wte.weight"],
        "embedding.position_embeddings.weight": hf_sd["transformer.wpe.weight"],
    }
    h = config.hidden_size
    for i in range(config.num_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            for our_name, hf_name in _LAYER_NAMES.items():
                out[f"{ours}{our_name}.{kind}"] = hf_sd[f"{theirs}{hf_name}.{kind}"]
            c_attn = hf_sd[f"{theirs}attn.c_attn.{kind}"]
            if config.attention_head_type == "multiquery":
                out[f"{ours}attention.query.{kind}"] = c_attn[:h]
                out[f"{ours}attention.key_value.{kind}"] = c_attn[h:]
            else:
                out[f"{ours}attention.query_key_value.{kind}"] = c_attn
    out["final_layernorm.weight"] = hf_sd["transformer.ln_f.weight"]
    out["final_layernorm.bias"] = hf_sd["transformer.ln_f.bias"]
    if not tied:
        out["output_layer.weight"] = hf_sd["lm_head.weight"]
    return out


def hf_names_of(our_name: str, config) -> list[tuple[str, slice | None]]:
    """Where one of our tensors goes in GPTBigCode: (HF name, row slice of it or None for the whole).
    Empty for a tied model's output layer (none exists). Used by the streaming converter."""
    h, d = config.hidden_size, config.kv_channels
    fixed = {
        "embedding.word_embeddings.weight": "transformer.wte.weight",
        "embedding.position_embeddings.weight": "transformer.wpe.weight",
        "final_layernorm.weight": "transformer.ln_f.weight",
        "final_layernorm.bias": "transformer.ln_f.bias",
        "output_layer.weight": "lm_head.weight",
    }
    if our_name in fixed:
        return [(fixed[our_name], None)]
    parts = our_name.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        raise ValueError(f"checkpoint tensor {our_name!r} has no GPTBigCode counterpart")
    prefix, module, kind = f"transformer.h.{parts[1]}.", ".".join(parts[2:-1]), parts[-1]
    if module in _LAYER_NAMES:
        return [(f"{prefix}{_LAYER_NAMES[module]}.{kind}", None)]
    if module == "attention.query":
        return [(f"{prefix}attn.c_attn.{kind}", slice(0, h))]
    if module == "attention.key_value":
        return [(f"{prefix}attn.c_attn.{kind}", slice(h, h + 2 * d))]
    if module == "attention.query_key_value":
        return [(f"{prefix}attn.c_attn.{kind}", None)]
    raise ValueError(f"checkpoint tensor {our_name!r} has no GPTBigCode counterpart")
