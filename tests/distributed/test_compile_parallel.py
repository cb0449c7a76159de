"""`--torch-compile` under tensor, sequence and pipeline parallelism: the compiled stages and TP shards
compute what the eager one-process model computes (forward and backward). The collectives inside a
layer are graph breaks: torch.compile runs them eagerly between compiled pieces. Traced with the
aot_eager backend (the graphs and graph breaks of --torch-compile without code generation, which takes a
minute per rank on two shared cores); test_compile_levers.py checks inductor's numbers in one process.

Tolerance (1e-5 relative to the largest entry, as test_tensor_parallel.py): TP reorders fp32 sums, and
the compiled kernels fuse and reorder the elementwise ones; a missing or doubled reduction is O(1).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_fixtures import SEED, VOCAB, batch, relative_error
from test_pipeline_model import build_stages, reference_run, run_pipeline, stage_gradients

from megatron.model import GPTModel
from megatron.model import gpt as gpt_module
from megatron.parallel import collectives
from megatron.parallel.layers import gather_tensor
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.helpers import tiny_model_config

RTOL = 1e-5
pytestmark = pytest.mark.slow


def _tp_errors(state: ParallelState, reference: dict) -> dict[str, float]:
    tokens, labels = batch()
    model = GPTModel(tiny_model_config(torch_compile=True), VOCAB, state)
    model.init_weights(SEED)
    loss = model(tokens, labels=labels)
    loss.mean().backward()
    errors = {"loss": relative_error(loss.detach(), reference["loss"])}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        if param.tp_grad_reduce:
            collectives.all_reduce(grad, state.tp_group)
        errors[f"grad {name}"] = relative_error(
            gather_tensor(grad, param, state.tp_group), reference["grads"][name]
        )
    return errors


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _run_rank() -> dict:
    gpt_module.COMPILE_BACKEND = "aot_eager"
    state = ParallelState.initialize(2, 1, backend="gloo")
    reference = reference_run(tiny_model_config())
    errors = _tp_errors(dataclasses.replace(state, sequence_parallel=True), reference)
    return {"errors": errors, "compiled_graphs": _compiled_graphs()}


def test_compiled_tensor_parallel_layers_equal_one_process():
    """TP 2 with sequence parallelism (its gathers and reduce-scatters, and the TP all-reduces)."""
    for rank_result in run_distributed(_run_rank, 2, timeout=300):
        errors = rank_result["errors"]
        worst = max(errors, key=errors.get)
        assert errors[worst] < RTOL, f"{worst} off by {errors[worst]:.2e}"
        assert rank_result["compiled_graphs"] > 0


def test_compiled_pipeline_stages_equal_one_process(monkeypatch):
    monkeypatch.setattr(gpt_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()  # a fresh cache: earlier tests' graphs must not push this one past the limit
    graphs_before = _compiled_graphs()
    cfg = tiny_model_config(num_layers=4)
    reference = reference_run(cfg)
    stages = build_stages(dataclasses.replace(cfg, torch_compile=True), 2, {})
    tokens, labels = batch()
    loss = run_pipeline(stages, tokens, labels=labels)
    loss.mean().backward()
    assert relative_error(loss.detach(), reference["loss"]) < RTOL
    for name, grad in stage_gradients(stages).items():
        assert relative_error(grad, reference["grads"][name]) < RTOL, name
    assert _compiled_graphs() > graphs_before
