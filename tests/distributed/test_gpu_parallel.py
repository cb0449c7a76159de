"""GPU (marker `gpu`): tensor and sequence parallelism on CUDA tensors, two gloo ranks sharing one GPU.

NCCL refuses two ranks on one device, so the CUDA code paths of the parallel layers (mappings on CUDA
tensors, the per-rank CUDA random stream, SDPA on local heads, the grad buffer on the GPU) are exercised
with gloo, which moves CUDA tensors through host memory. fp32 must match one process (TF32 off); bf16
must train and stay close to one process in bf16.
"""

from __future__ import annotations

import pytest
import torch

from megatron.config import OptimizerConfig, ParallelConfig
from megatron.parallel.testing import run_distributed
from tests.helpers import tiny_model_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
VOCAB, SEQ, ITERS = 128, 64, 5


def _train(tp: int, dtype_name: str, dropout: float = 0.0) -> list[float]:
    from megatron.model import GPTModel
    from megatron.parallel.state import ParallelState
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step

    torch.backends.cuda.matmul.allow_tf32 = False
    if tp == 1:
        state = ParallelState.single("cuda")
    else:
        state = ParallelState.initialize(tp, 1, sequence_parallel=True, backend="gloo", device="cuda:0")
    state.seed(1234)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = GPTModel(tiny_model_config(seq_length=SEQ, dropout=dropout), VOCAB, state)
    model.init_weights(1234)
    model = model.to(device="cuda", dtype=dtype)
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp, sequence_parallel=tp > 1, overlap_grad_reduce=True
    )
    optimizer = build_optimizer(
        model, OptimizerConfig(lr=3e-3, adam_eps=1e-6), parallel_state=state, parallel_config=parallel
    )
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (4, SEQ + 1), generator=generator).cuda()
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(4, SEQ, device="cuda"),
    }
    losses = []
    for _ in range(ITERS):
        losses.append(train_step(model, optimizer, [batch], state).lm_loss)
    return losses


@pytest.mark.parametrize("dtype_name, rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_tensor_sequence_parallel_on_cuda_matches_one_gpu(dtype_name, rtol):
    reference = _train(1, dtype_name)
    results = run_distributed(_train, 2, 2, dtype_name, timeout=300)
    assert results[0] == results[1]
    for got, expected in zip(results[0], reference, strict=True):
        assert abs(got - expected) <= rtol * expected, (results[0], reference)
    assert reference[-1] < reference[0]


def test_dropout_streams_on_cuda_under_tensor_parallelism():
    # attention dropout and sequence-parallel hidden dropout draw from the per-rank CUDA stream
    results = run_distributed(_train, 2, 2, "fp32", 0.1, timeout=300)
    assert results[0] == results[1]  # the loss is reduced: the same on both TP ranks
    assert all(torch.isfinite(torch.tensor(results[0]))) and results[0][-1] < results[0][0]
