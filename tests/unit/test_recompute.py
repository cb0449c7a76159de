"""Activation recomputation: bit-identical gradients with dropout on (RNG replay of the default stream
and of the per-rank tracker), lower peak saved-activation bytes, and the saved-tensor counter itself.

Multi-rank recomputation (TP 2 with sequence parallelism, where the per-rank stream is used) is checked
in tests/distributed/test_pipeline_model.py."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from megatron.config import ModelConfig
from megatron.model import GPTModel, GPTStage, build_model
from megatron.model import attention as attention_module
from megatron.model.memory import SavedActivationCounter
from megatron.model.recompute import checkpoint, layer_groups
from megatron.parallel.collectives import Group
from megatron.parallel.random import RNGTracker
from megatron.parallel.state import ParallelState
from tests.helpers import tiny_model_config

VOCAB = 128
FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
SETTINGS = {
    "full-uniform-1": FULL_UNIFORM,
    "full-uniform-3": dict(FULL_UNIFORM, recompute_num_layers=3),
    "full-block-2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}


def config(head_type: str = "multiquery", seq: int = 32, dropout: float = 0.3, **overrides) -> ModelConfig:
    fields = {"num_layers": 4, "attention_head_type": head_type, "seq_length": seq, **overrides}
    return tiny_model_config(dropout=dropout, **fields)


def train_step(
    model_config: ModelConfig,
    seq: int = 32,
    parallel_state=None,
    parallel_config=None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """One forward + backward in train mode (dropout on) from fixed seeds: the loss, every gradient, the
    peak bytes saved for backward (parameters excluded) and the default stream's next draw."""
    model = build_model(model_config, VOCAB, parallel_state, parallel_config)
    model.init_weights(3)
    model.to(device=device, dtype=dtype).train()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, seq + 1), generator=generator).to(device)
    torch.manual_seed(5)  # the CPU and every CUDA device's default stream
    with SavedActivationCounter(exclude=model.parameters()) as counter:
        loss = _run_chunks(model, tokens[:, :-1], tokens[:, 1:])
    loss.mean().backward()
    return {
        "loss": loss.detach(),
        "grads": {name: param.grad for name, param in model.named_parameters()},
        "peak_bytes": counter.peak_bytes,
        "bytes_after_backward": counter.current_bytes,
        "next_draw": torch.rand(4, device=device),
    }


def _run_chunks(model: GPTModel | GPTStage, tokens, labels):
    """The whole network: GPTModel's forward, or every chunk of a pipeline stage holding every layer
    (several under interleaving), in order."""
    if isinstance(model, GPTModel):
        return model(tokens, labels=labels)
    x = model.forward_chunk(0, tokens=tokens, labels=labels if model.num_chunks == 1 else None)
    for chunk in range(1, model.num_chunks):
        x = model.forward_chunk(chunk, hidden=x, labels=labels if model.chunk_is_last(chunk) else None)
    return x


def assert_bit_identical(result: dict, reference: dict) -> None:
    assert torch.equal(result["loss"], reference["loss"])
    assert result["grads"].keys() == reference["grads"].keys()
    different = [
        name
        for name in reference["grads"]
        if not torch.equal(result["grads"][name], reference["grads"][name])
    ]
    assert not different, f"gradients differ: {different}"
    assert torch.equal(result["next_draw"], reference["next_draw"]), (
        "the default stream did not continue alike"
    )


# ---------------------------------------------------------------- which layers are checkpointed


def test_layer_groups():
    assert layer_groups(0, 4, None, None, None) == [(0, 4, False)]
    assert layer_groups(4, 8, "selective", None, None) == [(4, 8, False)]
    assert layer_groups(0, 4, "full", "uniform", 1) == [
        (0, 1, True),
        (1, 2, True),
        (2, 3, True),
        (3, 4, True),
    ]
    assert layer_groups(2, 7, "full", "uniform", 2) == [(2, 4, True), (4, 6, True), (6, 7, True)]
    assert layer_groups(4, 8, "full", "block", 2) == [(4, 5, True), (5, 6, True), (6, 8, False)]
    assert layer_groups(4, 6, "full", "block", 3) == [(4, 5, True), (5, 6, True)]
    with pytest.raises(ValueError, match="--recompute-method None is not valid"):
        layer_groups(0, 4, "full", None, 1)


# ---------------------------------------------------------------- bit-identical gradients, lower memory


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_recomputation_gives_bit_identical_gradients_with_dropout(head_type):
    """Dropout 0.3 everywhere (embedding, attention probabilities, residual branches): the rerun draws the
    same masks, so loss and every gradient are the same bits, and the default stream continues as if
    nothing had been recomputed. multiquery runs the blocked matmul core, multihead SDPA."""
    reference = train_step(config(head_type))
    for name, recompute in SETTINGS.items():
        result = train_step(config(head_type, **recompute))
        assert_bit_identical(result, reference)
        assert result["bytes_after_backward"] == 0, name


def test_recomputation_lowers_peak_saved_activation_bytes():
    """Full recomputation keeps only each group's input; selective drops the attention core's
    probabilities and dropout masks (O(s^2) per head), so use a longer sequence for it."""
    reference = train_step(config(), seq=32)["peak_bytes"]
    full = train_step(config(**FULL_UNIFORM), seq=32)["peak_bytes"]
    block = train_step(config(**SETTINGS["full-block-2"]), seq=32)["peak_bytes"]
    assert full < block < reference
    assert full < 0.2 * reference, (full, reference)
    for head_type in ("multiquery", "multihead"):
        reference = train_step(config(head_type, seq=128), seq=128)["peak_bytes"]
        selective = train_step(config(head_type, seq=128, **SETTINGS["selective"]), seq=128)["peak_bytes"]
        assert selective < 0.8 * reference, (head_type, selective, reference)


@pytest.mark.parametrize("backend", ["mqa_matmul", "sdpa"])
def test_selective_recomputation_under_each_attention_core(backend, monkeypatch):
    monkeypatch.setattr(attention_module, "select_backend", lambda *args: backend)
    reference = train_step(config())
    assert_bit_identical(train_step(config(**SETTINGS["selective"])), reference)


def test_recomputation_on_interleaved_pipeline_chunks():
    """Full recomputation per model chunk on a pipeline stage: rank 1 of PP 2 with 8 layers, 2 per
    virtual stage, holds the chunks [(2, 4), (6, 8)] (the second one with the output layer); run them
    in order from a given hidden state (what the previous stage would send)."""
    from megatron.config import ParallelConfig

    state = ParallelState(
        device=torch.device("cpu"),
        world_size=2,
        pipeline_model_parallel_size=2,
        pipeline_model_parallel_rank=1,
        pp_group=Group((0, 1), 1, None),
    )
    layout = ParallelConfig(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=2)
    results = []
    for recompute in ({}, SETTINGS["full-block-2"], dict(FULL_UNIFORM, recompute_num_layers=2)):
        cfg = config(seq=16, num_layers=8, **recompute)
        model = build_model(cfg, VOCAB, state, layout).train()
        model.init_weights(3)
        assert model.chunk_ranges == ((2, 4), (6, 8)) and model.num_chunks == 2
        hidden = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        labels = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
        torch.manual_seed(5)
        with SavedActivationCounter(exclude=model.parameters()) as counter:
            x = model.forward_chunk(0, hidden=hidden)
            loss = model.forward_chunk(1, hidden=x, labels=labels)
        loss.mean().backward()
        grads = {name: param.grad for name, param in model.named_parameters()}
        results.append((loss.detach(), grads, hidden.grad, counter.peak_bytes))
    (loss, grads, hidden_grad, peak), *others = results
    for other_loss, other_grads, other_hidden_grad, other_peak in others:
        assert torch.equal(other_loss, loss) and torch.equal(other_hidden_grad, hidden_grad)
        assert all(torch.equal(other_grads[name], grads[name]) for name in grads)
        assert other_peak < peak


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recomputation_on_cuda_is_bit_identical(dtype):
    """On CUDA the dropout masks come from the device's generator (SDPA's kernels; flash-attn's when
    installed, in bf16): the replay restores it too. Selective recomputation saves little there (the
    fused kernels keep only O(s) statistics besides q, k, v), so only full must lower the peak."""
    flash = [False] + (
        [True] if attention_module.flash_attn_func is not None and dtype == torch.bfloat16 else []
    )
    for head_type, use_flash_attn in itertools.product(("multiquery", "multihead"), flash):
        base = dict(head_type=head_type, seq=64, use_flash_attn=use_flash_attn)
        reference = train_step(config(**base), seq=64, device="cuda", dtype=dtype)
        for name, recompute in SETTINGS.items():
            result = train_step(config(**base, **recompute), seq=64, device="cuda", dtype=dtype)
            assert_bit_identical(result, reference)
            assert result["peak_bytes"] <= reference["peak_bytes"], name
            assert name == "selective" or result["peak_bytes"] < reference["peak_bytes"], name


# ---------------------------------------------------------------- the checkpoint function


def _dropout_function(tracker: RNGTracker):
    """Two dropouts: one from the default stream, one from the tracker's stream."""

    def function(x, weight):
        y = F.dropout(torch.tanh(x @ weight), 0.5, True)
        with tracker.fork():
            return F.dropout(y @ weight, 0.5, True)

    return function


def test_checkpoint_replays_the_default_stream_and_the_tracker():
    results = []
    for use_checkpoint in (False, True):
        tracker = RNGTracker()
        tracker.seed(11)
        torch.manual_seed(7)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        function = _dropout_function(tracker)
        out = checkpoint(function, x, weight, rng_tracker=tracker) if use_checkpoint else function(x, weight)
        (out**2).sum().backward()
        with tracker.fork():
            tracker_next = torch.rand(4)
        results.append((out.detach(), x.grad, weight.grad, torch.rand(4), tracker_next))
    for plain, recomputed in zip(*results, strict=True):
        assert torch.equal(plain, recomputed)


def test_checkpoint_without_replaying_the_tracker_would_differ():
    """The control: with the tracker left out, the rerun draws other masks and the gradient changes."""
    tracker = RNGTracker()
    tracker.seed(11)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
    function = _dropout_function(tracker)
    torch.manual_seed(7)
    (function(x, weight) ** 2).sum().backward()
    expected, weight.grad = weight.grad, None
    tracker.seed(11)
    torch.manual_seed(7)
    (checkpoint(function, x, weight) ** 2).sum().backward()
    assert not torch.equal(weight.grad, expected)


def test_checkpoint_works_with_autograd_grad_and_without_grad_mode():
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4)  # no input requires grad: the weight's gradient must still arrive
    (grad,) = torch.autograd.grad(checkpoint(lambda a: torch.tanh(a @ weight), x).sum(), weight)
    (expected,) = torch.autograd.grad(torch.tanh(x @ weight).sum(), weight)
    assert torch.equal(grad, expected)
    with torch.no_grad():
        out = checkpoint(lambda a: torch.tanh(a @ weight), x)
    assert not out.requires_grad and torch.equal(out, torch.tanh(x @ weight).detach())


# ---------------------------------------------------------------- the counter


def test_saved_activation_counter_counts_storages_once_and_releases_them():
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with SavedActivationCounter() as counter:
        y = x @ weight  # saves x (8 KiB; not the weight: x needs no gradient)
        z = (y * y).sum()  # saves y twice: one storage (8 KiB)
    assert counter.peak_bytes == counter.current_bytes == 2 * 32 * 64 * 4
    with SavedActivationCounter(exclude=[weight]) as counter:
        view = x.view(64, 32).t()  # a view of x: x's storage
        y = (view.t().reshape(32, 64) @ weight).sum() + (x * x).sum()
    assert counter.current_bytes == 32 * 64 * 4  # x's storage, once (weight excluded)
    z.backward()
    y.backward()  # autograd frees what it saved: nothing is left
    assert counter.current_bytes == 0 and counter.peak_bytes == 32 * 64 * 4
    counter.reset_peak()
    assert counter.peak_bytes == 0
