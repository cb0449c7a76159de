"""Data parallelism (parallel/data_parallel.py, training/optimizer.py) on spawned gloo ranks, against one
process training on the same global batch.

One spawn of 2 ranks runs most of it (each spawned rank costs seconds of start-up): DP 2 with one bucket,
with several buckets with and without overlapped reduction, the distributed optimizer with and without
overlap (of the gradient reduce-scatter and of the parameter all-gather, the latter also with gathers
that only happen when waited for), bf16/fp16 short runs, the overlap mechanisms themselves, the bytes
one step sends at DP 2, and (on a second ParallelState over the same 2 ranks, TP 2) the tensor-parallel
gradient reduction and the grad norm's counting of replicated parameters. One spawn of 4 ranks counts
the bytes at DP 4, TP 2 x DP 2 and PP 2 x DP 2, checks the reduction order (DP first, TP last) keeps
TP replicas identical when DP communicators round differently, and trains PP 2 x DP 2 with the
overlapped (deferred, poisoned) parameter gather against the plain one. The single-process references
run in the test process.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

from megatron.config import OptimizerConfig, ParallelConfig, load_config
from megatron.parallel import collectives
from megatron.parallel.collectives import COMM_BYTES, wire_bytes
from megatron.parallel.state import ParallelState
from megatron.parallel.testing import run_distributed
from megatron.training.grad_scaler import ConstantGradScaler
from megatron.training.optimizer import build_optimizer
from megatron.training.schedule import build_scheduler
from megatron.training.step import train_step
from tests.helpers import tiny_model_config

SEQ = 16
VOCAB = 128
SEED = 1234
ITERS = 10
MICRO_BATCH = 2
NUM_MICRO_BATCHES = 4  # per global batch: one process runs all 4, each of 2 DP ranks its 2
GLOBAL_BATCH = MICRO_BATCH * NUM_MICRO_BATCHES
SMALL_BUCKET = 20_000  # elements: the tiny model (~96k parameters) splits into several buckets

# name -> (use_distributed_optimizer, overlap_grad_reduce, ddp_bucket_size, overlap_param_gather)
DP_RUNS = {
    "one_bucket": (False, False, None, False),
    "buckets": (False, False, SMALL_BUCKET, False),
    "buckets_overlap": (False, True, SMALL_BUCKET, False),
    "distributed": (True, False, SMALL_BUCKET, False),
    "distributed_overlap": (True, True, SMALL_BUCKET, False),
    "distributed_overlap_param": (True, True, SMALL_BUCKET, True),
}
# precision runs (2 iterations; CPU half precision is slow): name -> (dtype, loss scale, distributed, overlap)
HALF_RUNS = {
    "bf16_distributed_overlap": (torch.bfloat16, None, True, True),
    "fp16_distributed": (torch.float16, 128.0, True, False),
}
HALF_ITERS = 2


def _optimizer_config() -> OptimizerConfig:
    # warmup then cosine decay: the scheduler must reach AdamW through `param_groups` in every mode
    return OptimizerConfig(
        lr=1e-3, min_lr=1e-4, lr_warmup_iters=3, lr_decay_style="cosine", weight_decay=0.1, clip_grad=1.0
    )


def _parallel_config(
    distributed: bool, overlap: bool, bucket_size: int | None, overlap_param_gather: bool = False
) -> ParallelConfig:
    return ParallelConfig(
        use_distributed_optimizer=distributed,
        overlap_grad_reduce=overlap,
        ddp_bucket_size=bucket_size,
        overlap_param_gather=overlap_param_gather,
    )


def _micro_batch(iteration: int, index: int) -> dict:
    """Micro-batch `index` of the global batch of `iteration`, the same in every process."""
    generator = torch.Generator().manual_seed(1000 * iteration + index)
    data = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
    loss_mask = (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.3).float()  # unequal counts
    return {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": loss_mask}


def _my_micro_batches(parallel_state: ParallelState) -> list[int]:
    """The contiguous share of the global batch's micro-batches that this DP rank trains on."""
    per_rank = NUM_MICRO_BATCHES // parallel_state.data_parallel_size
    first = parallel_state.data_parallel_rank * per_rank
    return list(range(first, first + per_rank))


def _model(parallel_state, dtype=torch.float32) -> torch.nn.Module:
    from megatron.model import GPTModel

    model = GPTModel(tiny_model_config(seq_length=SEQ), VOCAB, parallel_state)
    model.init_weights(SEED)
    return model.to(dtype)


def _build(parallel_state, parallel_config, dtype=torch.float32, loss_scale=None):
    model = _model(parallel_state, dtype)
    scaler = ConstantGradScaler(loss_scale) if loss_scale else None
    optimizer = build_optimizer(
        model,
        _optimizer_config(),
        grad_scaler=scaler,
        parallel_state=parallel_state,
        parallel_config=parallel_config,
    )
    return model, optimizer


def _train(parallel_state, parallel_config, *, iters=ITERS, dtype=torch.float32, loss_scale=None) -> dict:
    """Train the tiny model for `iters` iterations; losses, grad norms, final weights, state bytes."""
    model, optimizer = _build(parallel_state, parallel_config, dtype, loss_scale)
    scheduler = build_scheduler(
        optimizer, _optimizer_config(), train_iters=ITERS, train_samples=None, global_batch_size=GLOBAL_BATCH
    )
    losses, grad_norms = [], []
    for iteration in range(iters):
        batches = [_micro_batch(iteration, index) for index in _my_micro_batches(parallel_state)]
        output = train_step(model, optimizer, batches, parallel_state)
        assert output.update_successful, output
        scheduler.step(GLOBAL_BATCH)
        losses.append(output.lm_loss)
        grad_norms.append(output.grad_norm)
    optimizer.finish_param_sync()  # --overlap-param-gather: the weights are read below
    buckets = optimizer.grad_buffer.buckets
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "weights": {name: value.detach().float().clone() for name, value in model.state_dict().items()},
        "state_bytes": optimizer.state_bytes(),
        "num_buckets": len(buckets),
        "buckets_even": all((b.end - b.start) % parallel_state.data_parallel_size == 0 for b in buckets),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _started_buckets_after_each_backward(parallel_state, overlap: bool) -> list[int]:
    """Buckets whose reduction had started after each micro-batch's backward (before `step`)."""
    model, optimizer = _build(parallel_state, _parallel_config(False, overlap, SMALL_BUCKET))
    batches = [_micro_batch(0, index) for index in _my_micro_batches(parallel_state)]
    optimizer.zero_grad()
    started = []
    for index, batch in enumerate(batches):
        token_losses = model(batch["tokens"], labels=batch["labels"])
        loss = (token_losses * batch["loss_mask"]).sum() / 100.0
        optimizer.backward(loss, last_micro_batch=index == len(batches) - 1)
        started.append(sum(bucket.started for bucket in optimizer.grad_buffer.buckets))
    optimizer.step()
    return started + [len(optimizer.grad_buffer.buckets)]


class _DeferredGather:
    """A parameter all-gather that runs only when waited for; until then the other ranks' chunks of the
    buffer hold NaN, so a parameter read before its wait poisons the run (deterministically, unlike a
    race with a real asynchronous gather)."""

    def __init__(self, start, output: torch.Tensor, tensor: torch.Tensor, group) -> None:
        self.start, self.args = start, (output, tensor, group)
        chunks = output.view(group.size, -1)
        for index in range(group.size):
            if index != group.rank:
                chunks[index].fill_(float("nan"))

    def wait(self) -> None:
        collectives.wait(self.start(*self.args))


@contextlib.contextmanager
def _gathers_deferred_and_poisoned():
    original = collectives.all_gather_into_tensor_async

    def deferred(output, tensor, group):
        if group.is_trivial:
            return original(output, tensor, group)
        return _DeferredGather(original, output, tensor, group)

    collectives.all_gather_into_tensor_async = deferred
    try:
        yield
    finally:
        collectives.all_gather_into_tensor_async = original


def _param_gather_waits(parallel_state) -> dict:
    """With --overlap-param-gather: buckets still gathering after `step`, after the embedding's forward
    (the first module) and after the whole forward."""
    model, optimizer = _build(parallel_state, _parallel_config(True, True, SMALL_BUCKET, True))
    batches = [_micro_batch(0, index) for index in _my_micro_batches(parallel_state)]
    train_step(model, optimizer, batches, parallel_state)
    pending = {"buckets": len(optimizer.grad_buffer.buckets), "after_step": len(optimizer.sharded._pending)}

    def after_embedding(*_) -> None:  # the embedding is the first module of the forward
        pending.setdefault("after_embedding", len(optimizer.sharded._pending))

    model.embedding.register_forward_hook(after_embedding)
    with torch.no_grad():
        model(batches[0]["tokens"])
    pending["after_forward"] = len(optimizer.sharded._pending)
    return pending


# The gradient/parameter synchronisation of one step, counted and planned, on small buckets (several per
# layer: a bucket's tensor-parallel slice is then larger than one DP rank's chunk of it).
BYTE_BUCKET = 4000
SYNC_KINDS = ("dp", "tp", "embedding")
_TINY_FLAGS = [
    *("--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"),
    *("--attention-head-type", "multiquery", "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ)),
    *("--vocab-size", str(VOCAB), "--micro-batch-size", "1", "--train-iters", "1", "--lr", "0.001"),
    *("--ddp-bucket-size", str(BYTE_BUCKET)),
]


def _byte_layouts(world: int) -> dict[str, list[str]]:
    """name -> command-line flags of the layouts whose bytes per step are counted at this world size."""
    distopt, tp2, pp2 = ["--use-distributed-optimizer"], ["--tensor-model-parallel-size", "2"], [
        "--pipeline-model-parallel-size", "2"]  # fmt: skip
    layouts = {
        2: {"dp2": [], "dp2-distopt": distopt},
        4: {
            "dp4": [],
            "dp4-distopt": distopt,
            "dp4-distopt-bf16": [*distopt, "--bf16"],
            "tp2xdp2-sp-distopt": [*tp2, "--sequence-parallel", *distopt],
            "pp2xdp2": pp2,
            "pp2xdp2-distopt": [*pp2, *distopt],
        },
    }
    return {name: [*_TINY_FLAGS, *flags] for name, flags in layouts[world].items()}


_STATES: dict[tuple, ParallelState] = {}


def _state(tp: int, pp: int, sequence_parallel: bool = False) -> ParallelState:
    """One ParallelState per layout in this rank (each creates process groups)."""
    key = (tp, pp, sequence_parallel)
    if key not in _STATES:
        _STATES[key] = ParallelState.initialize(tp, pp, sequence_parallel=sequence_parallel, backend="gloo")
    return _STATES[key]


def _sync_bytes_of_one_step(argv: list[str]) -> dict:
    """Bytes this rank sends in one `optimizer.step()` (where the gradients are reduced and the
    parameters gathered) per (group kind, collective), and the formula's value for its bucket layout."""
    from megatron.model import build_model
    from megatron.parallel.data_parallel import sync_wire_bytes

    world = int(os.environ["WORLD_SIZE"])  # the harness's; the process group may not exist yet
    cfg = load_config(argv, world_size=world, check_paths=False)
    par = cfg.parallel
    state = _state(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.sequence_parallel)
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    model = build_model(cfg.model, cfg.model.vocab_size, state, par)
    model.init_weights(SEED)
    model.to(dtype)
    optimizer = build_optimizer(model, _optimizer_config(), parallel_state=state, parallel_config=par)
    optimizer.zero_grad()
    COMM_BYTES.reset()
    optimizer.step()
    plans = [bucket.plan for bucket in optimizer.grad_buffer.buckets]
    return {
        "counted": {key: value for key, value in COMM_BYTES.by_op().items() if key[0] in SYNC_KINDS},
        "calls": {key: value for key, value in COMM_BYTES.calls.items() if key[0] in SYNC_KINDS},
        "expected": sync_wire_bytes(
            plans,
            data_parallel_size=state.data_parallel_size,
            data_parallel_rank=state.data_parallel_rank,
            tensor_parallel_size=state.tensor_model_parallel_size,
            embedding_group_size=state.embedding_group.size,
            distributed_optimizer=par.use_distributed_optimizer,
            param_element_size=torch.finfo(dtype).bits // 8,
        ),
        "num_buckets": len(plans),
        "grad_bytes": optimizer.grad_buffer.data.numel() * 4,
        "param_bytes": optimizer.grad_buffer.data.numel() * (torch.finfo(dtype).bits // 8),
        "dp_rank": state.data_parallel_rank,
        "stage": state.pipeline_model_parallel_rank,
    }


def _tp_replicas_when_dp_sums_round_differently(distributed: bool) -> dict:
    """TP 2 x DP 2 with sequence parallelism (LayerNorms and row biases are TP-partial too): on TP rank 1
    every DP sum of a `tp_grad_reduce` gradient is moved by one ulp before the TP sum, as a DP
    communicator summing in another order could round it. The TP replicas must stay bit-identical:
    summed over TP last, every replica receives the TP all-reduce's one result."""
    from megatron.parallel.debug import ReplicaMismatchError, check_replicas

    state = _state(2, 1, True)
    model = _model(state)
    config = _parallel_config(distributed, False, SMALL_BUCKET)
    optimizer = build_optimizer(model, _optimizer_config(), parallel_state=state, parallel_config=config)
    buffer, moved = optimizer.grad_buffer, []
    finish = buffer._finish_reduction

    def rounded_differently(bucket) -> None:
        collectives.wait(bucket.handle)
        bucket.handle = None
        lo, hi = bucket.plan.tp_reduce_range(*buffer.valid_range(bucket))
        part = buffer.data[lo:hi] if lo < hi else buffer.data[:0]
        part.copy_(torch.nextafter(part, torch.full_like(part, math.inf)))
        moved.append(part.numel())
        finish(bucket)

    if state.tensor_model_parallel_rank == 1:
        buffer._finish_reduction = rounded_differently
    for iteration in range(3):
        batches = [_micro_batch(iteration, index) for index in _my_micro_batches(state)]
        assert train_step(model, optimizer, batches, state).update_successful
    try:
        compared = check_replicas(model, state)
    except ReplicaMismatchError as error:
        compared = str(error)
    return {"compared": compared, "moved": sum(moved)}


def _pipeline_training(overlap_param_gather: bool) -> dict:
    """PP 2 x DP 2 with the distributed optimizer, 3 steps: losses and this rank's final weights. The
    last stage reads its tied output embedding outside that module's forward; with
    --overlap-param-gather the gathers are deferred and poisoned (`_DeferredGather`), so a read before
    its wait would show."""
    from megatron.model import build_model

    state = _state(1, 2)
    config = _parallel_config(True, overlap_param_gather, SMALL_BUCKET, overlap_param_gather)
    model = build_model(tiny_model_config(seq_length=SEQ), VOCAB, state, config)
    model.init_weights(SEED)
    optimizer = build_optimizer(model, _optimizer_config(), parallel_state=state, parallel_config=config)
    losses = []
    with _gathers_deferred_and_poisoned() if overlap_param_gather else contextlib.nullcontext():
        for iteration in range(3):
            batches = [_micro_batch(iteration, index) for index in _my_micro_batches(state)]
            output = train_step(model, optimizer, batches, state)
            assert output.update_successful, output
            losses.append(output.lm_loss)
        optimizer.finish_param_sync()
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"losses": losses, "weights": weights}


def _four_rank_runs() -> dict:
    """Everything the 4-rank spawn checks (see the module docstring); runs on each rank."""
    results = {"bytes": {name: _sync_bytes_of_one_step(argv) for name, argv in _byte_layouts(4).items()}}
    results["pipeline"] = {overlap: _pipeline_training(overlap) for overlap in (False, True)}
    results["replicas"] = {
        distributed: _tp_replicas_when_dp_sums_round_differently(distributed) for distributed in (False, True)
    }
    return results


class _ToyTensorParallel(torch.nn.Module):
    """Three kinds of parameter at TP 2: a TP-split one, a replicated one whose per-rank gradient is a
    partial sum (`tp_grad_reduce`), and a replicated one whose gradient is already whole."""

    def __init__(self) -> None:
        super().__init__()
        self.split = torch.nn.Parameter(torch.zeros(4))
        self.split.tensor_model_parallel = True
        self.partial = torch.nn.Parameter(torch.zeros(3))
        self.partial.tensor_model_parallel = False
        self.partial.tp_grad_reduce = True
        self.whole = torch.nn.Parameter(torch.zeros(2))
        self.whole.tensor_model_parallel = False

    def loss(self, tp_rank: int) -> torch.Tensor:
        shard_grad = torch.arange(4.0) + 10.0 * tp_rank
        return (
            (self.split * shard_grad).sum() + (self.partial * (tp_rank + 1.0)).sum() + 5.0 * self.whole.sum()
        )


def _tensor_parallel_grad_reduce(parallel_state, distributed: bool, overlap: bool) -> dict:
    model = _ToyTensorParallel()
    optimizer = build_optimizer(
        model,
        OptimizerConfig(lr=0.1, weight_decay=0.0, clip_grad=0.0),
        parallel_state=parallel_state,
        parallel_config=_parallel_config(distributed, overlap, None),
    )
    optimizer.zero_grad()
    optimizer.backward(model.loss(parallel_state.tensor_model_parallel_rank))
    result = optimizer.step()
    return {
        "grad_norm": result.grad_norm,
        "partial_grad": model.partial.main_grad.tolist(),
        "replicated": torch.cat([model.partial.detach(), model.whole.detach()]).tolist(),
    }


def _all_runs() -> dict:
    """Everything the 2-rank spawn checks (see the module docstring); runs on each rank."""
    data_parallel = ParallelState.initialize(1, 1, backend="gloo")  # DP 2
    results = {}
    for name, options in DP_RUNS.items():
        results[name] = _train(data_parallel, _parallel_config(*options))
    with _gathers_deferred_and_poisoned():
        results["distributed_overlap_param_deferred"] = _train(
            data_parallel, _parallel_config(*DP_RUNS["distributed_overlap_param"])
        )
    results["param_gather"] = _param_gather_waits(data_parallel)
    results["bytes"] = {name: _sync_bytes_of_one_step(argv) for name, argv in _byte_layouts(2).items()}
    for name, (dtype, loss_scale, distributed, overlap) in HALF_RUNS.items():
        config = _parallel_config(distributed, overlap, SMALL_BUCKET)
        results[name] = _train(data_parallel, config, iters=HALF_ITERS, dtype=dtype, loss_scale=loss_scale)
    results["started"] = {
        overlap: _started_buckets_after_each_backward(data_parallel, overlap) for overlap in (False, True)
    }
    tensor_parallel = ParallelState.initialize(2, 1, backend="gloo")  # the same 2 ranks as TP 2
    results["tp"] = {
        (distributed, overlap): _tensor_parallel_grad_reduce(tensor_parallel, distributed, overlap)
        for distributed in (False, True)
        for overlap in (False, True)
    }
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_all_runs, 2, timeout=300)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_distributed(_four_rank_runs, 4, timeout=300)


@pytest.fixture(scope="module")
def single() -> dict:
    """One process, all 4 micro-batches of each global batch, the plain optimizer."""
    cpu = ParallelState.single("cpu")
    reference = {"fp32": _train(cpu, None)}
    for name, (dtype, loss_scale, _, _) in HALF_RUNS.items():
        reference[name] = _train(cpu, None, iters=HALF_ITERS, dtype=dtype, loss_scale=loss_scale)
    return reference


# DP sums each rank's fp32 gradient (2 micro-batches) over ranks instead of accumulating 4 micro-batches
# in one process: only the summation order differs (~1e-7 relative per gradient). Losses and grad norms
# agree to 1e-5 relative; each weight tensor to 1e-5 of its largest magnitude (element-wise relative
# error is meaningless for elements AdamW moved from 0 to ~1e-6; observed <= 7e-7).
PARITY_RTOL = 1e-5
# The key bias of multi-query attention has a zero gradient in exact arithmetic (adding q . b_k to every
# score of a row leaves the softmax unchanged), so AdamW turns round-off into a random walk whose path
# depends on the summation order: its values are noise (~2e-6 after 10 steps) in every layout. They are
# checked to stay noise-sized; a real gradient would move them by ~lr = 1e-3 per step.
KEY_BIAS_NOISE = 1e-4


def _assert_weights_close(actual: dict, expected: dict) -> None:
    for name, reference in expected.items():
        value = actual[name]
        if name.endswith("attention.key_value.bias"):  # multi-query: [K bias (d), V bias (d)]
            d = reference.numel() // 2
            assert max(value[:d].abs().max(), reference[:d].abs().max()) < KEY_BIAS_NOISE, name
            value, reference = value[d:], reference[d:]
        error = (value - reference).abs().max().item()
        scale = reference.abs().max().item()
        assert error <= PARITY_RTOL * scale, f"{name}: max abs error {error:.3g} vs max |weight| {scale:.3g}"


@pytest.mark.parametrize("name", ["one_bucket", "buckets", "distributed"])
def test_data_parallel_matches_one_process(ranks, single, name):
    reference = single["fp32"]
    for rank in ranks:
        run = rank[name]
        assert run["losses"] == pytest.approx(reference["losses"], rel=PARITY_RTOL)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=PARITY_RTOL)
        assert run["lr"] == reference["lr"]
        _assert_weights_close(run["weights"], reference["weights"])
    # replicas stay bit-identical
    for key, value in ranks[0][name]["weights"].items():
        assert torch.equal(ranks[1][name]["weights"][key], value), key


@pytest.mark.parametrize(
    ("plain", "overlapped"),
    [
        ("buckets", "buckets_overlap"),
        ("distributed", "distributed_overlap"),
        ("distributed", "distributed_overlap_param"),
        ("distributed", "distributed_overlap_param_deferred"),
    ],
)
def test_overlapped_reduction_is_bit_identical(ranks, plain, overlapped):
    for rank in ranks:
        assert rank[plain]["num_buckets"] >= 4 and rank[plain]["buckets_even"]
        assert rank[overlapped]["losses"] == rank[plain]["losses"]
        assert rank[overlapped]["grad_norms"] == rank[plain]["grad_norms"]
        for key, value in rank[plain]["weights"].items():
            assert torch.equal(rank[overlapped]["weights"][key], value), key


def test_overlap_starts_reductions_during_the_last_backward_only(ranks):
    for rank in ranks:
        first, last, num_buckets = rank["started"][True]
        assert (first, last) == (0, num_buckets) and num_buckets >= 4
        assert rank["started"][False] == [0, 0, num_buckets]


def test_distributed_optimizer_state_is_one_over_dp(ranks, single):
    whole = single["fp32"]["state_bytes"]  # fp32 weights (the masters) + 2 Adam moments: 12 B/param
    num_params = sum(p.numel() for p in _model(ParallelState.single("cpu")).parameters())  # tied: once
    assert whole == 12 * num_params
    per_rank = [rank["distributed"]["state_bytes"] for rank in ranks]
    assert sum(per_rank) == whole  # the shards partition the parameters; padding holds no state
    # each rank's shard is half of every bucket, padding included: < 2 elements of padding per bucket
    padding_bytes = 12 * 2 * ranks[0]["distributed"]["num_buckets"]
    for held in per_rank:
        assert abs(held - whole / 2) <= padding_bytes
    assert all(rank["one_bucket"]["state_bytes"] == whole for rank in ranks)


@pytest.mark.parametrize("name", list(HALF_RUNS))
def test_half_precision_with_distributed_optimizer(ranks, single, name):
    reference = single[name]
    for rank in ranks:
        run = rank[name]
        assert all(math.isfinite(loss) for loss in run["losses"])
        # half-precision gradients summed in another order: agreement at bf16/fp16 resolution
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-2)
        assert run["grad_norms"] == pytest.approx(reference["grad_norms"], rel=2e-2)
    for key, value in ranks[0][name]["weights"].items():
        assert torch.equal(ranks[1][name]["weights"][key], value), key  # all-gathered replicas
    assert 0 < ranks[0][name]["state_bytes"] < single[name]["state_bytes"]


def test_tensor_parallel_grad_reduce_and_norm_counts_replicas_once(ranks):
    shard_norm_sq = sum(sum((i + 10.0 * tp) ** 2 for i in range(4)) for tp in range(2))
    # split: both shards; partial: summed over TP (1 + 2 = 3), counted once; whole: 5, counted once
    expected = math.sqrt(shard_norm_sq + 3 * 3.0**2 + 2 * 5.0**2)
    for config in ranks[0]["tp"]:
        for rank in ranks:
            result = rank["tp"][config]
            assert result["grad_norm"] == pytest.approx(expected, rel=1e-12), config
            assert result["partial_grad"] == [3.0, 3.0, 3.0], config
        assert ranks[0]["tp"][config]["replicated"] == ranks[1]["tp"][config]["replicated"], config


def test_single_process_buffer_grads_equal_autograd_bit_for_bit():
    """The buffer must not change one process's numerics: accumulating into views of zeros is exact."""
    cpu = ParallelState.single("cpu")
    plain = _model(cpu)  # no optimizer: autograd's own accumulation into .grad
    buffered, optimizer = _build(cpu, _parallel_config(False, True, SMALL_BUCKET))
    optimizer.zero_grad()
    for index in range(2):
        batch = _micro_batch(0, index)
        for model in (plain, buffered):
            loss = (model(batch["tokens"], labels=batch["labels"]) * batch["loss_mask"]).sum() / 50.0
            if model is plain:
                loss.backward()
            else:
                optimizer.backward(loss, last_micro_batch=index == 1)
    for (name, a), b in zip(plain.named_parameters(), buffered.parameters(), strict=True):
        assert b.grad is b.main_grad or b.grad.data_ptr() == b.main_grad.data_ptr(), name
        assert torch.equal(a.grad, b.main_grad), name


def test_bad_bucket_size_is_rejected():
    with pytest.raises(ValueError, match="--ddp-bucket-size must be a positive"):
        _build(ParallelState.single("cpu"), _parallel_config(False, False, -5))


def test_overlapped_param_gather_waits_module_by_module_in_the_next_forward(ranks):
    for rank in ranks:
        pending = rank["param_gather"]
        assert pending["after_step"] == pending["buckets"] >= 4  # step returns with every gather running
        assert 0 < pending["after_embedding"] < pending["buckets"]  # the first module waited for its own
        assert pending["after_forward"] == 0


def test_overlap_param_gather_needs_the_distributed_optimizer():
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        _build(ParallelState.single("cpu"), _parallel_config(False, False, None, True))
    with pytest.raises(ValueError, match="--overlap-param-gather needs --use-distributed-optimizer"):
        load_config([*_TINY_FLAGS, "--overlap-param-gather"], world_size=2, check_paths=False)


def test_distributed_optimizer_parameters_live_in_the_gathered_buffer():
    model, optimizer = _build(ParallelState.single("cpu"), _parallel_config(True, False, SMALL_BUCKET))
    for bucket in optimizer.grad_buffer.buckets:
        base, size = (
            bucket.param_data.data_ptr(),
            bucket.param_data.numel() * bucket.param_data.element_size(),
        )
        for param in bucket.params:
            assert base <= param.data_ptr() < base + size
    for fragment in optimizer.sharded.fragments:  # fp32: the masters are the own chunk itself, no copy
        start = fragment.param_start
        assert fragment.main.data_ptr() == fragment.param.view(-1)[start:].data_ptr()
        assert fragment.main.grad.data_ptr() == fragment.param.main_grad.view(-1)[start:].data_ptr()


def _assert_sync_bytes(per_rank: list[dict], world: int) -> None:
    """Counted bytes == the formula for the rank's bucket layout (every rank) == the --dry-run table (DP
    rank 0, which the planner reports), and the DP part is the reduce-scatter + all-gather (half the
    gradient bytes of an all-reduce) or the all-reduce, per the ring model."""
    from megatron.planner import plan

    for name, argv in _byte_layouts(world).items():
        cfg = load_config(argv, world_size=world, check_paths=False)
        planned, dp = plan(cfg)["stages"], cfg.data_parallel_size
        for rank in per_rank:
            run = rank["bytes"][name]
            counted, calls = run["counted"], run["calls"]
            assert counted == run["expected"], name
            if run["dp_rank"] == 0:
                assert counted == planned[run["stage"]].sync_bytes, name
            dp_bytes = sum(value for (kind, _), value in counted.items() if kind == "dp")
            if cfg.parallel.use_distributed_optimizer:
                assert calls[("dp", "reduce_scatter")] == calls[("dp", "all_gather")] == run["num_buckets"]
                assert 2 * counted[("dp", "reduce_scatter")] == wire_bytes(
                    "all_reduce", run["grad_bytes"], dp
                )
                assert dp_bytes == wire_bytes("reduce_scatter", run["grad_bytes"], dp) + wire_bytes(
                    "all_gather", run["param_bytes"], dp
                )
            else:
                assert dp_bytes == wire_bytes("all_reduce", run["grad_bytes"], dp), name
    by_name = {name: [rank["bytes"][name] for rank in per_rank] for name in _byte_layouts(world)}
    if world == 4:  # the TP and embedding sums really ran (and were counted) in these layouts
        assert any(run["counted"].get(("tp", "all_reduce")) for run in by_name["tp2xdp2-sp-distopt"])
        assert all(run["counted"].get(("embedding", "all_reduce")) for run in by_name["pp2xdp2-distopt"])


def test_sync_bytes_per_step_equal_the_plan_at_dp2(ranks):
    _assert_sync_bytes(ranks, 2)


def test_sync_bytes_per_step_equal_the_plan_at_dp4_tp2_pp2(four_ranks):
    _assert_sync_bytes(four_ranks, 4)


@pytest.mark.parametrize("distributed", [False, True], ids=["all_reduce", "distributed_optimizer"])
def test_tp_replicas_stay_identical_when_dp_sums_round_differently(four_ranks, distributed):
    runs = [rank["replicas"][distributed] for rank in four_ranks]
    assert all(run["compared"] == runs[0]["compared"] for run in runs)
    assert isinstance(runs[0]["compared"], int) and runs[0]["compared"] > 0, runs[0]["compared"]
    assert sum(run["moved"] for run in runs) > 0  # TP rank 1 really rounded its DP sums differently


def test_overlapped_param_gather_under_pipelining_is_bit_identical(four_ranks):
    for rank in four_ranks:
        plain, overlapped = rank["pipeline"][False], rank["pipeline"][True]
        assert overlapped["losses"] == plain["losses"]
        for name, value in plain["weights"].items():
            assert torch.equal(overlapped["weights"][name], value), name
