"""GPU throughput levers checked on the CPU: the multi-query K/V layout handed to SDPA, `--torch-compile`
(compiled layers give the eager numbers), and the optimizer's multi-tensor kernels (no per-parameter
ops in the step). The gpu-marked tests check on a CUDA device what the CPU cannot show."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.config import ModelConfig
from megatron.config.optimizer import OptimizerConfig
from megatron.model import attention as attention_module
from megatron.model import gpt as gpt_module
from megatron.model.gpt import GPTModel
from megatron.training import optimizer as optimizer_module
from tests.helpers import REPO_ROOT, tiny_model_config

VOCAB = 128


# ---------------------------------------------------------------- multi-query K/V layout for SDPA


@pytest.mark.parametrize(
    ("device", "dtype", "kv_heads", "mask", "expected"),
    [
        ("cuda", torch.bfloat16, 1, False, "gqa"),  # the causal training step: flash / cuDNN take 1 head
        ("cuda", torch.float16, 1, False, "gqa"),
        ("cuda", torch.bfloat16, 1, True, "expand"),  # explicit mask: no flash; the efficient kernel
        ("cuda", torch.float32, 1, False, "expand"),  # fp32: no flash / cuDNN kernel
        ("cpu", torch.bfloat16, 1, False, "expand"),  # CPU: expand measured as fast or faster
        ("cpu", torch.float32, 1, False, "expand"),
        ("cuda", torch.bfloat16, 8, False, "same"),  # multi-head
    ],
)
def test_sdpa_kv_layout_choice(device, dtype, kv_heads, mask, expected, monkeypatch):
    monkeypatch.setattr(attention_module, "SDPA_HAS_ENABLE_GQA", True)
    assert attention_module.sdpa_kv_layout(device, dtype, 8, kv_heads, mask) == expected
    monkeypatch.setattr(attention_module, "SDPA_HAS_ENABLE_GQA", False)  # torch 2.4: no enable_gqa
    assert attention_module.sdpa_kv_layout(device, dtype, 8, kv_heads, mask) in ("expand", "same")


@pytest.mark.skipif(not attention_module.SDPA_HAS_ENABLE_GQA, reason="enable_gqa needs torch >= 2.5")
@pytest.mark.parametrize("masked", [False, True])
def test_gqa_layout_matches_expand_forward_and_backward(masked):
    """SDPA with the single K/V head (`enable_gqa`) computes what the stride-0 expansion computes, output
    and gradients (fp32; the kernels sum in different orders, so close, not bit-equal)."""
    torch.manual_seed(0)
    b, s, heads, d = 2, 24, 4, 16
    q = torch.randn(b, s, heads, d, requires_grad=True)
    kv = torch.randn(b, s, 1, 2 * d, requires_grad=True)
    grad = torch.randn(b, s, heads, d)
    mask = None
    if masked:  # causal plus a padded key
        mask = torch.ones(s, s, dtype=torch.bool).triu(1).expand(b, 1, s, s).clone()
        mask[0, :, :, 3] = True
        mask[0, :, 3, 3] = False
    results = []
    for layout in ("gqa", "expand"):
        k, v = kv.split(d, dim=-1)
        out = attention_module.sdpa_attention(q, k, v, mask, 0.0, kv_layout=layout)
        results.append((out, *torch.autograd.grad(out, (q, kv), grad)))
    for gqa, expand in zip(*results, strict=True):
        torch.testing.assert_close(gqa, expand, rtol=1e-5, atol=1e-6)  # fp32 summation order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not attention_module.SDPA_HAS_ENABLE_GQA, reason="enable_gqa needs torch >= 2.5")
def test_mqa_training_attention_runs_on_flash_or_cudnn_at_seq_8192():
    """The causal multi-query core in bf16 at StarCoder's sequence length is served by the flash or
    cuDNN kernel (restricting SDPA to them must not raise), forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, s, heads, d = 1, 8192, 16, 128
    q = torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(b, s, 1, 2 * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = kv.split(d, dim=-1)
    assert attention_module.sdpa_kv_layout("cuda", q.dtype, heads, 1, False) == "gqa"
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = attention_module.sdpa_attention(q, k, v, None, 0.0)
        out.float().square().mean().backward()
    assert out.shape == q.shape and kv.grad is not None and torch.isfinite(kv.grad).all()


# ---------------------------------------------------------------- --torch-compile


def _inductor_available() -> str | None:
    """Why torch.compile cannot run here (None: it can)."""
    try:
        import torch._inductor  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the installation
        return f"inductor unavailable: {error}"
    if shutil.which("g++") is None and shutil.which("c++") is None:  # pragma: no cover
        return "inductor on CPU needs a C++ compiler"
    return None


needs_inductor = pytest.mark.skipif(_inductor_available() is not None, reason=str(_inductor_available()))


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied first, so that earlier tests' compiled graphs (and its recompile limit,
    past which it silently runs eagerly) do not decide what runs; the test then checks that graphs were
    compiled: a compiled-vs-eager comparison that ran eagerly twice would prove nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


def _train(
    config: ModelConfig, steps: int = 2, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Losses and gradients of `steps` plain SGD steps of the tiny model on fixed tokens."""
    torch.manual_seed(0)  # the dropout draws (CPU and CUDA)
    model = GPTModel(config, VOCAB).to(device)
    model.init_weights(3)
    model = model.to(dtype)
    tokens = torch.randint(0, VOCAB, (2, config.seq_length), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, VOCAB, (2, config.seq_length), generator=torch.Generator().manual_seed(1))
    tokens, labels = tokens.to(device), labels.to(device)
    history = []
    for _ in range(steps):
        loss = model(tokens, labels=labels).float().mean()
        loss.backward()
        history.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
                p.grad = None
    return history


@pytest.mark.slow
@needs_inductor
def test_torch_compile_matches_eager_over_two_steps(fresh_dynamo):
    """Compiled layers (inductor's generated kernels) give the eager losses and gradients over two steps
    (fp32; inductor fuses and reorders the elementwise sums, and the compiled core is SDPA where eager
    uses the blocked CPU core: close, not equal)."""
    eager = _train(tiny_model_config(seq_length=32))
    compiled = _train(tiny_model_config(seq_length=32, torch_compile=True))
    for (eager_loss, eager_grads), (loss, grads) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        for grad, eager_grad in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-4, atol=1e-5)


RECOMPUTE = {
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective"},
}


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_torch_compile_with_recomputation_replays_dropout(recompute, monkeypatch, fresh_dynamo):
    """Compiled layers under activation recomputation, with dropout: the rerun in backward draws the
    masks of the first run, so the gradients equal the compiled run's without recomputation bit for bit.
    Traced with the aot_eager backend (the graphs and graph breaks of --torch-compile, no code
    generation: seconds instead of a minute); test_compiled_dropout_replay_on_cuda runs inductor."""
    monkeypatch.setattr(gpt_module, "COMPILE_BACKEND", "aot_eager")
    plain = _train(tiny_model_config(seq_length=32, dropout=0.1, torch_compile=True), steps=1)
    config = tiny_model_config(seq_length=32, dropout=0.1, torch_compile=True, **RECOMPUTE[recompute])
    recomputed = _train(config, steps=1)
    assert torch.equal(recomputed[0][0], plain[0][0])
    for grad, reference in zip(recomputed[0][1], plain[0][1], strict=True):
        assert torch.equal(grad, reference)


def test_torch_compile_leaves_evaluation_and_decoding_eager(monkeypatch):
    """Only the training forward is compiled: eval-mode forwards and KV-cache decoding compile nothing
    (and give what the same model gives without the flag)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(gpt_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    models = []
    for compile_ in (True, False):
        model = GPTModel(tiny_model_config(torch_compile=compile_), VOCAB)
        model.init_weights(3)
        models.append(model.eval())
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [model(tokens) for model in models]
        cache = models[0].new_kv_cache(2)
        models[0](tokens[:, :4], kv_cache=cache)
        models[0](tokens[:, 4:5], kv_cache=cache)
    assert torch.equal(logits[0], logits[1])
    assert counters["stats"]["unique_graphs"] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_dropout_replay_on_cuda(fresh_dynamo):
    """Inductor's own dropout (Philox) on CUDA is replayed by full recomputation: bit-identical gradients,
    and compiled bf16 losses close to eager ones without dropout."""
    full = RECOMPUTE["full"]
    plain = _train(tiny_model_config(seq_length=64, dropout=0.1, torch_compile=True), steps=1, device="cuda")
    config = tiny_model_config(seq_length=64, dropout=0.1, torch_compile=True, **full)
    recomputed = _train(config, steps=1, device="cuda")
    assert torch.equal(recomputed[0][0], plain[0][0])
    for grad, reference in zip(recomputed[0][1], plain[0][1], strict=True):
        assert torch.equal(grad, reference)
    eager = _train(tiny_model_config(seq_length=64), device="cuda", dtype=torch.bfloat16)
    compiled = _train(
        tiny_model_config(seq_length=64, torch_compile=True), device="cuda", dtype=torch.bfloat16
    )
    for (eager_loss, _), (loss, _) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss, eager_loss, rtol=2e-2, atol=2e-2)  # bf16 rounding


def test_torch_compile_refused_without_a_code_generator(monkeypatch):
    """--torch-compile without Triton on a GPU, or without a C++ compiler on the CPU: a ConfigError naming
    the flag and what to install, before anything is built."""
    config = tiny_model_config(torch_compile=True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="--torch-compile on a GPU needs Triton"):
        config.check_torch_compile("cuda")
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(ValueError, match="--torch-compile on the CPU needs a C\\+\\+ compiler"):
        config.check_torch_compile("cpu")
    tiny_model_config().check_torch_compile("cpu")  # off: nothing to check


# ---------------------------------------------------------------- optimizer: multi-tensor kernels


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators called (each one a kernel launch, or a few, on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _bf16_step_ops(num_layers: int) -> dict[str, int]:
    """The operators of the second optimizer step of a bf16 model with fp32 masters."""
    model = GPTModel(tiny_model_config(num_layers=num_layers), VOCAB)
    model.init_weights(1)
    model = model.to(torch.bfloat16)
    optimizer = optimizer_module.MixedPrecisionOptimizer(model, OptimizerConfig(lr=1e-3, clip_grad=1e-3))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        optimizer.zero_grad()
        optimizer.backward(model(tokens, labels=tokens).float().mean())
        with _OpCounter() as counter:
            result = optimizer.step()
    assert result.update_successful
    return counter.ops


def test_adamw_is_fused_on_cuda_and_multi_tensor_elsewhere():
    assert optimizer_module.adamw_implementation("cuda") == {"fused": True}
    assert optimizer_module.adamw_implementation("cpu") == {"foreach": True}


def test_bf16_step_has_no_per_parameter_ops(monkeypatch):
    """With the fused AdamW the CUDA run uses, the whole bf16 step (gradient norm, clipping, AdamW, the
    fp32 masters rounded into the model) is a fixed number of multi-tensor operators: doubling the layers
    (32 -> 60 parameters) adds none, and the masters reach the model in one multi-tensor copy."""
    monkeypatch.setattr(optimizer_module, "adamw_implementation", lambda device_type: {"fused": True})
    small, large = _bf16_step_ops(2), _bf16_step_ops(4)
    assert small == large
    assert large.get("_foreach_copy_") == 1 and "copy_" not in large
    assert large.get("_fused_adamw_") == 2  # one per parameter group (decay, no decay)
    assert large.get("_foreach_norm") == 1 and "linalg_vector_norm" not in large
    assert large.get("_foreach_mul_") == 1  # the clipping (clip_grad is tiny, so it clips)


# ---------------------------------------------------------------- bench/profile_step.py


def test_profile_step_summarises_a_tiny_cpu_run(tmp_path, capsys):
    """The profiling benchmark runs the real training step on the CPU and reports every kind of time
    (shares summing to one, GEMMs and AdamW seen) and writes the Chrome trace."""
    spec = importlib.util.spec_from_file_location("profile_step", REPO_ROOT / "bench" / "profile_step.py")
    profile_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_step)
    trace = tmp_path / "trace.json"
    flags = ["--config", "tiny-cpu", "--num-layers", "1", "--seq-length", "32", "--micro-batch-size", "2"]
    flags += ["--global-batch-size", "4", "--vocab-size", "256", "--steps", "1", "--warmup", "1"]
    summary = profile_step.main([*flags, "--device", "cpu", "--top", "5", "--trace", str(trace)])
    assert sum(summary["shares"].values()) == pytest.approx(1.0)
    assert summary["shares"]["gemm"] > 0 and summary["shares"]["optimizer"] > 0
    assert len(summary["top"]) == 5
    assert "traceEvents" in json.loads(trace.read_text())
    out = capsys.readouterr().out
    assert "1 layers, hidden 128" in out and "micro-batch 2 x 2" in out and "time share by kind" in out


# ---------------------------------------------------------------- --fp8-format (torchao float8 training)

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def _fp8_run(fp8_format: str | None, device: str = "cpu"):
    """(model, loss, gradients by name, aten::_scaled_mm calls) of one bf16 forward + backward."""
    from torch.profiler import profile

    from megatron.model import build_model

    model = build_model(tiny_model_config(seq_length=32, hidden_size=128, fp8_format=fp8_format), VOCAB)
    model = model.to(device)
    model.init_weights(3)
    model = model.to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with profile() as prof:
        loss = model(tokens, labels=tokens).float().mean()
        loss.backward()
    fp8_gemms = sum(event.count for event in prof.key_averages() if event.key == "aten::_scaled_mm")
    grads = {name: param.grad.float() for name, param in model.named_parameters()}
    return model, loss.detach(), grads, fp8_gemms


@needs_torchao
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
def test_fp8_format_runs_the_layer_linears_in_fp8_with_the_same_parameters(fp8_format):
    """The MLP and attention output linears of every layer become torchao Float8Linear (the fused Q+K/V
    projection and the output layer stay bf16): same parameter names, objects and attributes, three FP8
    GEMMs per converted linear (forward, input and weight gradients), and the bf16 model's loss and
    gradients up to FP8 rounding (torch's FP8 GEMM runs on the CPU too)."""
    reference_model, reference_loss, reference_grads, reference_gemms = _fp8_run(None)
    model, loss, grads, fp8_gemms = _fp8_run(fp8_format)
    converted = sorted(name for name, m in model.named_modules() if type(m).__name__ == "Float8Linear")
    assert converted == sorted(
        f"layers.{i}.{part}"
        for i in range(2)
        for part in ("attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    )
    assert reference_gemms == 0 and fp8_gemms == 3 * len(converted)
    assert list(model.state_dict()) == list(reference_model.state_dict())
    dense = model.get_submodule("layers.0.attention.dense")
    assert dense.weight.tensor_model_parallel is False and dense.weight.dtype == torch.bfloat16
    # FP8 (3 significant bits in e4m3, 2 in e5m2) against bf16: a few percent per element, far less
    # in the loss; a dropped or unscaled GEMM would be off by O(1)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        error = (grad - reference_grads[name]).norm() / reference_grads[name].norm()
        assert error < 0.15, (name, float(error))


def test_fp8_format_refused_where_it_cannot_work(monkeypatch):
    config = tiny_model_config(fp8_format="hybrid")
    with pytest.raises(ValueError, match="--fp8-format hybrid needs --bf16 \\(got fp32\\)"):
        config.check_fp8("fp32", 1, "cpu")
    with pytest.raises(ValueError, match="needs --tensor-model-parallel-size 1 \\(got 2\\)"):
        config.check_fp8("bf16", 2, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (8, 0))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: object())
    with pytest.raises(ValueError, match="compute capability >= 8.9.*this one is 8.0"):
        config.check_fp8("bf16", 1, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    config.check_fp8("bf16", 1, "cuda")  # an H100
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="needs the torchao package"):
        config.check_fp8("bf16", 1, "cuda")
    with pytest.raises(ValueError, match="is not a valid choice"):
        tiny_model_config(fp8_format="e5m2").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs FP8 GEMMs"
)
@needs_torchao
def test_fp8_format_on_the_gpu_runs_fp8_gemms_close_to_bf16():
    _, reference_loss, _, _ = _fp8_run(None, "cuda")
    model, loss, _, fp8_gemms = _fp8_run("hybrid", "cuda")
    assert fp8_gemms == 3 * 6
    torch.testing.assert_close(loss, reference_loss, rtol=1e-2, atol=0)
