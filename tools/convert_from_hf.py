"""Convert a Hugging Face GPTBigCode directory (MQA or MHA) to one of our sharded checkpoints.

    python tools/convert_from_hf.py --load HFDIR --save CKPT \
        [--tensor-model-parallel-size T --pipeline-model-parallel-size P] [--dtype fp32|bf16|fp16]

Weights come from model.safetensors (or its shards and index) or pytorch_model.bin (loaded with
`weights_only=True`). The vocabulary is padded with zero rows to Megatron's multiple
(--make-vocab-size-divisible-by x T). Our checkpoints are layout-free: T and P are validated (heads,
FFN columns and vocabulary divisible by T, layers by P) and recorded, and the checkpoint loads at any
layout. CKPT gets tokenizer.json beside the checkpoint when HFDIR has one, and its stored config names
it. Continue training with `--load CKPT --finetune` (and the same model flags).

Everything is written into a temporary sibling of CKPT and renamed at the end: a failure leaves nothing.
Reading the weight files shows a progress bar (bytes) on a terminal; --no-progress turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron.entry import check_writable_directory, os_error_text, run_tool
from megatron.log import progress_bar

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--load", required=True, help="Hugging Face GPTBigCode directory (config.json + weights)"
    )
    parser.add_argument(
        "--save", required=True, help="output checkpoint directory (must not exist, or be empty)"
    )
    parser.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP size the checkpoint is meant for (default 1)",
    )
    parser.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="PP size the checkpoint is meant for (default 1)",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="pad the vocabulary to a multiple of this times the TP size (Megatron's rule; default 128)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--iteration", type=int, default=0, help="iteration number to record (default 0)")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)"
    )
    return parser


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing (not a Hugging Face model directory)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
            for file in files:
                if not file.is_file():
                    raise ValueError(f"{index}: lists {file.name}, which is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return [hf_dir / name]
    raise ValueError(f"{hf_dir}: no weights (model.safetensors, pytorch_model.bin or an index of shards)")


def read_hf_weights(hf_dir, progress: bool | None = None) -> dict:
    """Every tensor of a Hugging Face directory's weight files (safetensors, or .bin with weights_only);
    `progress`: a bar over the files' bytes (None: only on a terminal)."""
    import torch
    from safetensors.torch import load_file

    state = {}
    files = _weight_files(Path(hf_dir))
    total = sum(file.stat().st_size for file in files)
    with progress_bar(total=total, desc="reading", unit="B", enabled=progress) as bar:
        for file in files:
            try:
                if file.suffix == ".safetensors":
                    part = load_file(str(file))
                else:
                    part = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # noqa: BLE001 - any unreadable file becomes one message naming it
                raise ValueError(f"{file}: cannot read weights ({type(error).__name__}: {error})") from None
            state.update(part)
            bar.update(file.stat().st_size)
    return state


def check_layout(config, tp: int, pp: int) -> None:
    """ValueError naming the flag when the model does not split at TP x PP."""
    if tp < 1 or pp < 1:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp} must be >= 1"
        )
    for what, value in (("n_head", config.num_attention_heads), ("n_inner", config.ffn_hidden_size)):
        if value % tp:
            raise ValueError(f"{what} {value} is not divisible by --tensor-model-parallel-size {tp}")
    if config.num_layers % pp:
        raise ValueError(
            f"n_layer {config.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )


def _check_tokenizer(hf_dir: Path, vocab_size: int):
    """The directory's tokenizer.json (None when absent) after checking it fits the embedding."""
    from megatron.data.tokenizer import build_tokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=str(path))
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"vocabulary mismatch: {path} has {tokenizer.vocab_size} tokens but the weights "
            f"(transformer.wte.weight) have {vocab_size} rows"
        )
    return path


def build_state(hf_dir: Path, args):
    """(our state dict, ModelConfig, run config dict, tokenizer.json path or None)."""
    import dataclasses

    import torch

    from megatron.checkpoint.gpt_bigcode import from_gpt_bigcode_state_dict, model_config_from_gpt_bigcode
    from megatron.config import Config, ModelConfig
    from megatron.data.tokenizer import pad_vocab_size

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    model_kwargs = model_config_from_gpt_bigcode(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    config = ModelConfig(**model_kwargs, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    config.validate()
    check_layout(config, tp, pp)
    weights = read_hf_weights(hf_dir, False if args.no_progress else None)
    ours = from_gpt_bigcode_state_dict(weights, config, source=str(hf_dir))
    vocab = ours["embedding.word_embeddings.weight"].shape[0]
    tokenizer_path = _check_tokenizer(hf_dir, vocab)
    padded = pad_vocab_size(vocab, args.make_vocab_size_divisible_by, tp)
    dtype = getattr(torch, DTYPES[args.dtype])
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in ours and padded > vocab:  # padding rows: zeros, as Megatron's padded embedding
            ours[name] = torch.cat([ours[name], ours[name].new_zeros(padded - vocab, ours[name].shape[1])])
    ours = {name: tensor.to(dtype) for name, tensor in ours.items()}
    config.vocab_size = padded
    sections = {
        "model": dataclasses.asdict(config),
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
    }
    if tokenizer_path is not None:
        final_tokenizer = Path(args.save).resolve() / "tokenizer.json"
        sections["data"] = {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": str(final_tokenizer)}
    return ours, config, Config.from_dict(sections).to_dict(), tokenizer_path


def convert(args) -> Path:
    from megatron.checkpoint.legacy import save_converted_checkpoint

    hf_dir, out = Path(args.load), Path(args.save)
    if not hf_dir.is_dir():
        raise ValueError(f"--load {hf_dir}: no such directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--save {out} already exists and is not an empty directory")
    check_writable_directory(out.parent, f"--save {out}")
    state, config, run_config, tokenizer_path = build_state(hf_dir, args)
    try:
        return save_converted_checkpoint(
            state,
            config,
            out,
            run_config=run_config,
            iteration=args.iteration,
            extra={"converted_from": str(hf_dir.resolve())},
            files={"tokenizer.json": tokenizer_path} if tokenizer_path is not None else None,
        )
    except OSError as error:  # the temporary directory is gone (removed on the way out)
        raise ValueError(
            f"--save {out}: writing {error.filename or out} failed: {os_error_text(error)}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: print(f"wrote {convert(args)}"))


if __name__ == "__main__":
    sys.exit(main())
