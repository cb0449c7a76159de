"""At most one host sync per training iteration, through the real loop in one process.

The loop's step reads everything the host needs (loss, loss tokens, gradient norm, fp16 overflow flag,
stop flag) in one device-to-host copy (`training/step.py::read_on_host`); logging iterations read
nothing more. `tests/host_syncs.py` counts the reads the framework's code makes (on CPU every tensor is
a host tensor, so the counter patches the reading entry points instead of watching a device). The
distributed case (pipeline and data parallel ranks, the SIGTERM agreement) is counted in
tests/distributed/test_pipeline.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from megatron.parallel.state import ParallelState
from tests.host_syncs import MEGATRON_DIR, count_host_syncs, loop_config, loop_syncs_per_iteration
from tests.unit.test_training import _poison_call

CPU = ParallelState.single("cpu")
ITERS = 6  # loop_config's --train-iters


def test_the_counter_sees_each_kind_of_read_from_framework_code_only():
    """Each read, made from a frame in megatron/ (code compiled under a megatron file name), counts once;
    the same reads from this test file count nothing. Without this, a counter that misses a kind of
    read would let the loop test pass however many syncs there were."""
    reads = [
        "t.sum().item()",
        "t.tolist()",
        "bool(t.sum())",
        "float(t.sum())",
        "int(t.sum())",
        "f'{t.sum():.3f}'",
        "t.numpy()",
        "torch.equal(t, t)",
        "t.nonzero()",
        "range(t[0].long())",
        "math.isfinite(t.sum())",
        "1 if t.sum() > 0 else 0",
    ]
    namespace = {"t": torch.ones(3), "torch": torch, "math": math}
    for read in reads:
        framework_code = compile(read, MEGATRON_DIR + "training/example.py", "exec")
        with count_host_syncs() as syncs:
            exec(framework_code, namespace)
        assert syncs.count == 1, (read, syncs.calls)
        with count_host_syncs() as syncs:
            exec(compile(read, __file__, "exec"), namespace)
        assert syncs.count == 0, (read, syncs.calls)
    assert "item" not in torch.Tensor.__dict__  # the patches are gone


def test_optimizer_step_and_clip_grad_norm_read_once():
    """The optimizer's step (norm, fp16 overflow flag) and the standalone clip each read the host once:
    before, a loss-scaled step read twice (overflow check, then the norm). Scaling by 128 and unscaling
    are exact in fp32, so the scaled step reports the same norm (of the unscaled gradients) and takes the
    same step, clipped here (clip_grad 0.1)."""
    from megatron.training.grad_scaler import ConstantGradScaler
    from megatron.training.optimizer import build_optimizer, clip_grad_norm
    from tests.unit.test_training import _batch, _opt_config, _tiny_model

    results = []
    for scaler in (None, ConstantGradScaler(128.0)):
        model = _tiny_model()
        optimizer = build_optimizer(model, _opt_config(clip_grad=0.1), grad_scaler=scaler, parallel_state=CPU)
        batch = _batch(2)
        loss = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"]).mean()
        optimizer.backward(loss)
        with count_host_syncs() as syncs:
            result = optimizer.step()
        assert result.update_successful and syncs.count == 1, syncs.calls
        results.append((result.grad_norm, [p.detach().clone() for p in model.parameters()]))
    (norm, weights), (scaled_norm, scaled_weights) = results
    assert norm > 0.1 and scaled_norm == norm
    assert all(torch.equal(a, b) for a, b in zip(weights, scaled_weights, strict=True))
    params = list(model.parameters())
    with count_host_syncs() as syncs:
        norm = clip_grad_norm(params, [p.main_grad for p in params], 1.0, CPU)
    assert math.isfinite(norm) and syncs.count == 1, syncs.calls


def _syncs_per_iteration(cfg, poison_iteration: int | None = None) -> tuple[list[list], object]:
    """The calls of each iteration through the real loop in one process (`loop_syncs_per_iteration`),
    with a NaN loss on the forward call `poison_iteration` when given."""

    def poison(run, iteration):
        if iteration == 0 and poison_iteration is not None:
            run.model.register_forward_hook(_poison_call(poison_iteration))

    return loop_syncs_per_iteration(cfg, CPU, before_iteration=poison)


@pytest.mark.parametrize(
    "flags",
    [
        ("--fp32",),
        ("--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"),
        ("--fp16", "--initial-loss-scale", "1048576", "--hysteresis", "1"),
    ],
    ids=["fp32", "bf16-distopt-overlap", "fp16"],
)
def test_each_training_iteration_syncs_the_host_once(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, flags
):
    per_iteration, run = _syncs_per_iteration(
        loop_config(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *flags)
    )
    assert len(per_iteration) == ITERS - 1
    for iteration, calls in enumerate(per_iteration, start=1):  # iterations 2 and 4 log
        assert len(calls) == 1, (iteration, calls)
        assert calls[0][1].startswith("training/step.py") and "read_on_host" in calls[0][1], calls
    assert all(math.isfinite(loss) for loss in run.losses)
    if "--fp16" in flags:  # 2**20 overflows at first: skipped steps, same single read
        assert run.state.skipped_iterations >= 1


@pytest.mark.parametrize("check", [True, False], ids=["nan-check", "no-nan-check"])
def test_a_skipped_nonfinite_iteration_syncs_once_too(
    tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, check
):
    """The step's one read tells the loop that the iteration was non-finite. With
    --check-for-nan-in-loss-and-grad (the default) that iteration alone then reads this rank's
    per-parameter gradient norms once more, to name the first non-finite parameter; without it, nothing."""
    flags = ("--fp32", "--micro-batch-size", "4", "--skip-nonfinite")
    if not check:
        flags += ("--no-check-for-nan-in-loss-and-grad",)
    cfg = loop_config(tmp_path, tiny_dataset_prefix, tiny_tokenizer_path, *flags)
    per_iteration, run = _syncs_per_iteration(cfg, poison_iteration=3)
    poisoned = per_iteration.pop(2)  # iteration 3
    assert [len(calls) for calls in per_iteration] == [1] * (ITERS - 2), per_iteration
    assert "read_on_host" in poisoned[0][1], poisoned
    if check:
        assert len(poisoned) == 2 and "training/nonfinite.py" in poisoned[1][1], poisoned
    else:
        assert len(poisoned) == 1, poisoned
    assert run.state.nonfinite_iterations == 1 and math.isnan(run.losses[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_synchronises_once():
    """On a GPU, torch's own detector (`torch.cuda.set_sync_debug_mode`, which warns at every call that
    makes the host wait for the device) sees one synchronising call per steady-state step, and so does
    the counter (bf16 with fp32 masters, fused AdamW)."""
    from megatron.training.optimizer import build_optimizer
    from megatron.training.step import train_step
    from tests.unit.test_training import _batch, _opt_config, _split, _tiny_model

    cuda = ParallelState.single("cuda")
    model = _tiny_model(torch.bfloat16).cuda()
    optimizer = build_optimizer(model, _opt_config(clip_grad=0.1), parallel_state=cuda)
    micro_batches = [{key: value.cuda() for key, value in b.items()} for b in _split(_batch(4), 2)]
    train_step(model, optimizer, micro_batches, cuda)  # the first step creates AdamW's state
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught, count_host_syncs() as syncs:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                output = train_step(model, optimizer, micro_batches, cuda)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        synchronising = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        assert output.update_successful and math.isfinite(output.grad_norm)
        assert len(synchronising) == 1, synchronising
        assert syncs.count == 1, syncs.calls
