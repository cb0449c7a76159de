"""Bad steps in one process: the spike statistic and decisions, the skip list and rollback trigger, the
keep-last-k pin, their checkpoint round trip, the flags, and the per-rank non-finite gradient check
(`training/nonfinite.py`) with the training step's skips. The loop with real runs (rollback, resume,
divergence, two ranks) is tests/e2e/test_bad_steps.py."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from megatron.config import ConfigError, load_config
from megatron.parallel.state import ParallelState
from megatron.training.nonfinite import LocalGradCheck, name_nonfinite_ranks
from megatron.training.optimizer import build_optimizer
from megatron.training.spikes import BadSteps, SpikeDetector, rollback_target, sample_range
from megatron.training.step import train_step
from tests.unit.test_training import _batch, _opt_config, _split, _tiny_model

CPU = ParallelState.single("cpu")
NAN = float("nan")


def _output(loss=2.0, *, spike=False, nonfinite=None, updated=True):
    return SimpleNamespace(lm_loss=loss, spike=spike, nonfinite=nonfinite, update_successful=updated)


# ------------------------------------------------------------------ the spike statistic
def test_no_decision_before_the_window_is_full_then_factor_times_the_window_max():
    detector = SpikeDetector(factor=10.0, window=3)
    for loss in (5.0, 4.0):
        assert not detector.is_spike(1e9)  # window not full: no reference yet
        detector.accept(loss)
    detector.accept(3.0)
    assert detector.reference == 5.0
    assert not detector.is_spike(50.0)  # equal to 10 x max: not above
    assert detector.is_spike(50.000001)
    assert not detector.is_spike(NAN) and not detector.is_spike(math.inf)  # the non-finite check's


def test_the_window_slides_so_a_spike_is_judged_against_recent_losses():
    """Megatron-LM keeps the max of the first 100 losses for good; here the early high loss leaves the
    window, so a jump from 1 to 30 is a spike once the window only holds losses near 1."""
    detector = SpikeDetector(factor=10.0, window=2)
    for loss in (8.0, 1.0):
        detector.accept(loss)
    assert not detector.is_spike(30.0)  # 8 still in the window
    detector.accept(1.2)
    assert detector.reference == 1.2 and detector.is_spike(30.0)
    detector.accept(NAN)  # never enters the window
    assert list(detector.recent) == [1.0, 1.2]


def test_a_spike_or_a_skipped_update_stays_out_of_the_window():
    steps = BadSteps(detector=SpikeDetector(10.0, 2))
    steps.after_step(1, _output(3.0))
    steps.after_step(2, _output(99.0, spike=True))
    steps.after_step(3, _output(7.0, updated=False))  # e.g. an fp16 overflow
    steps.after_step(4, _output(2.0))
    assert list(steps.detector.recent) == [3.0, 2.0]


# ------------------------------------------------------------------ rollback trigger, skip list, pin
def test_k_spikes_within_the_window_roll_back_over_first_to_last():
    steps = BadSteps(skip={40}, detector=SpikeDetector(10.0, 1), rollback_after=3, rollback_window=5)
    assert steps.after_step(10, _output(spike=True)) is None
    assert steps.after_step(16, _output(spike=True)) is None  # 10 has left the window (16 - 5 >= 10)
    assert steps.after_step(17, _output()) is None
    assert steps.after_step(19, _output(spike=True)) is None
    assert steps.spikes == [16, 19]
    assert steps.after_step(20, _output(spike=True)) == (16, 20)
    assert steps.skip == {16, 17, 18, 19, 20, 40} and steps.spikes == []
    assert steps.skips(18) and not steps.skips(21)


def test_without_rollback_spikes_are_only_skipped():
    steps = BadSteps(detector=SpikeDetector(10.0, 1), rollback_after=None)
    assert all(steps.after_step(it, _output(spike=True)) is None for it in range(1, 20))
    assert steps.skip == set()


def test_consecutive_nonfinite_count_resets_on_a_good_step():
    steps = BadSteps()
    for it in (1, 2):
        steps.after_step(it, _output(NAN, nonfinite="loss", updated=False))
    assert steps.consecutive_nonfinite == 2
    steps.after_step(3, _output())
    assert steps.consecutive_nonfinite == 0
    steps.after_step(4, _output(nonfinite="gradient", updated=False))
    assert steps.consecutive_nonfinite == 1


def test_the_pin_is_the_newest_checkpoint_with_no_bad_step_since_the_previous_save():
    steps = BadSteps(detector=SpikeDetector(10.0, 1))
    assert steps.on_save(2) == 2  # clean since the start
    steps.after_step(3, _output(NAN, nonfinite="loss", updated=False))
    assert steps.on_save(4) == 2  # a non-finite step since 2: 4 is not pinned
    assert steps.on_save(6) == 6  # clean since 4
    steps.after_step(7, _output(spike=True))
    assert steps.on_save(8) == 6
    steps.after_step(9, _output())  # good steps do not clean what came before the last save
    assert steps.on_save(10) == 10


def test_a_failed_save_pins_nothing():
    """A save that failed (--on-save-failure continue) is not on disk: the pin stays the one before, and
    a bad step before the failed save still keeps the next checkpoint from being pinned."""
    steps = BadSteps()
    assert steps.on_save(2) == 2 and steps.on_save(4) == 4
    steps.save_failed(4)
    assert steps.pinned == 2
    steps.save_failed(4)  # reported again (the checkpointer remembers its last failure): no change
    assert steps.pinned == 2 and steps.on_save(6) == 6
    steps.after_step(7, _output(NAN, nonfinite="loss", updated=False))
    steps.on_save(8)
    steps.save_failed(8)
    assert steps.on_save(10) == 6  # iteration 7 was bad, and 8 never reached the disk


def test_state_round_trips_through_json_and_decides_the_same():
    """What a checkpoint's extra holds (common.json): the loss window bit-exact, the skip list, the
    spikes in the window, the consecutive count and the pin."""
    steps = BadSteps(skip={5}, detector=SpikeDetector(3.0, 3), rollback_after=2, rollback_window=10)
    for it, loss in enumerate((0.1 + 0.2, 1 / 3, 2.0 / 7.0), start=1):
        steps.after_step(it, _output(loss))
    steps.after_step(4, _output(9.0, spike=True))
    steps.on_save(4)
    restored = BadSteps(detector=SpikeDetector(3.0, 3), rollback_after=2, rollback_window=10)
    restored.load_state_dict(json.loads(json.dumps(steps.state_dict())))
    assert list(restored.detector.recent) == list(steps.detector.recent)  # bit-identical floats
    assert restored.state_dict() == steps.state_dict()
    assert restored.is_spike(3 * (1 / 3) + 1e-9) and steps.is_spike(3 * (1 / 3) + 1e-9)
    assert (
        restored.after_step(6, _output(9.0, spike=True))
        == (4, 6)
        == steps.after_step(6, _output(9.0, spike=True))
    )


def test_a_resumed_run_keeps_its_own_skips_and_the_checkpoints():
    resumed = BadSteps(skip={30})  # --iterations-to-skip 30 on the command line
    resumed.load_state_dict({"iterations_to_skip": [6, 7], "pinned": 4})
    assert resumed.skip == {6, 7, 30} and resumed.pinned == 4


def test_rollback_target_is_the_newest_checkpoint_before_the_first_bad_iteration():
    checkpoints = [(4, "a"), (8, "b"), (12, "c")]
    assert rollback_target(checkpoints, first_bad=12) == 8  # iteration 12 itself ran after iter 8's save
    assert rollback_target(checkpoints, first_bad=13) == 12
    assert rollback_target(checkpoints, first_bad=4) is None
    assert sample_range(20, 4) == "samples [20, 24)"


# ------------------------------------------------------------------ flags
def _parse(*flags):
    base = ["--config", "tiny-cpu", "--train-iters", "40", "--lr-warmup-iters", "0"]
    return load_config(base + list(flags), world_size=1, check_paths=False)


def test_flags_defaults_and_values():
    training = _parse().training
    assert training.check_for_nan_in_loss_and_grad and not training.check_for_spiky_loss
    assert training.iterations_to_skip is None and training.max_consecutive_nonfinite == 10
    training = _parse("--no-check-for-nan-in-loss-and-grad", "--iterations-to-skip", "9", "3", "9").training
    assert not training.check_for_nan_in_loss_and_grad and training.iterations_to_skip == [3, 9]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--iterations-to-skip", "0"), "--iterations-to-skip 0: iterations start at 1"),
        (("--rollback-after-spikes", "2", "--save", "/tmp/x"), "needs --check-for-spiky-loss"),
        (("--check-for-spiky-loss", "--rollback-after-spikes", "2"), "needs --save"),
        (("--max-consecutive-nonfinite", "0"), "--max-consecutive-nonfinite 0 must be > 0"),
        (("--spiky-loss-window", "0"), "--spiky-loss-window 0 must be > 0"),
    ],
)
def test_bad_flags_are_named(flags, message):
    with pytest.raises(ConfigError, match=message):
        _parse(*flags)


# ------------------------------------------------------------------ the local gradient check
def _optimizer(model, **parallel):
    config = SimpleNamespace(
        use_distributed_optimizer=False,
        overlap_grad_reduce=parallel.get("overlap", False),
        overlap_param_gather=False,
        ddp_bucket_size=parallel.get("bucket_size"),
    )
    return build_optimizer(model, _opt_config(), parallel_state=CPU, parallel_config=config)


def _backward(model, optimizer, poisoned=()):
    """One backward through the optimizer, the gradients of `poisoned` (names) made NaN/inf."""
    params = dict(model.named_parameters())
    hooks = [params[name].register_hook(lambda g, v=value: torch.full_like(g, v)) for name, value in poisoned]
    batch = _batch(2)
    loss = model(batch["tokens"], position_ids=batch["position_ids"], labels=batch["labels"]).mean()
    optimizer.backward(loss)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("overlap", [False, True], ids=["after-backward", "overlapped"])
def test_the_first_nonfinite_local_gradient_is_named_in_model_order(overlap):
    """Several buckets (backward order is the reverse of the model's): the parameter named is the first
    in model.named_parameters() whose local gradient is non-finite, recorded before its bucket's
    reduction even when that reduction starts during the backward."""
    model = _tiny_model()
    optimizer = _optimizer(model, overlap=overlap, bucket_size=3000)
    assert len(optimizer.grad_buffer.buckets) > 2
    check = LocalGradCheck.for_optimizer(optimizer)
    names = [name for name, _ in model.named_parameters()]
    late, early = names[-2], names[3]
    optimizer.zero_grad()
    check.start()
    _backward(model, optimizer, poisoned=[(late, NAN), (early, math.inf)])
    assert bool(check.norms) == overlap  # overlapped: buckets recorded as their reductions started
    assert check.local_flag(CPU.device).item() == 1.0
    assert check.first_nonfinite() == (early, math.inf)
    assert name_nonfinite_ranks(check, [0], CPU) == [
        f"rank 0: first parameter {early} (local gradient L1 norm inf)"
    ]
    optimizer.zero_grad()
    check.start()
    _backward(model, optimizer)
    assert check.local_flag(CPU.device).item() == 0.0 and check.first_nonfinite() is None
    assert LocalGradCheck.for_optimizer(optimizer) is check


def test_train_step_skips_a_nonfinite_gradient_and_names_it_and_a_spike_leaves_the_weights():
    model = _tiny_model()
    optimizer = _optimizer(model)
    micro = _split(_batch(4), 2)
    before = [p.detach().clone() for p in model.parameters()]
    name = next(iter(dict(model.named_parameters())))
    hook = dict(model.named_parameters())[name].register_hook(lambda g: torch.full_like(g, NAN))
    output = train_step(model, optimizer, micro, CPU, check_grads=True)
    hook.remove()
    assert output.nonfinite == "gradient" and not output.update_successful and math.isfinite(output.lm_loss)
    assert output.nonfinite_ranks == (0,) and name in output.nonfinite_where[0]
    output = train_step(model, optimizer, micro, CPU, check_grads=True, is_spike=lambda loss: True)
    assert output.spike and not output.update_successful and output.nonfinite is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    output = train_step(model, optimizer, micro, CPU, check_grads=True, is_spike=lambda loss: False)
    assert output.update_successful and output.nonfinite_ranks == ()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
