"""Every tensor/sequence/data-parallel layout trains the same model as one process (the acceptance matrix).

One spawn per world size (2, 4 and 8 ranks on the strict backend: gloo that fails on what NCCL would not
run, megatron/parallel/strict_backend.py) trains every layout of that size for both attention types,
10 iterations each, through the real `train_step` and `MixedPrecisionOptimizer`; the one-process runs are
done here in the test process. Each layout is then compared to one process: the loss of every iteration
and the final TP-gathered weights.

Tolerances. The layouts compute the same fp32 arithmetic in a different order: a TP rank sums part of
each GEMM's reduction dimension and the parts are added by the all-reduce, the vocab-parallel softmax
sums exp() per shard, DP adds each rank's micro-batch gradients before adding the ranks. Each reordering
moves a result by a few fp32 ulps.
- Losses: relative 1e-5 (measured at most 2e-7 in every layout).
- Weights: per tensor, the L2 norm of the difference from one process is at most UPDATE_RTOL = 1e-3 of
  the L2 norm of the tensor's own training update (final minus initial weights, one process). Why a
  norm relative to the update, not each element relative to the weights: a summation order moves each
  gradient element g by a few ulps of the sum of its terms' magnitudes (delta), and AdamW divides each
  element's step by that element's own gradient magnitude, so its step moves by about
  lr * delta / (|g| + eps). For almost every element that is a tiny fraction of the step, but an element
  whose gradient nearly cancels (|g| ~ delta) can take a different step of up to ~lr whatever the layout:
  how large the worst element's error is depends on the data and on which order the code happens to
  use, not on right or wrong (bounded by 1e-4 of the largest weight, tp4-sp-multiquery failed at 1.15e-4
  once sequence parallelism used a true reduce-scatter, and passes at 6.9e-5 with the counter-based
  init). Those few elements carry a negligible share of the update's norm. Measured over the
  whole matrix: at most 1.0e-5 of the update (every layout, both attention types; 3e-6 at DP only,
  6e-6 to 1e-5 with TP). A wrong reduction changes the update itself: dropping the TP sum of the
  multi-query K/V gradients gives 0.76-1.0, dropping the TP sum of the LayerNorm gradients under sequence
  parallelism 1.1-1.2 (TP 2, same run). 1e-3 sits two orders of magnitude above round-off and almost
  three below a missing reduction. (A doubled reduction leaves AdamW's normalised steps almost unchanged;
  the gradient norms, compared to 1e-4, catch it.) The test uses adam_eps 1e-6 instead of 1e-8, which
  caps the per-element amplification above.
- The key bias: see KEY_BIAS_ATOL.
Overlapped and non-overlapped gradient reduction (and, with the distributed optimizer, the overlapped
parameter all-gather of --overlap-param-gather) run identical arithmetic and must be bit-identical.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron.config import OptimizerConfig, ParallelConfig
from megatron.model import GPTModel, build_model
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import DistributedTestError, run_distributed
from tests.helpers import tiny_model_config

VOCAB = 128
SEQ = 32
MICRO_BATCH = 2
GLOBAL_BATCH = 8
ITERATIONS = 10
SEED = 1234
BUCKET_SIZE = 12_000  # elements: several buckets in the tiny model, so overlap really interleaves
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3  # of each tensor's update norm (see the module docstring)
# The key bias gets an exactly zero gradient (adding a constant to every key shifts all scores of a query
# equally, and softmax ignores that), so its round-off-sized gradients are all AdamW sees; the normalised
# update turns them into a walk of ~lr-sized steps whose direction depends on summation order. Those
# elements are compared in absolute terms: they stay within a few 1e-6 of zero in every layout.
KEY_BIAS_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    world: int
    tp: int
    pp: int = 1
    virtual_stage_layers: int | None = None  # --num-layers-per-virtual-pipeline-stage (interleaved 1F1B)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    overlap: bool = False


LAYOUTS = [
    Layout("tp2", 2, 2),
    Layout("tp2-sp", 2, 2, sequence_parallel=True),
    Layout("dp2", 2, 1),
    Layout("dp2-overlap", 2, 1, overlap=True),
    Layout("dp2-distopt", 2, 1, distributed_optimizer=True),
    Layout("pp2", 2, 1, pp=2),
    Layout("tp4", 4, 4),
    Layout("tp4-sp", 4, 4, sequence_parallel=True),
    Layout("tp2xdp2-sp-distopt", 4, 2, sequence_parallel=True, distributed_optimizer=True),
    Layout(
        "tp2xdp2-sp-distopt-overlap", 4, 2, sequence_parallel=True, distributed_optimizer=True, overlap=True
    ),
    Layout("pp4", 4, 1, pp=4),
    Layout("pp2-interleaved", 4, 1, pp=2, virtual_stage_layers=1),  # DP 2 too: 4 ranks
    Layout("tp2xpp2", 4, 2, pp=2),
    Layout(
        "tp2xpp2xdp2-sp-distopt", 8, 2, pp=2, sequence_parallel=True, distributed_optimizer=True, overlap=True
    ),
]
HEAD_TYPES = ("multiquery", "multihead")


def optimizer_config() -> OptimizerConfig:
    return OptimizerConfig(lr=3e-3, weight_decay=0.1, clip_grad=1.0, adam_beta2=0.95, adam_eps=1e-6)


def global_batch(iteration: int) -> list[dict]:
    """The GLOBAL_BATCH sequences of one iteration, as micro-batches in loader order, with some
    loss-masked tokens so the global token mean is exercised. Two batches alternate, so that ten steps
    visibly lower the loss (memorisation) and a layout that does not train cannot pass."""
    generator = torch.Generator().manual_seed(SEED + iteration % 2)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=generator) > 0.2).float()
    batches = []
    for start in range(0, GLOBAL_BATCH, MICRO_BATCH):
        rows = slice(start, start + MICRO_BATCH)
        batches.append(
            {
                "tokens": tokens[rows, :-1].contiguous(),
                "labels": tokens[rows, 1:].contiguous(),
                "loss_mask": loss_mask[rows].contiguous(),
            }
        )
    return batches


def key_bias_mask(name: str, tensor: torch.Tensor, head_type: str) -> torch.Tensor:
    """True on the key-bias elements of `tensor` (see KEY_BIAS_ATOL), False elsewhere."""
    mask = torch.zeros(tensor.shape, dtype=torch.bool)
    d = 64 // 4  # kv_channels of model_config
    if name.endswith("attention.key_value.bias"):  # [K (d), V (d)]
        mask[:d] = True
    elif name.endswith("attention.query_key_value.bias"):  # head-major [heads, (q, k, v), d]
        mask.view(4, 3, d)[:, 1] = True
    return mask


def rank_micro_batches(batches: list[dict], dp_rank: int, dp_size: int) -> list[dict]:
    """The loader's assignment: each global step of MICRO_BATCH * dp consecutive samples gives rank r
    its r-th micro-batch."""
    return [batch for index, batch in enumerate(batches) if index % dp_size == dp_rank]


def train(state: ParallelState, head_type: str, layout: Layout | None) -> dict:
    """ITERATIONS steps of the tiny model in this layout; losses, grad norms and gathered weights."""
    from megatron.parallel.debug import check_replicas
    from megatron.parallel.layers import full_state_dict
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step

    state.seed(SEED)
    parallel = ParallelConfig(
        tensor_model_parallel_size=state.tensor_model_parallel_size,
        pipeline_model_parallel_size=state.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=layout.virtual_stage_layers if layout else None,
        sequence_parallel=state.sequence_parallel,
        use_distributed_optimizer=bool(layout and layout.distributed_optimizer),
        overlap_grad_reduce=bool(layout and layout.overlap),
        overlap_param_gather=bool(layout and layout.overlap and layout.distributed_optimizer),
        ddp_bucket_size=BUCKET_SIZE,
    )
    model = build_model(
        tiny_model_config(num_layers=4, attention_head_type=head_type, seq_length=SEQ),
        VOCAB,
        state,
        parallel,
    )
    model.init_weights(SEED)
    initial = (
        None if layout else {name: value.clone() for name, value in full_state_dict(model, state).items()}
    )
    optimizer = build_optimizer(model, optimizer_config(), parallel_state=state, parallel_config=parallel)
    losses, norms = [], []
    for iteration in range(ITERATIONS):
        batches = rank_micro_batches(
            global_batch(iteration), state.data_parallel_rank, state.data_parallel_size
        )
        output = train_step(model, optimizer, batches, state)
        assert output.update_successful
        losses.append(output.lm_loss)
        norms.append(output.grad_norm)
    optimizer.finish_param_sync()  # --overlap-param-gather: the weights are read below
    compared = check_replicas(model, state)
    weights = full_state_dict(model, state)
    return {
        "losses": losses,
        "grad_norms": norms,
        "weights": weights if state.rank == 0 else None,
        "initial_weights": initial,
        "replicas_compared": compared,
        "state_bytes": optimizer.state_bytes(),
    }


def _train_layouts(world: int) -> dict:
    results = {}
    for layout in (layout for layout in LAYOUTS if layout.world == world):
        state = ParallelState.initialize(
            layout.tp, layout.pp, sequence_parallel=layout.sequence_parallel, backend="strict"
        )
        for head_type in HEAD_TYPES:
            results[(layout.name, head_type)] = train(state, head_type, layout)
    return results


@pytest.fixture(scope="module")
def reference() -> dict:
    torch.set_num_threads(1)
    return {head_type: train(ParallelState.single("cpu"), head_type, None) for head_type in HEAD_TYPES}


@pytest.fixture(scope="module")
def parallel_results() -> dict:
    results = {}
    for world in (2, 4, 8):
        per_rank = run_distributed(_train_layouts, world, world, timeout=600)
        for key, rank0 in per_rank[0].items():
            # every rank reports the same loss sequence (the loss is reduced over DP, whole on each TP rank)
            for other in per_rank[1:]:
                assert other[key]["losses"] == rank0["losses"], key
            results[key] = dict(rank0, per_rank=[r[key] for r in per_rank])
    return results


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_layout_matches_one_process(layout, head_type, reference, parallel_results):
    ref = reference[head_type]
    got = parallel_results[(layout.name, head_type)]
    worst_loss = max(_relative(a, b) for a, b in zip(got["losses"], ref["losses"], strict=True))
    assert worst_loss <= LOSS_RTOL, (got["losses"], ref["losses"])
    # the losses changed: a run that did not train would match trivially
    assert ref["losses"][-1] < ref["losses"][0] - 0.05
    assert set(got["weights"]) == set(ref["weights"])
    for name, expected in ref["weights"].items():
        actual = got["weights"][name]
        assert actual.shape == expected.shape, name
        zero_grad = key_bias_mask(name, expected, head_type)
        update = (expected - ref["initial_weights"][name])[~zero_grad].norm().item()
        error = (actual - expected)[~zero_grad].norm().item()
        assert error <= UPDATE_RTOL * update, (name, error, update)
        if zero_grad.any():
            assert (actual - expected)[zero_grad].abs().max().item() <= KEY_BIAS_ATOL, name
    for norm, ref_norm in zip(got["grad_norms"], ref["grad_norms"], strict=True):
        assert math.isclose(norm, ref_norm, rel_tol=1e-4), (got["grad_norms"], ref["grad_norms"])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize(
    "plain, overlapped", [("dp2", "dp2-overlap"), ("tp2xdp2-sp-distopt", "tp2xdp2-sp-distopt-overlap")]
)
def test_overlapped_reduction_is_bit_identical(plain, overlapped, head_type, parallel_results):
    a, b = parallel_results[(plain, head_type)], parallel_results[(overlapped, head_type)]
    assert a["losses"] == b["losses"]
    assert a["grad_norms"] == b["grad_norms"]
    for name, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][name]), name


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_distributed_optimizer_holds_one_dp_share_of_the_state(head_type, parallel_results):
    whole = parallel_results[("dp2", head_type)]["state_bytes"]
    for rank_result in parallel_results[("dp2-distopt", head_type)]["per_rank"]:
        share = rank_result["state_bytes"]
        # 1/DP of the whole, plus at most the padding that makes each bucket split evenly
        assert whole / 2 <= share <= whole / 2 + 3 * 4 * 2 * 64, (share, whole)


def test_replicas_checked_after_training(parallel_results):
    # TP 2 x DP 2: every rank compared its replicated parameters with its TP and DP partners
    for result in parallel_results[("tp2xdp2-sp-distopt", "multiquery")]["per_rank"]:
        assert result["replicas_compared"] > 0


def _missing_kv_reduction(head_type: str) -> None:
    """Train TP 2 with the K/V gradient reduction switched off: the replica check must catch it."""
    from megatron.parallel.debug import check_replicas
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step

    state = ParallelState.initialize(2, 1, backend="strict")
    state.seed(SEED)
    model = GPTModel(
        tiny_model_config(num_layers=4, attention_head_type=head_type, seq_length=SEQ), VOCAB, state
    )
    model.init_weights(SEED)
    for name, param in model.named_parameters():
        if "key_value" in name:
            param.tp_grad_reduce = False  # the BigCode bug: K/V gradients not summed over TP
    optimizer = build_optimizer(model, optimizer_config(), parallel_state=state)
    train_step(model, optimizer, global_batch(0), state)
    check_replicas(model, state, iteration=1)


def test_replica_check_names_the_parameter_a_missing_reduction_breaks():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_missing_kv_reduction, 2, "multiquery", timeout=300)
    message = str(info.value)
    assert "ReplicaMismatchError" in message and "at iteration 1" in message
    assert "layers.0.attention.key_value" in message and "tensor-parallel" in message
