"""Complete prompts (or fill in the middle) with a saved checkpoint: batched KV-cache decoding.

    python tools/generate.py --load CHECKPOINT_DIR --prompt 'def fibonacci(n):' [--max-new-tokens 64]
    python tools/generate.py --load CKPT --prompt 'import os' --prompt 'class A:' --temperature 0.8 --top-p 0.95
    python tools/generate.py --load CKPT --prefix 'def add(a, b):\n    ' --suffix '\n    return c\n'

Greedy unless --temperature > 0. Each row stops at end-of-document, at the first --stop string (the text
is cut before it) or after --max-new-tokens. Checkpoints of any parallel layout load into this one
process. The tokenizer defaults to the one the checkpoint was trained with (its stored config); pass
--tokenizer-type/--tokenizer-file (or --vocab-file/--merge-file, --tokenizer-model) to override.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--load",
        required=True,
        help="directory written by --save (sharded checkpoints of any layout, or basic ones), or one "
        "iter_XXXXXXX directory of a sharded checkpoint",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="text to complete (repeatable: a batch)"
    )
    parser.add_argument(
        "--prompt-file",
        default=None,
        help="a file of prompts, one per line, \\n for a newline inside one (added to --prompt)",
    )
    parser.add_argument("--prefix", default=None, help="FIM: the code before the hole (needs --suffix)")
    parser.add_argument("--suffix", default=None, help="FIM: the code after the hole (needs --prefix)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to generate at most per prompt"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens of probability p (1 = all)",
    )
    parser.add_argument("--stop", action="append", default=[], help="stop a row at this string (repeatable)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sampling generator")
    parser.add_argument(
        "--no-kv-cache", action="store_true", help="re-run the whole sequence every step (slow; a reference)"
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking every checkpoint file against its manifest (sizes and checksums, as training "
        "does; default: checked, and a damaged checkpoint is refused naming the file); sizes are still checked",
    )
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


def _check_args(args: argparse.Namespace) -> str | None:
    """An error message for inconsistent flags, None when they are fine."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if (args.prefix is None) != (args.suffix is None):
        return "--prefix and --suffix go together (FIM fills the middle between them)"
    if args.prefix is not None and (args.prompt or args.prompt_file):
        return "--prefix/--suffix (FIM) cannot be combined with --prompt/--prompt-file"
    if args.prefix is None and not (args.prompt or args.prompt_file):
        return "give --prompt (repeatable), --prompt-file, or --prefix with --suffix"
    if args.prompt_file is not None and not os.path.isfile(args.prompt_file):
        return f"--prompt-file {args.prompt_file}: no such file"
    if args.temperature < 0:
        return f"--temperature must be >= 0 (0 is greedy), got {args.temperature}"
    if args.top_k < 0:
        return f"--top-k must be >= 0, got {args.top_k}"
    if not 0.0 < args.top_p <= 1.0:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    return None


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [_unescape(line) for line in lines if line.strip()]
    return prompts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    error = _check_args(args)
    if error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    from megatron.data.tokenizer import build_tokenizer
    from megatron.inference.generate import (
        SamplingParams,
        generate_text,
        load_model_from_checkpoint,
        read_checkpoint_config,
    )

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    fim = None if args.prefix is None else [(_unescape(args.prefix), _unescape(args.suffix))]
    prompts = None if fim else _prompts(args)
    try:
        stored = read_checkpoint_config(args.load)
        tokenizer_args = _tokenizer_args(args, stored.get("data", {}))
        tokenizer = build_tokenizer(tokenizer_args.pop("tokenizer_type"), **tokenizer_args)
        model = load_model_from_checkpoint(args.load, verify=not args.no_verify)
        texts = generate_text(
            model,
            tokenizer,
            prompts,
            args.max_new_tokens,
            sampling=sampling,
            stop=[_unescape(text) for text in args.stop] or None,
            fim=fim,
            use_cache=not args.no_kv_cache,
        )
    except ValueError as error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    mode = "greedy" if sampling.greedy else f"sampled (temperature {args.temperature}, seed {args.seed})"
    shown = prompts if fim is None else [f"<prefix>{fim[0][0]}<suffix>{fim[0][1]}"]
    for prompt, text in zip(shown, texts):
        print(f"--- prompt ---\n{prompt}\n--- {mode} {'middle' if fim else 'completion'} ---\n{text}")
    return 0


def _unescape(text: str) -> str:
    r"""Shell-friendly escapes in --prefix/--suffix (`\n`, `\t`)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


if __name__ == "__main__":
    sys.exit(main())
