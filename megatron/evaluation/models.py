"""The model and tokenizer an evaluation runs: one of our checkpoints, or a Hugging Face GPTBigCode
directory loaded into our `GPTModel` (so both go through the same KV-cache generator).

- A checkpoint directory (`--save` output, sharded of any layout or basic): the weights through
  `megatron.inference.generate.load_model_from_checkpoint`, the tokenizer from `tokenizer_file` or the
  one the run's stored config names.
- A Hugging Face directory (config.json with model_type gpt_bigcode, model.safetensors /
  pytorch_model.bin or their shards): the weights mapped by `megatron.checkpoint.gpt_bigcode` (the
  mapping tools/convert_from_hf.py uses), the tokenizer from `tokenizer_file` or the directory's
  tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def is_hf_directory(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "gpt_bigcode"
    except ValueError:
        return False


def _hf_weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [hf_dir / name for name in dict.fromkeys(weight_map.values())]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return [hf_dir / name]
    raise ValueError(f"--load {hf_dir}: no weights (model.safetensors, pytorch_model.bin or an index)")


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in _hf_weight_files(hf_dir):
        if not file.is_file():
            raise ValueError(f"--load {hf_dir}: the weight index lists {file.name}, which is missing")
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_hf_model(hf_dir, device="cpu") -> torch.nn.Module:
    """Our GPTModel holding a GPTBigCode directory's weights, fp32, eval mode."""
    from megatron.checkpoint.gpt_bigcode import from_gpt_bigcode_state_dict, model_config_from_gpt_bigcode
    from megatron.config import ModelConfig
    from megatron.model import GPTModel

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    config = ModelConfig(**model_config_from_gpt_bigcode(hf_config, str(config_path)))
    config.validate()
    weights = from_gpt_bigcode_state_dict(_read_hf_weights(hf_dir), config, source=str(hf_dir))
    vocab_size = weights["embedding.word_embeddings.weight"].shape[0]
    model = GPTModel(config, vocab_size, device="meta")
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()}, assign=True)
    return model.to(device).eval()


def _tokenizer(tokenizer_file, stored: dict, load: str):
    from megatron.data.tokenizer import build_tokenizer

    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise ValueError(f"--tokenizer-file {tokenizer_file}: no such file")
        return build_tokenizer("TokenizerFromFile", tokenizer_file=str(tokenizer_file))
    names = ("tokenizer_file", "vocab_file", "merge_file", "tokenizer_model")
    kwargs = {name: stored[name] for name in names if stored.get(name)}
    if not stored.get("tokenizer_type") or not kwargs:
        raise ValueError(f"--load {load}: the checkpoint names no tokenizer; pass --tokenizer-file")
    return build_tokenizer(stored["tokenizer_type"], **kwargs)


def load_model_and_tokenizer(load, tokenizer_file=None, device="cpu", verify: bool = True):
    """(model, tokenizer, kind) for `--load` (kind: "checkpoint" or "huggingface")."""
    from megatron.inference.generate import load_model_from_checkpoint, read_checkpoint_config

    path = Path(load)
    if not path.is_dir():
        raise ValueError(f"--load {load}: no such directory")
    if is_hf_directory(path):
        if tokenizer_file is None and (path / "tokenizer.json").is_file():
            tokenizer_file = path / "tokenizer.json"
        if tokenizer_file is None:
            raise ValueError(f"--load {load}: the directory has no tokenizer.json; pass --tokenizer-file")
        return load_hf_model(path, device), _tokenizer(tokenizer_file, {}, load), "huggingface"
    stored = {} if tokenizer_file is not None else read_checkpoint_config(path).get("data", {})
    tokenizer = _tokenizer(tokenizer_file, stored, load)
    return load_model_from_checkpoint(path, device, verify=verify), tokenizer, "checkpoint"
