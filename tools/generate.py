"""Greedy completion of a prompt from a saved checkpoint.

    python tools/generate.py --load CHECKPOINT_DIR --prompt 'def fibonacci(n):' [--max-new-tokens 64]

The tokenizer defaults to the one the checkpoint was trained with (its stored config); pass
--tokenizer-type/--tokenizer-file (or --vocab-file/--merge-file, --tokenizer-model) to override.
This is the quickstart's minimal generator (greedy, no KV cache); sampling, FIM prompts and batched
KV-cache decoding come with the inference milestone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--load",
        required=True,
        help="directory written by --save (sharded checkpoints of any layout, or basic ones), or one "
        "iter_XXXXXXX directory of a sharded checkpoint",
    )
    parser.add_argument("--prompt", required=True, help="text to complete")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    parser.add_argument("--tokenizer-type", default=None, help="default: the checkpoint's tokenizer type")
    parser.add_argument("--tokenizer-file", default=None, help="tokenizer.json (TokenizerFromFile)")
    parser.add_argument("--vocab-file", default=None, help="vocab.json (GPT2BPETokenizer)")
    parser.add_argument("--merge-file", default=None, help="merges.txt (GPT2BPETokenizer)")
    parser.add_argument("--tokenizer-model", default=None, help="SentencePiece model")
    return parser


def _tokenizer_args(args: argparse.Namespace, stored: dict) -> dict:
    """The tokenizer flags given on the command line, else those stored with the checkpoint."""
    names = ("tokenizer_type", "tokenizer_file", "vocab_file", "merge_file", "tokenizer_model")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if given:
        given.setdefault("tokenizer_type", "TokenizerFromFile")
        return given
    return {name: stored.get(name) for name in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print(f"generate: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    from megatron.data.tokenizer import build_tokenizer
    from megatron.inference.generate import generate, load_model_from_checkpoint, read_checkpoint_config

    try:
        stored = read_checkpoint_config(args.load)
        tokenizer_args = _tokenizer_args(args, stored.get("data", {}))
        tokenizer = build_tokenizer(tokenizer_args.pop("tokenizer_type"), **tokenizer_args)
        model = load_model_from_checkpoint(args.load)
    except ValueError as error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    completion = generate(model, tokenizer, args.prompt, args.max_new_tokens)
    print(f"--- prompt ---\n{args.prompt}\n--- greedy completion ---\n{completion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
