"""Convert one of our sharded checkpoints (any TP/PP layout) to a Hugging Face GPTBigCode directory.

    python tools/convert_to_hf.py --load CKPT --save OUT [--tokenizer-file tokenizer.json]
        [--max-shard-size 5GB] [--dtype fp32|bf16|fp16]

OUT then loads offline with `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)`: safetensors weights (one file, or shards plus
model.safetensors.index.json), config.json (bos/eos = the tokenizer's end-of-document id, the GELU the
run trained with, the vocabulary cut to the tokenizer's size), tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json.

Tensors stream from the checkpoint one at a time and each safetensors shard is written as soon as its
tensors are complete, so memory stays below one model copy. Everything is written into a temporary
sibling of OUT, renamed to OUT at the end: a failure leaves nothing behind. Verifying and converting
show progress bars (bytes) on a terminal; --no-progress turns them off.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import sys
from pathlib import Path

from megatron.entry import check_writable_directory, os_error_text, run_tool
from megatron.log import progress_bar

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--load",
        required=True,
        help="a --save directory (its tracked iteration) or one iter_XXXXXXX directory of a sharded checkpoint",
    )
    parser.add_argument("--save", required=True, help="output directory (must not exist, or be empty)")
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        help="tokenizer.json to ship (default: the tokenizer the checkpoint's run was trained with)",
    )
    parser.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json (with --merge-file)")
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (with --vocab-file)")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB); larger models are sharded",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weight dtype to write (default: the checkpoint's model dtype)",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip hashing every checkpoint file against its manifest (sizes are still checked)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (shown only on a terminal anyway)"
    )
    return parser


def parse_size(text: str) -> int:
    """Bytes of '5GB', '500MB', '2GiB', '1000' (ValueError naming --max-shard-size otherwise)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def checkpoint_directory(load) -> Path:
    """The sharded checkpoint directory `--load` names (an iteration directory or a --save root)."""
    from megatron.checkpoint.directory import checkpoint_dir, read_tracker

    root = Path(load)
    if (root / "common.json").is_file():
        return root
    if not root.is_dir():
        raise ValueError(f"--load {load}: no such directory")
    tracked = read_tracker(root)
    if tracked is None:
        raise ValueError(
            f"--load {load}: no checkpoint there (no common.json, no latest_checkpointed_iteration.txt)"
        )
    directory = checkpoint_dir(root, tracked)
    if not (directory / "common.json").is_file():
        raise ValueError(f"--load {load}: {directory / 'common.json'} is missing (not a sharded checkpoint)")
    return directory


def _build_tokenizer(args, stored_data: dict):
    """(tokenizer, tokenizer.json text, path it came from)."""
    from megatron.data.tokenizer import build_tokenizer

    if args.tokenizer_file or (
        not args.vocab_file and stored_data.get("tokenizer_type") == "TokenizerFromFile"
    ):
        path = args.tokenizer_file or stored_data.get("tokenizer_file")
        if not path:
            raise ValueError("no tokenizer: the checkpoint records none; pass --tokenizer-file")
        tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=path)
        return tokenizer, Path(path).read_text(encoding="utf-8")
    vocab = args.vocab_file or stored_data.get("vocab_file")
    merges = args.merge_file or stored_data.get("merge_file")
    if args.vocab_file or stored_data.get("tokenizer_type") == "GPT2BPETokenizer":
        tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
        return tokenizer, tokenizer.backend.to_str()
    raise ValueError(
        f"the checkpoint's tokenizer type {stored_data.get('tokenizer_type')!r} cannot be written as "
        "tokenizer.json; pass --tokenizer-file (a Hugging Face tokenizers JSON file)"
    )


def _check_checkpoint_tensors(directory: Path, config, found: dict) -> int:
    """The checkpoint's vocabulary rows, after checking every tensor name and shape against the stored
    config (ValueError naming the key)."""
    from megatron.model import GPTModel

    word = found.get("embedding.word_embeddings.weight")
    if word is None:
        raise ValueError(f"{directory}: missing model/embedding.word_embeddings.weight")
    model = GPTModel(config, word[0][0], device="meta")
    expected = {name: tuple(param.shape) for name, param in model.named_parameters()}
    problems = [f"missing model/{name} {shape}" for name, shape in expected.items() if name not in found]
    problems += [
        f"model/{name}: shape {found[name][0]}, expected {shape} from the stored config"
        for name, shape in expected.items()
        if name in found and tuple(found[name][0]) != shape
    ]
    problems += [f"unexpected model/{name}" for name in found if name not in expected]
    if problems:
        raise ValueError(f"checkpoint {directory}: " + "; ".join(problems[:5]))
    return word[0][0]


def hf_config(config, tokenizer, dtype_name: str) -> dict:
    """config.json of the converted model."""
    from megatron.checkpoint.gpt_bigcode import ARCHITECTURE, gpt_bigcode_config_kwargs

    kwargs = gpt_bigcode_config_kwargs(
        config, tokenizer.vocab_size, bos_token_id=tokenizer.eod, eos_token_id=tokenizer.eod
    )
    kwargs.update(
        model_type="gpt_bigcode",
        architectures=[ARCHITECTURE],
        scale_attn_weights=True,
        attention_softmax_in_fp32=config.attention_softmax_in_fp32,
        scale_attention_softmax_in_fp32=config.attention_softmax_in_fp32,
        initializer_range=config.init_method_std,
        use_cache=True,
        torch_dtype=dtype_name,
    )
    return kwargs


def _tokenizer_files(tokenizer, tokenizer_json: str, max_length: int) -> dict[str, str]:
    """tokenizer.json and the small JSON files AutoTokenizer reads beside it."""
    eod = {token_id: text for text, token_id in tokenizer.special_token_ids.items()}[tokenizer.eod]
    specials = sorted(tokenizer.special_token_ids.items(), key=lambda item: item[1])
    additional = [text for text, _ in specials if text != eod]
    special_map = {
        "bos_token": eod,
        "eos_token": eod,
        "unk_token": eod,
        "additional_special_tokens": additional,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        **special_map,
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(special_map, indent=2),
    }


def _plan_shards(hf_shapes: dict, itemsize: int, max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in hf_shapes.items():
        nbytes = itemsize
        for dim in shape:
            nbytes *= dim
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


class _ShardWriter:
    """Fills HF tensors from our tensors as they stream in; writes each shard once it is complete."""

    def __init__(self, out: Path, shards: list[list[str]], shapes: dict, dtype, vocab_size: int):
        self.out, self.shapes, self.dtype, self.vocab_size = out, shapes, dtype, vocab_size
        self.files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self.shard_of = {name: index for index, names in enumerate(shards) for name in names}
        self.missing_rows = {name: shape[0] if shape else 1 for name, shape in shapes.items()}
        self.buffers: dict[str, object] = {}
        self.pending = [set(names) for names in shards]
        self.done: list[dict] = [{} for _ in shards]
        self.total_bytes = 0

    def add(self, hf_name: str, rows, tensor) -> None:
        import torch

        shape = self.shapes[hf_name]
        if hf_name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: self.vocab_size]  # cut the vocabulary padding
        tensor = tensor.to(self.dtype)
        if rows is None:
            buffer = tensor.contiguous()
            self.missing_rows[hf_name] = 0
        else:
            buffer = self.buffers.setdefault(hf_name, torch.empty(shape, dtype=self.dtype))
            buffer[rows] = tensor
            self.missing_rows[hf_name] -= rows.stop - rows.start
        if self.missing_rows[hf_name] == 0:
            self.buffers.pop(hf_name, None)
            self._complete(hf_name, buffer)

    def _complete(self, hf_name: str, tensor) -> None:
        from safetensors.torch import save_file

        index = self.shard_of[hf_name]
        self.done[index][hf_name] = tensor
        self.pending[index].discard(hf_name)
        if not self.pending[index]:
            tensors, self.done[index] = self.done[index], {}
            self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            save_file(tensors, str(self.out / self.files[index]), metadata={"format": "pt"})

    def finish(self) -> None:
        incomplete = sorted(name for names in self.pending for name in names)
        if incomplete:
            raise ValueError(f"checkpoint lacks the tensors for {incomplete[:5]}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {name: self.files[i] for name, i in sorted(self.shard_of.items())},
            }
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def convert(args) -> Path:
    import torch

    from megatron.checkpoint import read_common, tensor_metadata
    from megatron.checkpoint.gpt_bigcode import gpt_bigcode_shapes
    from megatron.checkpoint.verify import verify_with_progress
    from megatron.config import ModelConfig

    max_bytes = parse_size(args.max_shard_size)
    out = Path(args.save)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--save {out} already exists and is not an empty directory")
    check_writable_directory(out.parent, f"--save {out}")
    directory = checkpoint_directory(args.load)
    progress = False if args.no_progress else None
    if not args.no_verify:
        verify_with_progress(directory, enabled=progress)
    stored = read_common(directory)["config"]
    config = ModelConfig(**stored["model"])
    found = tensor_metadata(directory)
    rows = _check_checkpoint_tensors(directory, config, found)
    tokenizer, tokenizer_json = _build_tokenizer(args, stored.get("data", {}))
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"vocabulary mismatch: the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but "
            f"checkpoint {directory} has {rows} embedding rows (model/embedding.word_embeddings.weight)"
        )
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else found["embedding.word_embeddings.weight"][1]
    dtype_name = str(dtype).removeprefix("torch.")
    shapes = gpt_bigcode_shapes(config, tokenizer.vocab_size)
    shards = _plan_shards(shapes, torch.empty((), dtype=dtype).element_size(), max_bytes)
    total = sum(_numel(shape) * stored_dtype.itemsize for shape, stored_dtype in found.values())
    try:
        plan = (shards, shapes, dtype, dtype_name, total)
        _write(out, directory, config, tokenizer, tokenizer_json, plan, progress)
    except OSError as error:  # the temporary directory is gone (removed on the way out)
        where = error.filename or out
        raise ValueError(f"--save {out}: writing {where} failed: {os_error_text(error)}") from None
    return out


def _write(out: Path, directory: Path, config, tokenizer, tokenizer_json: str, plan, progress) -> None:
    """The converted model into a temporary sibling of `out`, renamed to `out` when complete."""
    from megatron.checkpoint import iter_tensors
    from megatron.checkpoint.gpt_bigcode import hf_names_of

    shards, shapes, dtype, dtype_name, total = plan
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, shards, shapes, dtype, tokenizer.vocab_size)
        with progress_bar(total=total, desc="converting", unit="B", enabled=progress) as bar:
            for name, tensor in iter_tensors(directory, verify=False):  # verified (unless --no-verify)
                for hf_name, rows_slice in hf_names_of(name, config):
                    writer.add(hf_name, rows_slice, tensor)
                bar.update(tensor.numel() * tensor.element_size())
        writer.finish()
        _write_json(tmp / "config.json", hf_config(config, tokenizer, dtype_name))
        generation = {
            "bos_token_id": tokenizer.eod,
            "eos_token_id": tokenizer.eod,
            "pad_token_id": tokenizer.eod,
        }
        _write_json(tmp / "generation_config.json", generation)
        for filename, text in _tokenizer_files(
            tokenizer, tokenizer_json, config.max_position_embeddings
        ).items():
            (tmp / filename).write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_tool(lambda: print(f"wrote {convert(args)}"))


if __name__ == "__main__":
    sys.exit(main())
