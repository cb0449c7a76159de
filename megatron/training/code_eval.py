"""Code evaluation during training (`--eval-code-interval N`): every N iterations, greedy completions of
the first `--eval-code-problems` HumanEval problems are generated with the model being trained and
executed in the evaluation sandbox; pass@1 is logged and written to the metrics file (`code_pass@1`,
TensorBoard / W&B `code-pass@1`).

The problems are dealt round-robin over the data-parallel ranks (each holds the whole model at tensor-
and pipeline-parallel size 1, the layouts this supports); one all-reduce of two numbers sums the passes.
At most 128 new tokens (half the context when that is smaller) per problem. A model too small for the
prompts sees their last tokens (docs/evaluation.md). Costs the time of generating and running the
subset: keep it small and the interval long.
"""

from __future__ import annotations

import torch

from megatron.config import ConfigError
from megatron.log import get_logger

logger = get_logger(__name__)
MAX_NEW_TOKENS = 128


def maybe_evaluate_code(run) -> dict | None:
    """Run the code evaluation when this iteration is on `--eval-code-interval`; its metrics or None."""
    interval = run.cfg.training.eval_code_interval
    if not interval:
        return None
    return None if run.state.iteration % interval else evaluate_code(run)  # layouts: checked by the config


def _check_layout(state) -> None:
    if state.tensor_model_parallel_size > 1 or state.pipeline_model_parallel_size > 1:
        raise ConfigError(
            "--eval-code-interval needs --tensor-model-parallel-size 1 and --pipeline-model-parallel-size 1 "
            f"(this run: {state.describe()}); evaluate saved checkpoints with tools/evaluate.py instead"
        )


def evaluate_code(run) -> dict:
    from megatron.evaluation.generation import GenerationSettings, generate_completions
    from megatron.evaluation.sandbox import run_programs
    from megatron.evaluation.tasks import load_task

    state, iteration = run.parallel_state, run.state.iteration
    _check_layout(state)
    run.optimizer.finish_param_sync()  # --overlap-param-gather: the forward needs the gathered parameters
    run.watchdog.beat(iteration, "code evaluation")
    problems = load_task("humaneval", limit=run.cfg.training.eval_code_problems)
    mine = problems[state.data_parallel_rank :: state.data_parallel_size]
    passed = 0
    if mine:
        context = run.model.config.max_position_embeddings or run.model.config.seq_length
        settings = GenerationSettings(max_new_tokens=min(MAX_NEW_TOKENS, context // 2))
        completions, _ = generate_completions(run.model, run.tokenizer, mine, settings, progress=False)
        programs = [problem.program(samples[0]) for problem, samples in zip(mine, completions)]
        passed = sum(outcome.passed for outcome in run_programs(programs, progress=False))
    counts = state.all_reduce_data_parallel(
        torch.tensor([passed, len(mine)], dtype=torch.float64, device=state.device)
    )
    metrics = {
        "iteration": iteration,
        "consumed_samples": run.state.consumed_samples,
        "code_pass@1": float(counts[0] / counts[1]),
        "code_eval_problems": int(counts[1]),
    }
    logger.info(
        f" code evaluation at iteration {iteration} | HumanEval pass@1 (greedy, first "
        f"{metrics['code_eval_problems']} problems): {metrics['code_pass@1']:.4f}"
    )
    run.metrics.write(metrics, iteration)
    return metrics
