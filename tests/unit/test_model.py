"""GPTModel, its attention backends, fused loss, init and FLOPs/parameter accounting (tiny shapes)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron import kernels
from megatron.checkpoint.gpt_bigcode import gpt_bigcode_config_kwargs, to_gpt_bigcode_state_dict
from megatron.config import ModelConfig
from megatron.model import GPTModel, device_peak_flops, flops_per_token, layers, num_parameters
from megatron.model import attention as attention_module
from megatron.model.loss import linear_cross_entropy
from tests.helpers import tiny_model_config

VOCAB = 96
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def tiny_config(**overrides) -> ModelConfig:
    return tiny_model_config(**{"seq_length": 32, **overrides})


def tiny_model(seed: int = 7, **overrides) -> GPTModel:
    model = GPTModel(tiny_config(**overrides), VOCAB)
    model.init_weights(seed)
    return model


def tokens_for(batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["mqa_matmul", "sdpa"])
def backend(request, monkeypatch):
    """Run a test under each CPU attention core (the MQA-only core is skipped for multi-head)."""
    monkeypatch.setattr(attention_module, "select_backend", lambda *args: request.param)
    return request.param


def closed_form_parameters(config: ModelConfig, vocab: int) -> int:
    """Parameter count written out by hand (independent of the module code)."""
    h, layers = config.hidden_size, config.num_layers
    d = config.kv_channels or h // config.num_attention_heads
    q = config.num_attention_heads * d
    kv = d if config.attention_head_type == "multiquery" else q
    ffn = config.ffn_hidden_size or 4 * h
    per_layer = 4 * h + (h * (q + 2 * kv) + q + 2 * kv) + (q * h + h) + (h * ffn + ffn + ffn * h + h)
    embeddings = vocab * h + config.max_position_embeddings * h
    output = vocab * h if config.untie_embeddings_and_output_weights else 0
    return embeddings + layers * per_layer + 2 * h + output


# ---------------------------------------------------------------- shapes, causality, masks


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_shapes_of_logits_and_loss(head_type):
    model = tiny_model(attention_head_type=head_type)
    tokens = tokens_for()
    logits = model(tokens)
    assert logits.shape == (2, 32, VOCAB) and logits.dtype == torch.float32
    loss = model(tokens, labels=tokens_for(seed=1))
    assert loss.shape == (2, 32) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_future_tokens_do_not_change_past_logits(head_type, backend):
    if backend == "mqa_matmul" and head_type == "multihead":
        pytest.skip("the matmul core is multi-query only")
    model = tiny_model(attention_head_type=head_type).eval()
    tokens = tokens_for()
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % VOCAB
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=1e-5)
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_causal_attention_mask_equals_no_mask(head_type, backend):
    if backend == "mqa_matmul" and head_type == "multihead":
        pytest.skip("the matmul core is multi-query only")
    model = tiny_model(attention_head_type=head_type).eval()
    tokens = tokens_for()
    causal = torch.ones(32, 32, dtype=torch.bool).triu(1).expand(2, 1, 32, 32)
    torch.testing.assert_close(model(tokens, attention_mask=causal), model(tokens), rtol=1e-5, atol=1e-5)


def test_document_mask_isolates_documents(backend):
    """A block-diagonal mask (reset_attention_mask) makes the second document ignore the first."""
    model = tiny_model().eval()
    tokens = tokens_for(batch=1)
    mask = torch.ones(32, 32, dtype=torch.bool).triu(1)
    mask[16:, :16] = True
    mask = mask.expand(1, 1, 32, 32)
    positions = torch.cat([torch.arange(16), torch.arange(16)])[None]
    full = model(tokens, position_ids=positions, attention_mask=mask)
    alone = model(tokens[:, 16:], position_ids=positions[:, 16:])
    torch.testing.assert_close(full[:, 16:], alone, rtol=1e-5, atol=1e-5)


def test_attention_backends_agree_forward_and_backward(monkeypatch):
    tokens, labels = tokens_for(), tokens_for(seed=1)
    results = []
    for name in ("sdpa", "mqa_matmul"):
        monkeypatch.setattr(attention_module, "select_backend", lambda *args, name=name: name)
        model = tiny_model(num_layers=1)
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-6)


def test_matmul_core_gradients_match_finite_differences():
    torch.manual_seed(0)
    q = torch.randn(2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 9, 1, 8, dtype=torch.float64, requires_grad=True)
    core = attention_module.MultiQueryMatmulAttention()

    def run(q, kv):
        k, v = kv.split(4, dim=-1)
        return core(q, k, v, None, 0.0)

    assert torch.autograd.gradcheck(run, (q, kv))


def test_default_backend_choice():
    q = torch.zeros(1, 16, 4, 8)
    assert attention_module.select_backend(q, 1, None, use_flash_attn=True) == "mqa_matmul"
    assert attention_module.select_backend(q, 4, None, use_flash_attn=False) == "sdpa"
    assert attention_module.select_backend(q.bfloat16(), 1, None, use_flash_attn=False) == "sdpa"


# ---------------------------------------------------------------- dropout


def test_dropout_only_in_train_mode(backend):
    model = tiny_model(attention_dropout=0.3, hidden_dropout=0.3)
    tokens = tokens_for()
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), rtol=0, atol=0)
    model.train()
    assert (model(tokens) - model(tokens)).abs().max() > 1e-4
    loss = model(tokens, labels=tokens).mean()
    loss.backward()  # the dropout path has a backward
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- loss


def test_loss_equals_cross_entropy_of_logits():
    model = tiny_model()
    tokens, labels = tokens_for(), tokens_for(seed=1)
    loss = model(tokens, labels=labels)
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="none").view(2, 32)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_fused_linear_cross_entropy_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (10,))
    grad_loss = torch.rand(10, dtype=torch.float64)
    ours = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels), (hidden, weight), grad_loss)
    reference = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    expected = torch.autograd.grad(reference, (hidden, weight), grad_loss)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("onednn", [True, False])
def test_matmul_nt_is_full_fp32(monkeypatch, onednn):
    # oneDNN's GEMM must be ieee fp32 (only the summation order may differ from MKL): errors against a
    # float64 reference stay near fp32 rounding, far below what bf16/tf32 inputs (~1e-3) would give
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", onednn and kernels._ONEDNN_LINEAR)
    generator = torch.Generator().manual_seed(0)
    a, w, bias = (torch.randn(*shape, generator=generator) for shape in ((64, 256), (48, 256), (48,)))
    grad = torch.randn(64, 48, generator=generator)
    cases = [
        (kernels.matmul_nt(a, w), a.double() @ w.double().t()),
        (kernels.matmul_nt(a, w, bias), a.double() @ w.double().t() + bias.double()),
        (kernels.matmul_nt(grad, w.t()), grad.double() @ w.double()),  # the input-gradient form
    ]
    for got, want in cases:
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_fp32_linear_and_loss_gradients_match_float64():
    generator = torch.Generator().manual_seed(0)
    linear = layers.column_linear(32, 24, init_std=0.5)
    with torch.no_grad():
        linear.bias.normal_(generator=generator)
    x = torch.randn(3, 5, 32, generator=generator, requires_grad=True)
    vocab = torch.randn(40, 24, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (15,), generator=generator)
    leaves = (x, linear.weight, linear.bias, vocab)

    def ours():  # fp32: kernels.linear and the fused loss
        loss = linear_cross_entropy(linear(x).flatten(0, 1), vocab, labels)
        return loss, torch.autograd.grad(loss.sum(), leaves)

    def reference():  # float64 autograd
        x64, w64, b64, vocab64 = (t.double() for t in leaves)
        logits = F.linear(x64, w64, b64).flatten(0, 1) @ vocab64.t()
        loss = F.cross_entropy(logits, labels, reduction="none")
        return loss, torch.autograd.grad(loss.sum(), leaves)

    (loss, grads), (loss_ref, grads_ref) = ours(), reference()
    torch.testing.assert_close(loss.double(), loss_ref, rtol=1e-5, atol=1e-5)  # fp32 rounding
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # both fp32: float64 grads cast back


def test_loss_under_bf16_autocast_is_fp32_and_close():
    model = tiny_model()
    tokens, labels = tokens_for(), tokens_for(seed=1)
    reference = model(tokens, labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, labels=labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)  # bf16 has 8 mantissa bits
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------- embeddings, parameters, init


def test_tied_embedding_is_output_weight_and_gets_both_gradients():
    tied = tiny_model()
    assert tied.output_weight is tied.embedding.word_embeddings.weight
    assert not any("output_layer" in name for name, _ in tied.named_parameters())
    untied = tiny_model(untie_embeddings_and_output_weights=True)
    untied.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        untied.output_layer.weight.copy_(tied.embedding.word_embeddings.weight)
    tokens, labels = tokens_for(), tokens_for(seed=1)
    for model in (tied, untied):
        model(tokens, labels=labels).mean().backward()
    input_grad = untied.embedding.word_embeddings.weight.grad
    output_grad = untied.output_layer.weight.grad
    assert input_grad.abs().sum() > 0 and output_grad.abs().sum() > 0
    torch.testing.assert_close(tied.embedding.word_embeddings.weight.grad, input_grad + output_grad)


def test_untied_output_layer_is_a_separate_parameter():
    config = tiny_config(untie_embeddings_and_output_weights=True)
    model = GPTModel(config, VOCAB)
    assert model.output_weight is model.output_layer.weight
    assert model.output_weight is not model.embedding.word_embeddings.weight
    assert num_parameters(config, VOCAB) == num_parameters(tiny_config(), VOCAB) + VOCAB * 64


def test_multiquery_and_multihead_parameter_counts():
    h, d, layers = 64, 16, 2
    mqa = num_parameters(tiny_config(attention_head_type="multiquery"), VOCAB)
    mha = num_parameters(tiny_config(attention_head_type="multihead"), VOCAB)
    # per layer, K and V go from one head (2 * (h*d + d)) to all heads (2 * (h*h + h))
    assert mha - mqa == layers * 2 * ((h * h + h) - (h * d + d))
    assert mqa == closed_form_parameters(tiny_config(), VOCAB)


def test_parameter_attributes():
    model = tiny_model()
    params = dict(model.named_parameters())
    for name, param in params.items():
        assert param.tensor_model_parallel is False, name
        assert param.no_weight_decay == (name.endswith(".bias") or "layernorm" in name), name
    assert params["layers.0.attention.query.weight"].partition_dim == 0
    assert params["layers.0.attention.key_value.weight"].partition_dim == -1
    assert params["layers.0.attention.dense.weight"].partition_dim == 1
    assert params["layers.0.attention.dense.bias"].partition_dim == -1
    assert params["layers.0.mlp.dense_h_to_4h.bias"].partition_dim == 0
    assert params["embedding.word_embeddings.weight"].partition_dim == 0
    assert params["final_layernorm.weight"].partition_dim == -1


def test_init_std_and_scaled_output_projections():
    layers, std = 4, 0.05
    model = GPTModel(tiny_config(num_layers=layers, hidden_size=128, init_method_std=std), VOCAB)
    model.init_weights(3)
    params = dict(model.named_parameters())
    scaled = std / math.sqrt(2 * layers)
    for name, param in params.items():
        if name.endswith("bias"):
            assert param.abs().max() == 0, name
        elif "layernorm" in name:
            assert (param == 1).all(), name
        else:
            expected = scaled if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else std
            assert abs(param.std().item() / expected - 1) < 0.1, (name, param.std().item(), expected)
            assert abs(param.mean().item()) < 0.1 * expected, name


def test_init_is_layout_invariant():
    """Same weights whatever was built before, whatever the model sits in, and on the meta->real path."""
    first = GPTModel(tiny_config(), VOCAB)
    first.init_weights(11)
    torch.manual_seed(999)
    nn.Linear(50, 50)  # consumes the global RNG
    wrapper = nn.ModuleDict({"something_else": nn.Linear(3, 3), "gpt": GPTModel(tiny_config(), VOCAB)})
    wrapper["gpt"].init_weights(11)
    second = wrapper["gpt"].state_dict()
    assert first.state_dict().keys() == second.keys()
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second[name]), name
    # a deeper model shares the first layers' weights: each parameter is drawn from its own name
    deeper = GPTModel(tiny_config(num_layers=3), VOCAB)
    deeper.init_weights(11)
    assert torch.equal(deeper.layers[1].mlp.dense_h_to_4h.weight, first.layers[1].mlp.dense_h_to_4h.weight)
    other = GPTModel(tiny_config(), VOCAB)
    other.init_weights(12)
    assert not torch.equal(other.layers[0].attention.query.weight, first.layers[0].attention.query.weight)


def test_sequence_longer_than_positions_is_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model(tokens_for(seq=33))


# ---------------------------------------------------------------- accounting


def test_starcoderbase_15b_parameter_count_on_meta_device():
    config = ModelConfig(
        num_layers=40,
        hidden_size=6144,
        num_attention_heads=48,
        attention_head_type="multiquery",
        ffn_hidden_size=24576,
        seq_length=8192,
        max_position_embeddings=8192,
    )
    assert num_parameters(config, 49152) == 15_517_456_384


def _preset_model_config(path: Path) -> ModelConfig:
    from megatron.config.cli import load_yaml_values

    values = load_yaml_values(path)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{name: value for (section, name), value in values.items() if name in fields})


def test_the_presets_are_there():
    # the parametrized test below would be skipped, not failed, if configs/ lost its presets
    assert sorted(CONFIGS_DIR.glob("*.yaml")), f"no preset (*.yaml) in {CONFIGS_DIR}"


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_parameter_counts(path):
    config = _preset_model_config(path)
    vocab = config.vocab_size or 49152  # presets without a vocabulary take it from the tokenizer
    count = num_parameters(config, vocab)
    assert count == closed_form_parameters(config, vocab)
    if path.stem == "starcoderbase-15b":
        assert count == 15_517_456_384


def test_flops_per_token_formula():
    config = tiny_config()  # h 64, 4 heads of 16, MQA (one K/V head), ffn 256, 2 layers, seq 32
    h, d, ffn, layers, seq = 64, 16, 256, 2, 32
    matmul_weights = layers * (h * h + h * 2 * d + h * h + 2 * h * ffn) + VOCAB * h
    expected = 6 * matmul_weights + 12 * layers * seq * h
    assert flops_per_token(config, VOCAB) == expected
    mha = tiny_config(attention_head_type="multihead")
    assert flops_per_token(mha, VOCAB) - expected == 6 * layers * h * 2 * (h - d)


def test_cpu_peak_flops_is_measured_and_cached():
    peak, description = device_peak_flops("cpu")
    assert peak > 1e8 and "CPU" in description and "1 threads" in description
    assert device_peak_flops("cpu")[0] == peak


# ---------------------------------------------------------------- parity with transformers


def _to_hf(model: GPTModel, config: ModelConfig):
    transformers = pytest.importorskip("transformers")
    kwargs = gpt_bigcode_config_kwargs(config, VOCAB, attn_implementation="eager")
    hf = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(**kwargs)).eval()
    missing, unexpected = hf.load_state_dict(
        to_gpt_bigcode_state_dict(model.state_dict(), config), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_logits_match_transformers_gpt_bigcode(head_type):
    config = tiny_config(attention_head_type=head_type)
    model = GPTModel(config, VOCAB)
    model.init_weights(5)
    model.eval()
    hf = _to_hf(model, config)
    tokens = tokens_for()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attention_matches_sdpa_in_bf16():
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(2, 256, 1, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.bfloat16)
    outputs = []
    for core in (attention_module.flash_attention, attention_module.sdpa_attention):
        k, v = kv.split(64, dim=-1)
        args = (q, k, v, 0.0) if core is attention_module.flash_attention else (q, k, v, None, 0.0)
        out = core(*args)
        outputs.append((out, *torch.autograd.grad(out, (q, kv), grad)))
    for flash, sdpa in zip(*outputs):
        torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_model_on_cuda_matches_fp32():
    model = tiny_model().cuda()
    tokens, labels = tokens_for().cuda(), tokens_for(seed=1).cuda()
    reference = model(tokens, labels=labels)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, labels=labels)
    torch.testing.assert_close(loss, reference, rtol=0.05, atol=0.05)


def test_concat_linear_matches_linear_on_the_concatenation_without_saving_it():
    """The fused multi-query projection: same output and gradients as `linear(x, cat(W), cat(b))`
    (bit-identical: the same GEMMs), and autograd keeps no weight-sized copy of the concatenation."""

    torch.manual_seed(0)
    x = torch.randn(2, 16, 32, requires_grad=True)
    w1, b1 = torch.randn(32, 32, requires_grad=True), torch.randn(32, requires_grad=True)
    w2, b2 = torch.randn(8, 32, requires_grad=True), torch.randn(8, requires_grad=True)
    grad = torch.randn(2, 16, 40)
    leaves = (x, w1, b1, w2, b2)

    reference = kernels.linear(x, torch.cat([w1, w2]), torch.cat([b1, b2]))
    expected = torch.autograd.grad(reference, leaves, grad)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fused = kernels.concat_linear(*leaves)
    got = torch.autograd.grad(fused, leaves, grad)
    assert torch.equal(fused, reference)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert not any(t.shape == (40, 32) for t in saved)  # only x, W1 and W2 themselves
    assert sum(t.numel() for t in saved) == x.numel() + w1.numel() + w2.numel()


def test_one_process_model_holds_no_tensor_parallel_layer():
    # at TP 1 the model is plain torch layers and the shared kernels: gpt.py and attention.py read alone,
    # without megatron.parallel's column/row/vocabulary-parallel classes
    model = GPTModel(tiny_config(), 128)
    parallel_modules = [
        f"{name}: {type(module).__module__}.{type(module).__name__}"
        for name, module in model.named_modules()
        if type(module).__module__.startswith("megatron.parallel")
    ]
    assert not parallel_modules, parallel_modules
    kinds = {type(module).__name__ for module in model.modules()}
    assert {"Linear", "Embedding", "LayerNorm"} <= kinds
