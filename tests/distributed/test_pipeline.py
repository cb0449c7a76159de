"""Pipeline schedules (megatron/parallel/pipeline.py) on spawned ranks of the strict backend (gloo checking
NCCL's rules: collectives in one order, p2p messages matched per pair in posting order, tags ignored).

A small chunked model with GPTModel's pipeline interface (`ToyPipelineModel`: an embedding, one
residual tanh block per virtual stage, the tied embedding as output head) runs the real schedules and
p2p. Each layout is compared with the same model in one process (all virtual stages as chunks of one
model, no pipelining). Every micro-batch's forward and backward then computes the same operations on
the same values in both, and each chunk's micro-batches run in the same order, so losses and gradients
are bit-identical; only the tied embedding differs in summation order (its lookup and output-head
gradients are summed on two stages, then added), compared to 1e-6 relative.

One spawn per world size checks the traces, in-flight counts, forward-only runs, gradients and optimizer
steps (2 ranks: PP 2, 1F1B and interleaved; 4 ranks: PP 4, 1F1B and interleaved, and PP 2 x DP 2 with
overlapped gradient reduction). Failures get their own spawns (a short distributed timeout, and the
harness left to let every rank end by itself: `run_distributed(..., kill_on_error=False)`, itself
checked here too). The GPTModel PP 2 step is compared with one process here;
the full GPTModel parity matrix is tests/distributed/test_parity.py.
"""

from __future__ import annotations

import itertools
import os
import time
import zlib
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron.config import OptimizerConfig, ParallelConfig
from megatron.model import build_model
from megatron.parallel import pipeline
from megatron.parallel.collectives import COMM_BYTES
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import DistributedTestError, run_distributed
from megatron.training.grad_scaler import ConstantGradScaler
from megatron.training.optimizer import build_optimizer, clip_grad_norm
from megatron.training.step import forward_backward
from tests.distributed.schedule_orders import (
    expected_1f1b_order,
    expected_interleaved_order,
    max_in_flight,
    parse_order,
)
from tests.helpers import tiny_model_config
from tests.host_syncs import count_host_syncs

HIDDEN = 8
VOCAB = 16
MICRO_BATCH = 2
SEQ = 4
SEED = 7
EMBEDDING = "embedding"  # the tied word embedding's name on the first and the last stage
EMBEDDING_RTOL = 1e-6  # its two gradient halves are added in another order (module docstring)
ERROR_TIMEOUT_MINUTES = 0.2  # the failure tests' distributed timeout: 12 s
# (name, pipeline size, chunks per rank, micro-batch counts) of the runs checked per spawn
SCHEDULES = {
    2: [("1f1b", 2, 1, (1, 2, 3, 5)), ("interleaved", 2, 2, (2, 4, 6))],
    4: [("1f1b", 4, 1, (1, 3, 4, 8)), ("interleaved", 4, 2, (4, 8))],
}

# Interleaved 1F1B with 2 chunks per rank, worked out by hand from the schedule's definition (see
# tests/distributed/schedule_orders.py), one line per pipeline rank: "F3.1" is micro-batch 3's forward
# through chunk 1. Forwards go in groups of P micro-batches through chunk 0, then chunk 1; backwards
# through chunk 1, then chunk 0. With m == P every rank runs every forward first; with m == 2P rank r
# warms up with (P - r - 1) * 2 + P forwards, then alternates, then runs the backwards left.
INTERLEAVED_BY_HAND = {  # (P, m): rank 0, rank 1, ...
    (2, 2): [
        "F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0",
        "F0.0 F1.0 F0.1 F1.1 B0.1 B1.1 B0.0 B1.0",
    ],
    (2, 4): [
        "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0",
        "F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0",
    ],
    (4, 4): 4 * ["F0.0 F1.0 F2.0 F3.0 F0.1 F1.1 F2.1 F3.1 B0.1 B1.1 B2.1 B3.1 B0.0 B1.0 B2.0 B3.0"],
    (4, 8): [
        "F0.0 F1.0 F2.0 F3.0 F0.1 F1.1 F2.1 F3.1 F4.0 F5.0 F6.0 B0.1 F7.0 B1.1 F4.1 B2.1 F5.1 B3.1 "
        "F6.1 B0.0 F7.1 B1.0 B2.0 B3.0 B4.1 B5.1 B6.1 B7.1 B4.0 B5.0 B6.0 B7.0",
        "F0.0 F1.0 F2.0 F3.0 F0.1 F1.1 F2.1 F3.1 F4.0 B0.1 F5.0 B1.1 F6.0 B2.1 F7.0 B3.1 "
        "F4.1 B0.0 F5.1 B1.0 F6.1 B2.0 F7.1 B3.0 B4.1 B5.1 B6.1 B7.1 B4.0 B5.0 B6.0 B7.0",
        "F0.0 F1.0 F2.0 F3.0 F0.1 F1.1 F2.1 B0.1 F3.1 B1.1 F4.0 B2.1 F5.0 B3.1 F6.0 B0.0 "
        "F7.0 B1.0 F4.1 B2.0 F5.1 B3.0 F6.1 B4.1 F7.1 B5.1 B6.1 B7.1 B4.0 B5.0 B6.0 B7.0",
        "F0.0 F1.0 F2.0 F3.0 F0.1 B0.1 F1.1 B1.1 F2.1 B2.1 F3.1 B3.1 F4.0 B0.0 F5.0 B1.0 "
        "F6.0 B2.0 F7.0 B3.0 F4.1 B4.1 F5.1 B5.1 F6.1 B6.1 F7.1 B7.1 B4.0 B5.0 B6.0 B7.0",
    ],
}


class ToyPipelineModel(nn.Module):
    """Pipeline rank `rank` of `pp`, with `num_chunks` chunks: chunk c is virtual stage c * pp + rank, a
    residual block x + tanh(linear(x)) over hidden size 8. Rank 0's chunk 0 embeds the tokens first; the
    last rank's last chunk ends with the output head (the word embedding, tied: a duplicate on the last
    stage carrying `pipeline_duplicate`, both copies `embedding_group_reduce`) and the per-token loss.
    Parameters are named and initialised by their global virtual stage, so any layout holds the same
    weights as `ToyPipelineModel(1, 0, pp * num_chunks)`, the whole model.

    `fail=("F" | "B", n)` raises ValueError in the n-th forward call, or in the backward of the n-th
    forward call, on this rank.
    """

    def __init__(self, pp: int, rank: int, num_chunks: int, *, fail: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.pp, self.rank, self.num_chunks = pp, rank, num_chunks
        self.stages = [chunk * pp + rank for chunk in range(num_chunks)]
        self.blocks = nn.ModuleDict({str(stage): nn.Linear(HIDDEN, HIDDEN) for stage in self.stages})
        if rank in (0, pp - 1):
            self.embedding = nn.Parameter(torch.empty(VOCAB, HIDDEN))
            if pp > 1:
                self.embedding.embedding_group_reduce = True
                self.embedding.pipeline_duplicate = rank == pp - 1
        with torch.no_grad():
            for name, param in self.named_parameters():
                generator = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
                param.normal_(0.0, 1.0 if name == EMBEDDING else 0.4, generator=generator)
        self.fail = fail
        self.num_forwards = 0

    def chunk_is_first(self, chunk: int) -> bool:
        return self.rank == 0 and chunk == 0

    def chunk_is_last(self, chunk: int) -> bool:
        return self.rank == self.pp - 1 and chunk == self.num_chunks - 1

    def pipeline_hidden_shape(self, micro_batch_size: int, seq_length: int) -> tuple[int, int, int]:
        return (micro_batch_size, seq_length, HIDDEN)

    def forward_chunk(
        self, chunk, *, tokens=None, hidden=None, position_ids=None, attention_mask=None, labels=None
    ):
        self.num_forwards += 1
        if self.fail == ("F", self.num_forwards):
            raise ValueError(
                f"deliberate failure in forward {self.num_forwards} on pipeline rank {self.rank}"
            )
        x = self.embedding[tokens] if self.chunk_is_first(chunk) else hidden  # [b, s, h]
        x = x + torch.tanh(self.blocks[str(self.stages[chunk])](x))
        if self.fail == ("B", self.num_forwards):
            x.register_hook(self._raise_in_backward)
        if not self.chunk_is_last(chunk):
            return x
        logits = x @ self.embedding.t()  # [b, s, V]
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)

    def _raise_in_backward(self, grad):
        raise ValueError(f"deliberate failure in backward on pipeline rank {self.rank}")

    def forward(self, tokens, position_ids=None, attention_mask=None, labels=None):
        """The whole model (one rank holding every virtual stage)."""
        assert self.pp == 1
        x = None
        for chunk in range(self.num_chunks):
            x = self.forward_chunk(chunk, tokens=tokens if chunk == 0 else None, hidden=x, labels=labels)
        return x


def toy_batches(num_micro_batches: int, iteration: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(1000 * iteration + num_micro_batches)
    batches = []
    for _ in range(num_micro_batches):
        data = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        loss_mask = (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.25).float()
        batches.append({"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": loss_mask})
    return batches


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@contextmanager
def _watch_sent_outputs():
    """Yields a list that gets, at every backward of the schedule on this rank, (outputs sent on and
    waiting for their backward, bytes of data those output tensors still hold)."""
    seen, original = [], pipeline._StageRunner.backward

    def backward(runner, chunk, micro_batch, grad):
        sent = [out for _, out in runner.saved.values() if out.dim() > 0 and out is not runner.unsent]
        seen.append((len(sent), sum(out.untyped_storage().nbytes() for out in sent)))
        return original(runner, chunk, micro_batch, grad)

    pipeline._StageRunner.backward = backward
    try:
        yield seen
    finally:
        pipeline._StageRunner.backward = original


def _schedule_run(state, num_chunks: int, num_micro_batches: int, *, forward_only: bool) -> dict:
    """One forward_backward of the toy model on this rank, plain autograd; trace, loss, gradients, the
    outputs held while waiting for their backward and the pipeline bytes sent."""
    model = ToyPipelineModel(
        state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank, num_chunks
    )
    trace: pipeline.Trace = []
    COMM_BYTES.reset()
    with _watch_sent_outputs() as held:
        loss_sum, tokens = forward_backward(
            model, None, toy_batches(num_micro_batches), state, forward_only=forward_only, trace=trace
        )
    return {
        "trace": trace,
        "loss_sum": loss_sum.item(),
        "tokens": tokens.item(),
        "grads": _grads(model),
        "held": held,
        "pp_bytes": (COMM_BYTES.bytes.get(("pp", "send"), 0), COMM_BYTES.calls.get(("pp", "send"), 0)),
    }


def _optimizer_config() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=0.5, adam_eps=1e-6)


def _train_toy(
    state, num_chunks: int, *, overlap=False, loss_scale=None, iterations=2, micro_batches=4
) -> dict:
    """A few optimizer steps of the toy model through train_step (tied embedding reduction, grad norm
    with the duplicate skipped, fp16-style loss scaling on fp32 weights); the DP ranks split each global
    batch's micro-batches."""
    from megatron.training.step import train_step

    pp, rank = state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank
    model = ToyPipelineModel(pp, rank, num_chunks)
    parallel = ParallelConfig(overlap_grad_reduce=overlap, ddp_bucket_size=40)  # several buckets
    scaler = ConstantGradScaler(loss_scale) if loss_scale else None
    optimizer = build_optimizer(
        model, _optimizer_config(), grad_scaler=scaler, parallel_state=state, parallel_config=parallel
    )
    dp, dp_rank = state.data_parallel_size, state.data_parallel_rank
    losses, norms, steps = [], [], []
    for iteration in range(iterations):
        batches = toy_batches(micro_batches, iteration)[dp_rank::dp]
        output, syncs = _counted_step(state, iteration, train_step, model, optimizer, batches, state)
        assert output.update_successful, output
        losses.append(output.lm_loss)
        norms.append(output.grad_norm)
        steps.append((syncs, output.stop_requested))
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": norms, "weights": weights, "steps": steps}


STOP_ITERATION = 1  # the last rank (only) asks to stop there: every rank's step must report it


def _counted_step(state, iteration: int, train_step, *args):
    """train_step(*args) with the last rank's SIGTERM flag raised at STOP_ITERATION; (output, host syncs)."""
    asked = state.rank == state.world_size - 1 and iteration == STOP_ITERATION
    with count_host_syncs() as syncs:
        output = train_step(*args, stop_requested=lambda: asked)
    return output, syncs.count


GPT_VOCAB = 128
GPT_SEQ = 16
GPT_ITERATIONS = 3
GPT_MICRO_BATCHES = 4
# PP 2 runs the same kernels on the same tensors as one process; the tied embedding's gradient is one
# fp32 addition of two partial sums in another grouping, and AdamW (eps 1e-6, as in test_parity.py)
# can amplify such round-off in elements whose gradient nearly cancels: the tolerances of test_parity.py.
GPT_LOSS_RTOL = 1e-5
GPT_WEIGHT_TOL = 1e-4  # of each tensor's largest magnitude


def _gpt_batches(iteration: int) -> list[dict]:
    generator = torch.Generator().manual_seed(SEED + iteration)
    batches = []
    for _ in range(GPT_MICRO_BATCHES):
        data = torch.randint(0, GPT_VOCAB, (MICRO_BATCH, GPT_SEQ + 1), generator=generator)
        loss_mask = (torch.rand(MICRO_BATCH, GPT_SEQ, generator=generator) > 0.2).float()
        batches.append({"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": loss_mask})
    return batches


def _train_gpt(state, layers_per_virtual_stage: int | None = None) -> dict:
    """GPT_ITERATIONS steps of a 4-layer GPTModel through train_step (overlapped reduction, so a wrong
    last_micro_batch would raise); losses, grad norms and the weights gathered over the pipeline."""
    from megatron.parallel.layers import full_state_dict
    from megatron.training.step import train_step

    config = tiny_model_config(num_layers=4, seq_length=GPT_SEQ)
    parallel = ParallelConfig(
        pipeline_model_parallel_size=state.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage,
        overlap_grad_reduce=True,
        ddp_bucket_size=12_000,
    )
    model = build_model(config, GPT_VOCAB, state, parallel)
    model.init_weights(SEED)
    optimizer_config = OptimizerConfig(
        lr=3e-3, weight_decay=0.1, clip_grad=1.0, adam_beta2=0.95, adam_eps=1e-6
    )
    optimizer = build_optimizer(model, optimizer_config, parallel_state=state, parallel_config=parallel)
    losses, norms, steps = [], [], []
    with _watch_sent_outputs() as held:
        for iteration in range(GPT_ITERATIONS):
            batches = _gpt_batches(iteration)
            COMM_BYTES.reset()
            output, syncs = _counted_step(state, iteration, train_step, model, optimizer, batches, state)
            assert output.update_successful, output
            losses.append(output.lm_loss)
            norms.append(output.grad_norm)
            steps.append((syncs, output.stop_requested, COMM_BYTES.bytes.get(("pp", "send"), 0)))
    weights = full_state_dict(model, state)
    return {"losses": losses, "grad_norms": norms, "weights": weights, "steps": steps, "held": held}


def _schedules_and_training(world: int) -> dict:
    """Everything one spawn of `world` ranks checks (module docstring); runs on every rank."""
    state = ParallelState.initialize(1, world, backend="strict")  # PP = world; NCCL's rules checked
    results = {}
    for name, _, num_chunks, counts in SCHEDULES[world]:
        for m in counts:
            for forward_only in (False, True):
                results[(name, m, forward_only)] = _schedule_run(
                    state, num_chunks, m, forward_only=forward_only
                )
    results["train"] = {
        (num_chunks, overlap, scale): _train_toy(state, num_chunks, overlap=overlap, loss_scale=scale)
        for num_chunks, overlap, scale in [(1, False, None), (1, True, 8.0), (2, True, None)]
    }
    if world == 2:
        results["gpt"] = {virtual: _train_gpt(state, virtual) for virtual in (None, 1)}
    if world == 4:  # the same 4 ranks as PP 2 x DP 2, with and without overlapped reduction
        hybrid = ParallelState.initialize(1, 2, backend="strict")
        results["pp2xdp2"] = {overlap: _train_toy(hybrid, 1, overlap=overlap) for overlap in (False, True)}
    return results


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_distributed(_schedules_and_training, 2, 2, timeout=300)


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_distributed(_schedules_and_training, 4, 4, timeout=300)


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def spawn(request) -> tuple[int, list[dict]]:
    """(world size, every rank's results of `_schedules_and_training`)."""
    return request.param, request.getfixturevalue(f"world{request.param}")


def _reference(num_virtual_stages: int, num_micro_batches: int) -> dict:
    return _schedule_run(
        ParallelState.single("cpu"), num_virtual_stages, num_micro_batches, forward_only=False
    )


def _assert_stage_grads(per_rank: list[dict], reference: dict[str, torch.Tensor]) -> None:
    """Each rank's block gradients bit-identical to one process; the tied embedding's two halves (first
    and last stage, summed by the optimizer, not by plain autograd) add up to the reference."""
    seen = set()
    for rank in per_rank:
        for name, grad in rank.items():
            if name != EMBEDDING:
                assert torch.equal(grad, reference[name]), name
                seen.add(name)
    assert seen == set(reference) - {EMBEDDING}
    embedding = per_rank[0][EMBEDDING] + (per_rank[-1][EMBEDDING] if len(per_rank) > 1 else 0)
    torch.testing.assert_close(embedding, reference[EMBEDDING], rtol=EMBEDDING_RTOL, atol=1e-7)


def test_traces_follow_the_schedules_within_their_in_flight_bound(spawn):
    world, ranks = spawn
    for name, pp, num_chunks, counts in SCHEDULES[world]:
        for m in counts:
            for rank, result in enumerate(ranks):
                trace = result[(name, m, False)]["trace"]
                if num_chunks == 1:
                    expected = expected_1f1b_order(pp, rank, m)
                else:
                    expected = expected_interleaved_order(pp, rank, m, num_chunks)
                assert trace == expected, (name, m, rank)
                limit = pipeline.in_flight_limit(pp, rank, m, num_chunks)
                assert max_in_flight(trace) <= limit, (name, m, rank)
                if num_chunks == 1:
                    assert limit == min(pp - rank, m)


def test_interleaved_traces_equal_the_orders_worked_out_by_hand(spawn):
    world, ranks = spawn
    checked = 0
    for name, pp, num_chunks, counts in SCHEDULES[world]:
        for m in counts:
            if name == "interleaved" and num_chunks == 2 and (pp, m) in INTERLEAVED_BY_HAND:
                for rank, result in enumerate(ranks):
                    by_hand = parse_order(INTERLEAVED_BY_HAND[(pp, m)][rank])
                    assert result[(name, m, False)]["trace"] == by_hand, (pp, m, rank)
                checked += 1
    assert checked == 2  # m == P and m == 2P at this world size


def test_losses_and_gradients_equal_one_process(spawn):
    world, ranks = spawn
    for name, pp, num_chunks, counts in SCHEDULES[world]:
        for m in counts:
            reference = _reference(pp * num_chunks, m)
            runs = [result[(name, m, False)] for result in ranks]
            for run in runs:  # every rank reports the last stage's loss
                assert run["loss_sum"] == reference["loss_sum"], (name, m)
                assert run["tokens"] == reference["tokens"]
            _assert_stage_grads([run["grads"] for run in runs], reference["grads"])


def test_forward_only_runs_forwards_in_order_without_gradients(spawn):
    world, ranks = spawn
    for name, pp, num_chunks, counts in SCHEDULES[world]:
        for m in counts:
            reference = _reference(pp * num_chunks, m)
            for rank, result in enumerate(ranks):
                run = result[(name, m, True)]
                if num_chunks == 1:
                    expected = expected_1f1b_order(pp, rank, m, forward_only=True)
                else:
                    expected = expected_interleaved_order(pp, rank, m, num_chunks, forward_only=True)
                assert run["trace"] == expected
                assert run["loss_sum"] == reference["loss_sum"]
                assert run["grads"] == {}


def _train_reference(num_virtual_stages: int, loss_scale=None) -> dict:
    return _train_toy(ParallelState.single("cpu"), num_virtual_stages, loss_scale=loss_scale)


def _assert_trained_like(per_rank: list[dict], reference: dict) -> None:
    # The tied embedding's gradient is summed in another order (module docstring); through AdamW steps
    # that moves weights by ~1e-7, and the losses and norms that follow by as little.
    for run in per_rank:
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-6)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-6)
        for name, weight in run["weights"].items():
            torch.testing.assert_close(weight, reference["weights"][name], rtol=1e-5, atol=1e-6)
    first, last = per_rank[0]["weights"][EMBEDDING], per_rank[-1]["weights"][EMBEDDING]
    assert torch.equal(first, last)  # the two copies took identical steps


def test_training_steps_equal_one_process(spawn):
    world, ranks = spawn
    for (num_chunks, overlap, scale), _ in ranks[0]["train"].items():
        reference = _train_reference(world * num_chunks, loss_scale=scale)
        _assert_trained_like([rank["train"][(num_chunks, overlap, scale)] for rank in ranks], reference)
    if world == 4:  # PP 2 x DP 2: ranks (pp, dp) = (0, 0), (0, 1), (1, 0), (1, 1)
        reference = _train_reference(2)
        for overlap in (False, True):
            runs = [rank["pp2xdp2"][overlap] for rank in ranks]
            _assert_trained_like([runs[0], runs[2]], reference)
            _assert_trained_like([runs[1], runs[3]], reference)
        for rank in ranks:  # overlapped reduction runs the same arithmetic
            assert rank["pp2xdp2"][True]["losses"] == rank["pp2xdp2"][False]["losses"]
            for name, weight in rank["pp2xdp2"][True]["weights"].items():
                assert torch.equal(weight, rank["pp2xdp2"][False]["weights"][name]), name


def test_gpt_model_pp2_training_equals_one_process(world2):
    ranks = world2
    reference = _train_gpt(ParallelState.single("cpu"))
    for virtual, rank0 in ranks[0]["gpt"].items():  # PP 2, and PP 2 interleaved (2 chunks of 1 layer)
        assert ranks[1]["gpt"][virtual]["losses"] == rank0["losses"]
        assert rank0["losses"] == pytest.approx(reference["losses"], rel=GPT_LOSS_RTOL)
        assert rank0["grad_norms"] == pytest.approx(reference["grad_norms"], rel=GPT_LOSS_RTOL)
        assert list(rank0["weights"]) == list(reference["weights"])
        for name, expected in reference["weights"].items():
            error = (rank0["weights"][name] - expected).abs().max().item()
            assert error <= GPT_WEIGHT_TOL * expected.abs().max().item(), (virtual, name, error)


# --------------------------------------------------------------------------- failures
def _training_runs(ranks: list[dict]) -> list[dict]:
    """Every train_step run of a spawn, on every rank."""
    runs = []
    for rank in ranks:
        runs += list(rank["train"].values())
        runs += list(rank.get("pp2xdp2", {}).values()) + list(rank.get("gpt", {}).values())
    return runs


def test_each_training_step_syncs_the_host_once_and_every_rank_sees_a_stop_request(spawn):
    """train_step reads the host once per iteration on every rank (PP 2 and 4, 1F1B and interleaved,
    loss scaling, PP 2 x DP 2 with overlapped reduction, the GPT model), the SIGTERM agreement over the
    world included: the flag raised on the last rank alone comes back set on every rank."""
    _, ranks = spawn
    for run in _training_runs(ranks):
        syncs, stops = [step[0] for step in run["steps"]], [step[1] for step in run["steps"]]
        assert list(syncs) == [1] * len(syncs)
        assert list(stops) == [i == STOP_ITERATION for i in range(len(stops))]


MESSAGE_BYTES = MICRO_BATCH * SEQ * HIDDEN * 4  # one fp32 hidden-state message of the toy model


def test_sent_outputs_hold_no_data_until_their_backward_and_messages_are_counted(spawn):
    """After its send, a stage output keeps only its graph (one element of data, against MESSAGE_BYTES)
    until its backward; every message is counted in COMM_BYTES under the pp group."""
    world, ranks = spawn
    waiting = 0
    for name, pp, num_chunks, counts in SCHEDULES[world]:
        for m, forward_only, (rank, result) in itertools.product(counts, (False, True), enumerate(ranks)):
            run = result[(name, m, forward_only)]
            for count, nbytes in run["held"]:
                assert nbytes <= count * 4, (name, m, rank, run["held"])
                waiting += count
            stages = [chunk * pp + rank for chunk in range(num_chunks)]
            forwards = m * sum(stage != pp * num_chunks - 1 for stage in stages)
            backwards = 0 if forward_only else m * sum(stage != 0 for stage in stages)
            assert run["pp_bytes"] == (MESSAGE_BYTES * (forwards + backwards), forwards + backwards)
    for run in _training_runs(ranks):
        for count, nbytes in run.get("held", []):  # the GPT model's layers (fp32)
            assert nbytes <= count * 4
            waiting += count
    assert waiting > 0


def test_gpt_pipeline_bytes_per_step_equal_the_plan(world2):
    """The pp bytes each rank counted per training step of the GPT model equal the planner's
    `pipeline_send_bytes` for the same configuration (1F1B and interleaved)."""
    from megatron.config import load_config
    from megatron.planner import plan

    argv = (
        "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --attention-head-type multiquery "
        f"--seq-length {GPT_SEQ} --max-position-embeddings {GPT_SEQ} --micro-batch-size {MICRO_BATCH} "
        f"--global-batch-size {MICRO_BATCH * GPT_MICRO_BATCHES} --pipeline-model-parallel-size 2 --fp32 "
        f"--vocab-size {GPT_VOCAB} --train-iters {GPT_ITERATIONS} --lr 1e-3"
    ).split()
    for virtual in (None, 1):
        extra = ["--num-layers-per-virtual-pipeline-stage", str(virtual)] if virtual else []
        stages = plan(load_config([*argv, *extra], world_size=2, check_paths=False))["stages"]
        for rank, result in enumerate(world2):
            counted = [step[2] for step in result["gpt"][virtual]["steps"]]
            assert counted == [stages[rank].pipeline_send_bytes] * GPT_ITERATIONS, (virtual, rank)
            assert counted[0] > 0


def _fail_inside_the_schedule(
    num_chunks: int, failing_rank: int, fail: tuple[str, int], linger: float
) -> None:
    """Pipeline over every rank; `failing_rank` raises per `fail`, then stays alive `linger` seconds
    (its neighbours then learn of it only by their timeout, not by its exit)."""
    world = int(os.environ["WORLD_SIZE"])
    state = ParallelState.initialize(1, world, backend="strict", timeout_minutes=ERROR_TIMEOUT_MINUTES)
    pp, rank = state.pipeline_model_parallel_size, state.pipeline_model_parallel_rank
    model = ToyPipelineModel(pp, rank, num_chunks, fail=fail if rank == failing_rank else None)
    try:
        forward_backward(model, None, toy_batches(2 * pp), state)
    except ValueError:
        time.sleep(linger)
        raise
    state.barrier()  # a rank the failure did not reach would finish here: it must not


def _outcomes(world: int, *args) -> tuple[list, float]:
    start = time.monotonic()
    with pytest.raises(DistributedTestError) as failure:
        run_distributed(_fail_inside_the_schedule, world, *args, timeout=180, kill_on_error=False)
    return failure.value.outcomes, time.monotonic() - start


CAUSE = "the pipeline failed on another rank: rank {}: ValueError: deliberate failure in {}"


def test_a_rank_raising_makes_every_rank_fail_naming_it():
    # PP 4, 1F1B: rank 2 fails in a backward and exits; its neighbours see their connection close, and
    # rank 0 then rank 1's
    outcomes, seconds = _outcomes(4, 1, 2, ("B", 2), 0.0)
    assert [o.status for o in outcomes] == ["error"] * 4, outcomes
    assert "ValueError: deliberate failure in backward on pipeline rank 2" in outcomes[2].error
    for outcome in outcomes[:2] + outcomes[3:]:
        assert "PipelineError: rank " in outcome.error
        assert CAUSE.format(2, "backward on pipeline rank 2") in outcome.error
    assert seconds < 60


def test_a_failed_rank_that_stays_alive_fails_its_neighbour_by_the_timeout():
    # PP 2 interleaved: rank 1 fails in a forward, then lingers past the distributed timeout
    outcomes, _ = _outcomes(2, 2, 1, ("F", 3), ERROR_TIMEOUT_MINUTES * 60 + 5)
    assert [o.status for o in outcomes] == ["error"] * 2, outcomes
    assert CAUSE.format(1, "forward 3 on pipeline rank 1") in outcomes[0].error
    assert "Timed out" in outcomes[0].error
    assert outcomes[0].seconds < outcomes[1].seconds - 4  # it did not wait for rank 1 to exit


def test_the_store_host_failing_still_fails_every_rank():
    # global rank 0 serves the store: once it has exited its message may be unreadable
    outcomes, seconds = _outcomes(2, 1, 0, ("F", 1), 0.0)
    assert [o.status for o in outcomes] == ["error"] * 2, outcomes
    assert "deliberate failure in forward 1 on pipeline rank 0" in outcomes[0].error
    assert "PipelineError: rank 1: " in outcomes[1].error
    assert seconds < 60


def _end_by_rank() -> str:
    rank = int(os.environ["RANK"])
    if rank == 1:
        os._exit(3)
    if rank == 2:
        raise RuntimeError("rank 2 raises")
    return "rank 0 finished"


def test_harness_without_kill_on_error_reports_every_rank():
    with pytest.raises(DistributedTestError, match="rank 1: died") as failure:
        run_distributed(_end_by_rank, 3, timeout=60, kill_on_error=False)
    ok, died, error = failure.value.outcomes
    assert (ok.status, ok.result) == ("ok", "rank 0 finished")
    assert (died.status, died.error) == ("died", "exit code 3")
    assert error.status == "error" and "RuntimeError: rank 2 raises" in error.error


# --------------------------------------------------------------------------- one process
def test_expected_orders_spelled_out():
    f = [("F", i, 0) for i in range(4)]
    b = [("B", i, 0) for i in range(4)]
    assert expected_1f1b_order(2, 0, 4) == [f[0], f[1], b[0], f[2], b[1], f[3], b[2], b[3]]
    assert expected_1f1b_order(2, 1, 4) == [f[0], b[0], f[1], b[1], f[2], b[2], f[3], b[3]]
    assert expected_1f1b_order(4, 0, 2) == f[:2] + b[:2]  # fewer micro-batches than stages
    order = expected_interleaved_order(2, 0, 4, 2)
    assert pipeline.format_trace(order) == (
        "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0"
    )
    assert max_in_flight(order) == 5 == pipeline.in_flight_limit(2, 0, 4, 2)
    assert pipeline.format_trace(expected_1f1b_order(2, 1, 2)) == "F0 B0 F1 B1"


def test_interleaved_orders_equal_the_ones_worked_out_by_hand():
    for (pp, m), per_rank in INTERLEAVED_BY_HAND.items():
        assert len(per_rank) == pp
        for rank, text in enumerate(per_rank):
            assert expected_interleaved_order(pp, rank, m, 2) == parse_order(text), (pp, m, rank)


def test_in_flight_bounds_over_many_layouts():
    for pp in (2, 3, 4, 8):
        for m in (1, 2, pp - 1, pp, 2 * pp + 1, 4 * pp):
            for rank in range(pp):
                order = expected_1f1b_order(pp, rank, m)
                assert max_in_flight(order) == min(pp - rank, m)
        for vp in (2, 3):
            for m in (pp, 2 * pp, 4 * pp):
                for rank in range(pp):
                    order = expected_interleaved_order(pp, rank, m, vp)
                    assert sorted(order) == sorted(
                        [(k, i, c) for k in "BF" for i in range(m) for c in range(vp)]
                    )
                    assert max_in_flight(order) <= pipeline.in_flight_limit(pp, rank, m, vp)


def test_user_errors_are_named_before_anything_is_sent():
    state = ParallelState(device=torch.device("cpu"), pipeline_model_parallel_size=2)
    with pytest.raises(
        ValueError, match=r"--global-batch-size .* multiple of --pipeline-model-parallel-size 2"
    ):
        forward_backward(ToyPipelineModel(2, 0, 2), None, toy_batches(3), state)
    with pytest.raises(TypeError, match="cannot run pipeline-parallel: it has no num_chunks"):
        forward_backward(nn.Linear(2, 2), None, toy_batches(2), state)


def test_no_pipelining_trace_and_pipeline_duplicate_left_out_of_the_norm():
    trace: pipeline.Trace = []
    forward_backward(
        ToyPipelineModel(1, 0, 2), None, toy_batches(2), ParallelState.single("cpu"), trace=trace
    )
    assert pipeline.format_trace(trace) == "F0 B0 F1 B1"
    first, duplicate = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    duplicate.pipeline_duplicate = True
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])]
    assert clip_grad_norm([first, duplicate], grads, 0.0, ParallelState.single("cpu")) == 5.0
