"""The layout-invariant initialisation (`megatron.model.init`): the vectorised counter-based generator equals
its scalar definition bit for bit, any slice equals the same slice of the whole tensor, the values are
standard normals scaled by each parameter's std and independent across elements, tensors and seeds, and a
model built at TP 2 / PP 2 (fake parallel states, no processes) holds the TP 1 model's weights, gathered."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.model import build_model
from megatron.model import init as init_module
from megatron.model.gpt import GPTModel
from megatron.model.init import init_weights, normal_slice_, parameter_stream, reference_normal
from megatron.parallel.collectives import Group
from megatron.parallel.state import ParallelState
from tests.helpers import tiny_model_config

SEED = 1234


def _draw(shape, name="w", std=1.0, seed=SEED, **slice_args) -> torch.Tensor:
    return normal_slice_(torch.empty(shape), seed, name, std, **slice_args)


def _standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_vectorised_generator_is_the_scalar_definition():
    """Every element (first elements, and indices past 2^32 reached through an offset) equals
    `reference_normal`, the definition computed with Python floats, bit for bit: each torch step is the
    same correctly rounded float64 operation (torch.sqrt is not used: it is not correctly rounded on
    every CPU)."""
    stream = parameter_stream(SEED, "layers.3.mlp.dense_h_to_4h.weight")
    for std in (1.0, 0.02):
        drawn = _draw((1501,), "layers.3.mlp.dense_h_to_4h.weight", std)
        expected = [reference_normal(stream, i, std) for i in range(1501)]
        assert torch.equal(drawn, torch.tensor(expected, dtype=torch.float64).float())
    for offset in (2**32 - 3, 7 * 10**11 + 1):
        drawn = _draw((5,), "x", full_shape=(2**41,), dim=0, offset=offset)
        expected = [reference_normal(parameter_stream(SEED, "x"), offset + i) for i in range(5)]
        assert torch.equal(drawn, torch.tensor(expected, dtype=torch.float64).float())


def test_scalar_definition_is_box_muller_within_rounding():
    """The polynomial ln / cos / sin and the Newton sqrt are accurate: each value is the Box-Muller
    transform of its hash computed with the math library, to 1e-9 (the output is float32, 6e-8)."""
    start, gamma = parameter_stream(SEED, "w")
    for index in range(0, 4000, 3):
        h = init_module._mix64((start + (index >> 1) * gamma) % 2**64)
        u = ((h >> 32) + 0.5) / 2**32
        phi = math.pi / 2 * ((h & (2**30 - 1)) + 0.5) / 2**30  # first quadrant, reflected by sign bits
        trig = (
            math.cos(phi) * (-1) ** (h >> 30 & 1) if index % 2 == 0 else math.sin(phi) * (-1) ** (h >> 31 & 1)
        )
        ideal = math.sqrt(-2.0 * math.log(u)) * trig
        assert reference_normal((start, gamma), index) == pytest.approx(ideal, rel=1e-9, abs=1e-9)
    for x in (2.3e-10, 1e-5, 0.3, 1.0, 2.0, 3.999, 45.7):
        assert abs(init_module._sqrt(x) - math.sqrt(x)) <= 2e-13 * math.sqrt(x)


@pytest.mark.parametrize("block_pairs", [16, 1 << 16], ids=["small-blocks", "default"])
def test_any_slice_is_the_same_slice_of_the_whole_tensor(monkeypatch, block_pairs):
    """Tensor-parallel shards along dim 0 and dim 1 at TP 1/2/4 (and uneven offsets, odd row lengths,
    3-d tensors) are bit-identical to the whole tensor's slice, whatever the generation block size (long
    rows cut into pieces, rows grouped by parity)."""
    monkeypatch.setitem(init_module._BLOCK_PAIRS, "cpu", block_pairs)
    for shape in [(48, 64), (12, 7), (9, 7, 5), (301,)]:
        full = _draw(shape, std=0.02)
        for dim in range(len(shape)):
            size = shape[dim]
            cuts = [(r * (size // tp), size // tp) for tp in (1, 2, 4) if size % tp == 0 for r in range(tp)]
            cuts += [(1, size - 2), (size - 1, 1)]
            for offset, length in cuts:
                part_shape = list(shape)
                part_shape[dim] = length
                part = _draw(part_shape, std=0.02, full_shape=shape, dim=dim, offset=offset)
                assert torch.equal(part, full.narrow(dim, offset, length)), (shape, dim, offset)


def test_output_dtype_layout_and_device_handling():
    """A bfloat16 or non-contiguous target gets the float32 values rounded (as a float32 model cast
    later); a meta tensor is left alone; a shape that is no slice of full_shape is refused."""
    full = _draw((16, 8), std=0.5)
    bf16 = normal_slice_(torch.empty(16, 8, dtype=torch.bfloat16), SEED, "w", 0.5)
    assert torch.equal(bf16, full.to(torch.bfloat16))
    transposed = torch.empty(8, 16).t()
    assert torch.equal(normal_slice_(transposed, SEED, "w", 0.5), full)
    normal_slice_(torch.empty(16, 8, device="meta"), SEED, "w", 0.5)
    with pytest.raises(ValueError, match="not a slice"):
        _draw((16, 4), full_shape=(16, 8), dim=1, offset=6)
    with pytest.raises(ValueError, match="not a slice"):
        _draw((8, 8), full_shape=(16, 16), dim=1, offset=0)


def test_values_are_standard_normal():
    """2^20 draws: mean, variance, fourth moment, the 3-sigma tail mass and the Kolmogorov-Smirnov
    distance to the normal CDF are within about 5 standard errors (a fixed seed: these are fixed numbers,
    and a wrong transform misses them by far)."""
    n = 1 << 20
    x = _draw((n,), "big").double()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    assert abs((x**4).mean().item() - 3.0) < 5 * math.sqrt(96 / n)
    tail = (x.abs() > 3).double().mean().item()
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    ordered = torch.sort(x).values
    cdf = _standard_normal_cdf(ordered)
    steps = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(steps - cdf, cdf - (steps - 1.0 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n)  # the 99.9% quantile of the KS statistic
    assert x.abs().max().item() < math.sqrt(2 * 33 * math.log(2))  # u >= 2^-33


def test_values_are_independent():
    """No correlation (within 5 standard errors) between the two elements of a Box-Muller pair, their
    squares, neighbouring pairs, and tensors that differ in name, seed or only in the layer index."""
    n = 1 << 18
    bound = 5 / math.sqrt(n)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()

    x = _draw((2 * n,), "layers.1.attention.dense.weight")
    even, odd = x[0::2], x[1::2]
    assert abs(corr(even, odd)) < bound
    assert abs(corr(even**2, odd**2)) < bound
    assert abs(corr(odd[:-1], even[1:])) < bound
    others = [
        _draw((2 * n,), "layers.2.attention.dense.weight"),
        _draw((2 * n,), "layers.1.attention.dense.weight", seed=SEED + 1),
        _draw((2 * n,), "layers.1.attention.query.weight"),
    ]
    for other in others:
        assert abs(corr(x, other)) < bound / math.sqrt(2)


def _fake_state(tp: int, tp_rank: int, pp: int, pp_rank: int) -> ParallelState:
    """A ParallelState with the sizes and ranks only (no process group): enough to build a rank's model."""
    return ParallelState(
        device=torch.device("cpu"),
        world_size=tp * pp,
        rank=pp_rank * tp + tp_rank,
        tensor_model_parallel_size=tp,
        tensor_model_parallel_rank=tp_rank,
        pipeline_model_parallel_size=pp,
        pipeline_model_parallel_rank=pp_rank,
        tp_group=Group(ranks=tuple(range(tp)), rank=tp_rank, kind="tp"),
    )


@pytest.mark.parametrize("head_type", ["multiquery", "multihead"])
def test_model_at_tp2_pp2_is_the_one_process_model_split(head_type):
    """Every parameter of the four TP 2 x PP 2 ranks, gathered along its partition dim (or held whole,
    the last stage's tied embedding copy included), equals the one-process model's, bit for bit; every
    parameter of the one-process model is found."""
    config = tiny_model_config(num_layers=4, attention_head_type=head_type)
    vocab = 128
    reference = GPTModel(config, vocab)
    reference.init_weights(SEED)
    pieces: dict[str, list[tuple[int, torch.nn.Parameter]]] = {}
    for pp_rank in range(2):
        for tp_rank in range(2):
            stage = build_model(config, vocab, _fake_state(2, tp_rank, 2, pp_rank))
            stage.init_weights(SEED)
            for name, param in stage.named_parameters():
                pieces.setdefault(name, []).append((tp_rank, param))
    assert set(pieces) == {name for name, _ in reference.named_parameters()}
    for name, expected in reference.named_parameters():
        held = pieces[name]
        if getattr(held[0][1], "tensor_model_parallel", False):
            for start in range(0, len(held), 2):  # one pipeline stage's two TP ranks
                (rank0, first), (rank1, second) = held[start : start + 2]
                assert (rank0, rank1) == (0, 1)
                gathered = torch.cat([first.detach(), second.detach()], dim=first.partition_dim)
                assert torch.equal(gathered, expected.detach()), name
        else:
            for _, param in held:
                assert torch.equal(param.detach(), expected.detach()), name


def test_each_parameter_has_its_std():
    """Weights are normal(0, init_method_std), the attention and MLP output projections
    init_method_std / sqrt(2 num_layers); biases zeros, LayerNorm weights ones."""
    config = tiny_model_config(num_layers=2, hidden_size=256, init_method_std=0.05)
    model = GPTModel(config, 512)
    init_weights(model, SEED)
    for name, param in model.named_parameters():
        values = param.detach().double()
        if name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")):
            expected = 0.05 / math.sqrt(2 * config.num_layers)
        elif param.init_method == "normal":
            expected = 0.05
        else:
            assert torch.all(values == (1.0 if param.init_method == "ones" else 0.0)), name
            continue
        n = values.numel()
        assert abs(values.mean().item()) < 5 * expected / math.sqrt(n), name
        assert abs(values.std().item() / expected - 1.0) < 5 * math.sqrt(0.5 / n), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_cpu_bits():
    """The generator on a GPU computes the same bits as on the CPU (integer and correctly rounded float64
    steps only), for whole tensors and shards."""
    for shape, dim, offset, full_shape in [((4096, 300), 0, 0, None), ((64, 150), 1, 150, (64, 300))]:
        on_cpu = normal_slice_(torch.empty(shape), SEED, "w", 0.02, full_shape, dim, offset)
        on_gpu = normal_slice_(torch.empty(shape, device="cuda"), SEED, "w", 0.02, full_shape, dim, offset)
        assert torch.equal(on_gpu.cpu(), on_cpu)
