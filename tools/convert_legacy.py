"""Convert a legacy Megatron checkpoint in BigCode's layout (e.g. `starcoderbase-megatron`) to ours.

    python tools/convert_legacy.py --load LEGACY_DIR --save CKPT [--tokenizer-file tokenizer.json]

LEGACY_DIR holds `latest_checkpointed_iteration.txt` (an iteration or "release") and
`iter_XXXXXXX/` or `release/` with `mp_rank_TT[_PPP]/model_optim_rng.pt`, or is such an iteration
directory itself. The files are read with `torch.load(weights_only=True)` (only argparse.Namespace and
numpy RNG-state classes allow-listed); the tensor-parallel shards and pipeline stages are merged into our
logical names and written as one sharded checkpoint (loadable at any layout; the vocabulary keeps its
padded size). Continue with `--load CKPT --finetune`, or convert on with tools/convert_to_hf.py.
Written into a temporary sibling of CKPT and renamed at the end: a failure leaves nothing behind.
Reading the rank files shows a progress bar (bytes) on a terminal; --no-progress turns it off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron.entry import check_writable_directory, os_error_text, run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--load", required=True, help="legacy checkpoint directory (tracker + iter_*/release)"
    )
    parser.add_argument(
        "--save", required=True, help="output checkpoint directory (must not exist, or be empty)"
    )
    parser.add_argument(
        "--tokenizer-file",
        default=None,
        help="tokenizer.json to copy beside the checkpoint and record in its config "
        "(default: record the legacy run's --tokenizer-file when it exists)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)"
    )
    return parser


def _run_config(legacy, model_config, tokenizer_file: Path | None, save: Path) -> dict:
    import dataclasses

    from megatron.config import Config

    sections = {
        "model": dataclasses.asdict(model_config),
        "parallel": {
            "tensor_model_parallel_size": legacy.tensor_model_parallel_size,
            "pipeline_model_parallel_size": legacy.pipeline_model_parallel_size,
        },
    }
    if tokenizer_file is not None:
        recorded = save.resolve() / "tokenizer.json"
        sections["data"] = {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": str(recorded)}
    return Config.from_dict(sections).to_dict()


def convert(args) -> Path:
    from megatron.checkpoint.legacy import read_legacy_checkpoint, save_converted_checkpoint
    from megatron.config import ModelConfig

    out = Path(args.save)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--save {out} already exists and is not an empty directory")
    check_writable_directory(out.parent, f"--save {out}")
    legacy = read_legacy_checkpoint(args.load, progress=False if args.no_progress else None)
    vocab = legacy.state_dict["embedding.word_embeddings.weight"].shape[0]
    model_config = ModelConfig(**legacy.model_config, vocab_size=vocab)
    model_config.validate()
    tokenizer_file = args.tokenizer_file or getattr(legacy.args, "tokenizer_file", None)
    if args.tokenizer_file and not Path(args.tokenizer_file).is_file():
        raise ValueError(f"--tokenizer-file {args.tokenizer_file}: no such file")
    tokenizer_file = Path(tokenizer_file) if tokenizer_file and Path(tokenizer_file).is_file() else None
    if tokenizer_file is not None:
        from megatron.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=str(tokenizer_file))
        if tokenizer.vocab_size > vocab:
            raise ValueError(
                f"vocabulary mismatch: {tokenizer_file} has {tokenizer.vocab_size} tokens but the checkpoint's "
                f"embedding.word_embeddings.weight has {vocab} rows"
            )
    try:
        return save_converted_checkpoint(
            legacy.state_dict,
            model_config,
            out,
            run_config=_run_config(legacy, model_config, tokenizer_file, out),
            iteration=legacy.iteration,
            extra={"converted_from": str(legacy.directory.resolve())},
            files={"tokenizer.json": tokenizer_file} if tokenizer_file is not None else None,
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
