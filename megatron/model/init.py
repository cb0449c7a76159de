"""Layout-invariant initialisation: every element is a function of (seed, logical parameter name, position).

Each parameter carries `init_method` ("normal", "zeros" or "ones") and `init_std` (set by the leaf-layer
factories in `megatron.model.layers`). A "normal" parameter is drawn from a counter-based generator: the
value of element i (its row-major position in the logical, TP 1 `full_shape`) is

    std * N(stream(seed, name), i)

a pure function of the seed, the logical parameter name (`layers.5.mlp.dense_4h_to_h.weight`, with the
global layer index) and i. So a rank computes exactly its own tensor-parallel slice, from its element
indices, without drawing the rest; the result does not depend on build order, the global RNG, the
parallel layout or the chunking. A model built at TP 4 / PP 4 holds, gathered, the TP 1 / PP 1 model's
weights bit for bit, which is what the parity tests compare.

The generator (`N`): element indices 2p and 2p + 1 share the pair p, hashed by SplitMix64:
h = mix64(start + p * gamma) (wrapping 64-bit arithmetic; `start` and the odd `gamma` come from a BLAKE2b
hash of "{seed}/{name}", so every tensor has its own stream). Box-Muller turns h into two independent
standard normals: the top 32 bits give u = (bits + 1/2) / 2^32 in (0, 1) and the radius
r = sqrt(-2 ln u); bits 29..0 give f = (bits + 1/2) / 2^30 and the angle phi = pi/2 * f in the first
quadrant; element 2p is +-r cos(phi), element 2p + 1 is +-r sin(phi), negative where bit 30 (resp. 31)
is set. (The sign bits reflect the point into a uniformly chosen quadrant, so its angle is uniform over
the circle, as Box-Muller needs.) The value is rounded once from float64 to float32 (then to the
parameter's dtype).

Every step is integer arithmetic or a correctly rounded IEEE float64 +, -, * or / (ln, cos and sin are
polynomials, sqrt a bit-level guess and Newton steps, built from those; torch.log or torch.sqrt may come
from a CPU vector-math library that does not round correctly), each torch call one rounding, so the bits
do not depend on the device: the tests compare the CPU with the scalar Python definition
`reference_normal`, and, where CUDA is present, the GPU with the CPU. Tails: |N| <= sqrt(2 * 33 ln 2) = 6.77 (u >= 2^-33), a cut at probability 1.4e-11.

Cost: about 100 elementwise torch calls per block of pairs; on one CPU thread about three times torch's
sequential normal_ per element, so a TP 4 shard costs less than drawing its full tensors did (15.5B stage
0: 16.5 against 22.7 CPU seconds, `bench/init.py`), and unlike normal_ it runs on all threads or the GPU.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
from torch import nn

_U64 = (1 << 64) - 1
_MANTISSA = (1 << 52) - 1
_ONE = 0x3FF << 52  # the bits of 1.0
_TWO_52 = 0x433 << 52  # the bits of 2^52: (bits | n) is 2^52 + n for 0 <= n < 2^52
_SQRT2_BITS = struct.unpack("<q", struct.pack("<d", math.sqrt(2.0)))[0]
_LN2 = float.fromhex("0x1.62e42fefa39efp-1")
_HALF_PI = math.pi / 2
_SQRT_GUESS, _SQRT_STEPS = 0x1FF7A3BEA91D9B1B, 3  # sqrt's first guess: its bits ~ (bits of x) / 2


def _int64(value: int) -> int:
    """The int64 (two's complement) with the low 64 bits of `value`."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


_MIX = ((30, _int64(0xBF58476D1CE4E5B9)), (27, _int64(0x94D049BB133111EB)), (31, None))  # SplitMix64
_SIGN = _int64(1 << 63)


def _series(first: float, ratio) -> tuple[float, ...]:
    """Polynomial coefficients c_k = c_{k-1} * ratio(k) (float64 products and quotients only, so the
    same constants on every platform; no libm pow)."""
    coefficients = [first]
    for k in range(1, 16):
        coefficients.append(coefficients[-1] * ratio(k))
    return tuple(coefficients)


# ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716 for m in [sqrt(1/2), sqrt(2)):
# 2 * sum_k s^(2k+1) / (2k+1), 6 terms: relative error below 2e-11
_LN_TERMS = tuple(2.0 / (2 * k + 1) for k in range(6))
# cos(pi/2 f) and sin(pi/2 f) / f for f in (0, 1), as polynomials in f^2: Taylor, absolute error < 1e-10
_COS_TERMS = _series(1.0, lambda k: -_HALF_PI * _HALF_PI / ((2 * k - 1) * (2 * k)))[:8]
_SIN_TERMS = _series(_HALF_PI, lambda k: -_HALF_PI * _HALF_PI / ((2 * k) * (2 * k + 1)))[:8]

# pairs per generation block: big enough to amortise torch's per-call cost, small enough (a few MB of
# work buffers) to stay in cache on a CPU; a GPU takes far bigger blocks
_BLOCK_PAIRS = {"cpu": 1 << 16}
_DEVICE_BLOCK_PAIRS = 1 << 22


def parameter_stream(seed: int, name: str) -> tuple[int, int]:
    """(start, gamma) of the counter stream of parameter `name` under `seed`: 64-bit values (gamma odd,
    with enough bit transitions, as SplitMix64's own split) from a BLAKE2b hash of "{seed}/{name}"."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=16).digest()
    start = int.from_bytes(digest[:8], "little")
    z = int.from_bytes(digest[8:], "little")
    for multiplier in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        z = ((z ^ (z >> 33)) * multiplier) & _U64
    z = (z ^ (z >> 33)) | 1
    if bin(z ^ (z >> 1)).count("1") < 24:
        z ^= 0xAAAAAAAAAAAAAAAA
    return start, z


# ---- the scalar definition (tests compare the vectorised generator with it, bit for bit) ----


def _as_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", bits & _U64))[0]


def _as_bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _horner(x: float, terms: tuple[float, ...]) -> float:
    acc = x * terms[-1]
    for term in reversed(terms[1:-1]):
        acc = (acc + term) * x
    return acc + terms[0]


def _sqrt(x: float) -> float:
    """sqrt(x), x > 0: a guess from the bits (within 3.5%), then Newton steps y = (y + x / y) / 2; relative
    error below 1e-13."""
    y = _as_float((_as_bits(x) >> 1) + _SQRT_GUESS)
    for _ in range(_SQRT_STEPS):
        y = (y + x / y) * 0.5
    return y


def _mix64(z: int) -> int:
    for shift, multiplier in _MIX:
        z ^= z >> shift
        if multiplier is not None:
            z = (z * multiplier) & _U64
    return z


def reference_normal(stream: tuple[int, int], index: int, std: float = 1.0) -> float:
    """Element `index` of the stream `stream` (`parameter_stream`) times `std`, as a Python float
    (float64), computed one scalar at a time: the definition the vectorised generator reproduces."""
    start, gamma = stream
    h = _mix64((start + (index >> 1) * gamma) & _U64)
    u = _as_float((h >> 12) & (0xFFFFFFFF << 20) | _ONE | (1 << 19)) - 1.0  # (top 32 bits + 1/2) / 2^32
    exponent, mantissa = _as_bits(u) >> 52, _as_bits(u) & _MANTISSA | _ONE
    if mantissa >= _SQRT2_BITS:  # m in [sqrt(1/2), sqrt(2))
        exponent, mantissa = exponent + 1, mantissa - (1 << 52)
    s = _as_float(mantissa) - 1.0
    s = s / (s + 2.0)
    ln_u = _horner(s * s, _LN_TERMS) * s + (_as_float(_TWO_52 | exponent) - float(2**52 + 1023)) * _LN2
    radius = _sqrt(ln_u * -2.0) * std
    f = _as_float((h << 22) & (((1 << 30) - 1) << 22) | _ONE | (1 << 21)) - 1.0  # (bits 29..0 + 1/2) / 2^30
    cos_phi, sin_phi = _horner(f * f, _COS_TERMS), _horner(f * f, _SIN_TERMS) * f
    value, negative = (cos_phi, (h >> 30) & 1) if index & 1 == 0 else (sin_phi, (h >> 31) & 1)
    return -(radius * value) if negative else radius * value


# ---- the vectorised generator ----


class _Buffers:
    """Work buffers for blocks of up to `size` pairs on one device (reused across blocks)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        self.ints = [torch.empty(size, dtype=torch.int64, device=device) for _ in range(2)]
        self.floats = [torch.empty(size, dtype=torch.float64, device=device) for _ in range(4)]
        self.values = torch.empty(size, 2, dtype=torch.float64, device=device)

    def take(self, n: int) -> tuple[torch.Tensor, ...]:
        """(h, t, a, b, c, d, values): views of the first n pairs."""
        return (*(x[:n] for x in self.ints), *(x[:n] for x in self.floats), self.values[:n])


def _horner_(out: torch.Tensor, x: torch.Tensor, terms: tuple[float, ...]) -> torch.Tensor:
    """out = the polynomial sum_k terms[k] x^k, evaluated as `_horner` does."""
    torch.mul(x, terms[-1], out=out)
    for term in reversed(terms[1:-1]):
        out.add_(term).mul_(x)
    return out.add_(terms[0])


def _mix64_(h: torch.Tensor, t: torch.Tensor) -> None:
    """SplitMix64's finaliser in place on int64 `h` (logical shifts: arithmetic shift, then mask)."""
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(h, shift, out=t)
        h.bitwise_xor_(t.bitwise_and_((1 << (64 - shift)) - 1))
        if multiplier is not None:
            h.mul_(multiplier)


def _scaled_radius_(h, t, a, b, c, std: float) -> None:
    """b = std * sqrt(-2 ln u), u from the top 32 bits of h (as `reference_normal`); t, a, c scratch."""
    a_bits, b_bits = a.view(torch.int64), b.view(torch.int64)
    torch.bitwise_right_shift(h, 12, out=a_bits)
    a_bits.bitwise_and_(0xFFFFFFFF << 20).bitwise_or_(_ONE | (1 << 19))
    a.sub_(1.0)  # u
    torch.bitwise_right_shift(a_bits, 52, out=t)  # biased exponent
    a_bits.bitwise_and_(_MANTISSA).bitwise_or_(_ONE)  # m in [1, 2)
    torch.neg(a_bits, out=b_bits)
    b_bits.add_(_SQRT2_BITS - 1).bitwise_right_shift_(63)  # -1 where m >= sqrt(2), else 0
    t.sub_(b_bits)
    a_bits.add_(b_bits.bitwise_left_shift_(52))  # halved there: m in [sqrt(1/2), sqrt(2))
    a.sub_(1.0)
    a.div_(torch.add(a, 2.0, out=b))  # s = (m - 1) / (m + 1)
    _horner_(b, torch.mul(a, a, out=c), _LN_TERMS).mul_(a)  # ln m
    exponent = t.bitwise_or_(_TWO_52).view(torch.float64)
    b.add_(exponent.sub_(float(2**52 + 1023)).mul_(_LN2))  # ln u
    _sqrt_(b.mul_(-2.0), c, a).mul_(std)


def _sqrt_(x: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """x = sqrt(x) for x > 0 by `_sqrt`'s steps (torch.sqrt on a CPU may be a vector library's, not
    correctly rounded); y, q scratch."""
    y_bits = y.view(torch.int64)
    torch.bitwise_right_shift(x.view(torch.int64), 1, out=y_bits).add_(_SQRT_GUESS)
    for _ in range(_SQRT_STEPS):
        y.add_(torch.div(x, y, out=q)).mul_(0.5)
    return x.copy_(y)


def _normal_pairs(h: torch.Tensor, stream: tuple[int, int], std: float, buffers: _Buffers) -> torch.Tensor:
    """[n, 2] float64: std * N at elements (2p, 2p + 1) for the pair indices p in int64 `h` (consumed)."""
    _, t, a, b, c, d, values = buffers.take(h.numel())
    start, gamma = stream
    h.mul_(_int64(gamma)).add_(_int64(start))
    _mix64_(h, t)
    _scaled_radius_(h, t, a, b, c, std)
    a_bits, c_bits, d_bits = a.view(torch.int64), c.view(torch.int64), d.view(torch.int64)
    torch.bitwise_left_shift(h, 22, out=a_bits)
    a_bits.bitwise_and_(((1 << 30) - 1) << 22).bitwise_or_(_ONE | (1 << 21))
    a.sub_(1.0)  # f
    square, cos_phi, sin_phi = torch.mul(a, a, out=t.view(torch.float64)), d, c
    _horner_(cos_phi, square, _COS_TERMS)
    _horner_(sin_phi, square, _SIN_TERMS).mul_(a)
    # the signs: bit 30 (31) of h moved to the sign bit of the cosine (sine)
    d_bits.bitwise_xor_(torch.bitwise_left_shift(h, 33, out=a_bits).bitwise_and_(_SIGN))
    c_bits.bitwise_xor_(h.bitwise_left_shift_(32).bitwise_and_(_SIGN))
    torch.mul(cos_phi, b, out=values[:, 0])
    torch.mul(sin_phi, b, out=values[:, 1])
    return values


# ---- filling a slice of a logical tensor ----


def _block_pairs(device: torch.device) -> int:
    return _BLOCK_PAIRS.get(device.type, _DEVICE_BLOCK_PAIRS)


def _row_blocks(rows: int, width: int, row_step: int, max_pairs: int):
    """Blocks (first row, number of rows, first column, columns) covering a [rows, width] array, rows
    taken `row_step` apart, each block at most `max_pairs` pairs (a long row is cut into even widths)."""
    columns = min(width, 2 * (max_pairs - 1))
    rows_per_block = max(1, max_pairs // (columns // 2 + 1))
    for first in range(min(row_step, rows)):
        count = len(range(first, rows, row_step))
        for i in range(0, count, rows_per_block):
            for column in range(0, width, columns):
                yield (
                    first + i * row_step,
                    min(rows_per_block, count - i),
                    column,
                    min(columns, width - column),
                )


@torch.no_grad()
def normal_slice_(
    out: torch.Tensor,
    seed: int,
    name: str,
    std: float,
    full_shape: tuple[int, ...] | None = None,
    dim: int = 0,
    offset: int = 0,
    *,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Fill `out` with its part of the logical tensor `name` of `full_shape` (default: out's shape) drawn
    from normal(0, std): the slice of `full_shape` that starts at `offset` along `dim` (out's shape
    elsewhere). Computed on out's device from the element indices alone; every element equals the one
    at the same logical position of the whole tensor drawn with the same (seed, name). `workspace`: a
    dict that keeps the work buffers between calls (`init_weights` passes one for the whole model)."""
    full_shape = tuple(out.shape) if full_shape is None else tuple(full_shape)
    if out.dim() != len(full_shape) or (out.dim() and not 0 <= dim < out.dim()):
        raise ValueError(f"normal_slice_: a {tuple(out.shape)} slice of {full_shape} along dim {dim}")
    if tuple(out.shape[:dim]) + tuple(out.shape[dim + 1 :]) != full_shape[:dim] + full_shape[dim + 1 :] or (
        out.dim() and not 0 <= offset <= offset + out.shape[dim] <= full_shape[dim]
    ):
        raise ValueError(f"normal_slice_: {tuple(out.shape)} at {offset} is not a slice of {full_shape}")
    if out.numel() == 0 or out.is_meta:
        return out
    inner = math.prod(full_shape[dim + 1 :])
    rows = math.prod(full_shape[:dim])
    stride, base, width = full_shape[dim] * inner if out.dim() else 1, offset * inner, out.numel() // rows
    direct = out.is_contiguous() and out.dtype == torch.float32
    target = out.view(rows, width) if direct else torch.empty(rows, width, device=out.device)
    workspace = {} if workspace is None else workspace
    _fill_rows(target, parameter_stream(seed, name), std, stride, base, workspace)
    if not direct:  # float64 -> float32 -> out's dtype, as a float32 model cast later
        out.copy_(target.view(out.shape))
    return out


def _fill_rows(target: torch.Tensor, stream, std: float, stride: int, base: int, workspace: dict) -> None:
    """target [rows, width] float32: row q holds the elements q * stride + base + (0 .. width - 1) of the
    stream, computed pair by pair in blocks (the rows of one block start at the same parity)."""
    rows, width = target.shape
    row_step = 1 if stride % 2 == 0 else 2
    max_pairs = _block_pairs(target.device)
    size = min(max_pairs, rows * (width // 2 + 1))
    buffers = workspace.get(target.device)
    if buffers is None or buffers.size < size:
        buffers = workspace[target.device] = _Buffers(size, target.device)
    for first_row, num_rows, column, columns in _row_blocks(rows, width, row_step, max_pairs):
        first = first_row * stride + base + column
        parity = first & 1
        pairs = (parity + columns + 1) // 2
        row_pairs = torch.arange(num_rows, device=target.device).mul_(row_step * stride // 2).add_(first >> 1)
        h = buffers.ints[0][: num_rows * pairs].view(num_rows, pairs)
        torch.add(row_pairs.unsqueeze(1), torch.arange(pairs, device=target.device), out=h)
        values = _normal_pairs(h.view(-1), stream, std, buffers).view(num_rows, 2 * pairs)
        last_row = first_row + (num_rows - 1) * row_step + 1
        destination = target[first_row:last_row:row_step, column : column + columns]
        destination.copy_(values[:, parity : parity + columns])


# ---- parameters ----


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed that depends only on (seed, parameter name), for callers wanting a torch.Generator
    per parameter (the init itself uses `parameter_stream`)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def local_shard(full: torch.Tensor, param: nn.Parameter, tensor_model_parallel_rank: int) -> torch.Tensor:
    """The slice of the full tensor `full` that tensor-parallel rank `tensor_model_parallel_rank` holds as
    `param` (contiguous chunks along `partition_dim`, rank order); `full` itself when not split."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    size = param.shape[dim]
    return full.narrow(dim, tensor_model_parallel_rank * size, size)


@torch.no_grad()
def init_parameter(
    param: nn.Parameter, seed: int, name: str, *, tensor_model_parallel_rank: int = 0, workspace=None
) -> None:
    """Initialise one parameter per its `init_method`/`init_std` attributes: a "normal" one gets its
    tensor-parallel rank's slice of the logical tensor `name` (`normal_slice_`), drawn alone."""
    method = getattr(param, "init_method", None)
    if method == "zeros":
        param.zero_()
    elif method == "ones":
        param.fill_(1.0)
    elif method == "normal":
        dim, offset = 0, 0
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            offset = tensor_model_parallel_rank * param.shape[dim]
        full_shape = getattr(param, "full_shape", tuple(param.shape))
        normal_slice_(param.data, seed, name, param.init_std, full_shape, dim, offset, workspace=workspace)
    else:
        raise AssertionError(f"parameter {name} has no init_method attribute")


def init_weights(model: nn.Module, seed: int, tensor_model_parallel_rank: int = 0) -> None:
    """Initialise every parameter of `model` (a GPTModel or a pipeline stage of one) by its logical name:
    normal(0, init_method_std) for weights (attention.dense and mlp.dense_4h_to_h: init_method_std /
    sqrt(2 * num_layers)), zeros for biases, ones for LayerNorm weights."""
    workspace = {}
    for name, param in model.named_parameters():
        init_parameter(
            param, seed, name, tensor_model_parallel_rank=tensor_model_parallel_rank, workspace=workspace
        )
