"""Entry point: `python -m megatron.pretrain --config configs/tiny-cpu.yaml --data-path PREFIX ...`.

The config is parsed and validated before torch is imported, so a bad flag fails (exit status 2) in a
fraction of a second. Errors found while building the run (for example a tokenizer larger than the
model's vocabulary) also exit with status 2; a non-finite loss or gradient norm exits with status 1.
"""

from __future__ import annotations

import sys

from megatron.config import exit_with_error, parse_config
from megatron.training.vocab import checked_tokenizer


def _summary_line(summary) -> str:
    text = (
        f"> training done: {summary.iterations} iterations, {summary.consumed_samples} samples, "
        f"{summary.skipped_iterations} skipped, last lm loss {summary.final_lm_loss:.4f}, "
        f"{summary.seconds:.1f} s"
    )
    if summary.first_valid_lm_loss is not None and summary.last_valid_lm_loss is not None:
        ratio = summary.last_valid_lm_loss / summary.first_valid_lm_loss
        text += (
            f"; validation loss {summary.first_valid_lm_loss:.4f} -> {summary.last_valid_lm_loss:.4f} "
            f"({100.0 * ratio:.1f}% of the first)"
        )
    return text


def _check_single_process(cfg) -> None:
    """This release trains in one process: refuse a parallel layout instead of silently ignoring it."""
    parallel = cfg.parallel
    sizes = {
        "WORLD_SIZE": cfg.world_size,
        "--tensor-model-parallel-size": parallel.tensor_model_parallel_size,
        "--pipeline-model-parallel-size": parallel.pipeline_model_parallel_size,
    }
    asked = [f"{name} {value}" for name, value in sizes.items() if value and value > 1]
    if asked:
        exit_with_error(
            f"{', '.join(asked)}: this release trains in one process (world size 1, TP 1, PP 1); "
            "tensor, pipeline and data parallelism arrive with the parallelism milestone",
            prog="pretrain",
        )


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, build the run, train, print a summary. Returns the process exit status."""
    cfg = parse_config(argv)
    _check_single_process(cfg)
    try:
        tokenizer, _ = checked_tokenizer(cfg)  # before torch is imported: fails fast
        from megatron.training.train import NonFiniteError, build_run, train

        run = build_run(cfg, tokenizer=tokenizer)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        summary = train(run)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        run.metrics.close()
    print(_summary_line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
