"""--log-params-norm and --log-num-zeros-in-grad count each weight once on 2 gloo ranks: tensor parallel
(replicated layer norms and biases on both ranks), pipeline parallel (the tied word embedding on both
stages) and data parallel with the distributed optimizer (each rank's fragments of the masters).

The model's initialisation does not depend on the layout, so the parameter norm equals the one-process
model's; with every gradient zeroed, the zero count is exactly the number of weights of the whole model.
The values during training, through the CLI, are checked in tests/e2e/test_tensorboard_wandb.py."""

from __future__ import annotations

import math
import os

import pytest

from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from tests.host_syncs import loop_config

pytestmark = pytest.mark.slow

LAYOUTS = {  # name -> (tensor, pipeline parallel size, extra flags)
    "tp2": (2, 1, ("--tensor-model-parallel-size", "2")),
    "pp2": (1, 2, ("--pipeline-model-parallel-size", "2")),
    "dp2-distopt": (1, 1, ("--use-distributed-optimizer",)),
}


def _norm_and_zeros(state, workdir: str, dataset: str, tokenizer: str, flags: tuple) -> tuple:
    from megatron.training import builders
    from megatron.training.train import logical_num_parameters

    cfg = loop_config(workdir, dataset, tokenizer, "--bf16", *flags)
    model = builders.build_model(cfg, 1024, state)
    optimizer, _, _ = builders.build_optimization(cfg, model, state)
    optimizer.zero_grad()
    params_norm, num_zeros = optimizer.params_norm_and_zeros()
    return params_norm, num_zeros, logical_num_parameters(model, state)


def _every_layout(workdir: str, dataset: str, tokenizer: str) -> dict:
    results = {}
    for name, (tp, pp, flags) in LAYOUTS.items():
        state = ParallelState.initialize(tp, pp, backend="gloo")
        results[name] = _norm_and_zeros(state, os.path.join(workdir, name), dataset, tokenizer, flags)
    return results


def test_the_norms_count_each_weight_once_in_every_layout(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path):
    args = (tiny_dataset_prefix, str(tiny_tokenizer_path))
    one_norm, one_zeros, num_weights = _norm_and_zeros(
        ParallelState.single("cpu"), str(tmp_path / "one"), *args, ()
    )
    assert one_zeros == num_weights  # every gradient entry is zero
    ranks = run_distributed(_every_layout, 2, str(tmp_path), *args)
    for name in LAYOUTS:
        for rank, result in enumerate(ranks):
            params_norm, num_zeros, logical = result[name]
            assert logical == num_weights, (name, rank)
            assert num_zeros == num_weights, (name, rank, num_zeros, num_weights)
            # fp32 masters of the same bf16-rounded initial weights; only the summation order differs
            assert math.isclose(params_norm, one_norm, rel_tol=1e-6), (name, rank, params_norm, one_norm)
