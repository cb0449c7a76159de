"""One readable message for weights whose names or shapes do not fit the model they are loaded into.

A changed ``--hidden-size`` makes nearly every tensor differ; listing them all on one line hides the
cause. The message gives the counts, the first few differences one per line with both shapes, and the
flag the differing dimensions point to (hidden size, vocabulary and its padding, positions, layers,
attention heads, FFN size), for our names (``embedding.word_embeddings``, ``layers.N.mlp.dense_h_to_4h``)
and GPTBigCode's (``transformer.wte``, ``transformer.h.N.mlp.c_fc``) alike. Every loader uses it: the
sharded checkpointer, single-file and legacy imports, the Hugging Face conversion, inference.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

Shape = tuple[int, ...]

NUM_SHOWN = 5  # differences listed one per line; the rest are counted

_HEADS = "--num-attention-heads or --kv-channels"
# (pattern of a tensor name, dimension, what sets that dimension, a hint); the first differing tensor of
# each rule gives the sizes shown. --hidden-size first: it changes the attention and FFN shapes too.
_DIMENSION_RULES = (
    (re.compile(r"(layernorm|ln_\d|ln_f)\.weight$"), 0, "--hidden-size", ""),
    (
        re.compile(r"(word_embeddings|wte|output_layer|lm_head)\.weight$"),
        0,
        "the padded vocabulary size",
        ", set by the tokenizer, --vocab-size and --make-vocab-size-divisible-by",
    ),
    (re.compile(r"(position_embeddings|wpe)\.weight$"), 0, "--max-position-embeddings", ""),
    (re.compile(r"(dense_h_to_4h|c_fc)\.weight$"), 0, "--ffn-hidden-size", ""),
    (re.compile(r"(query_key_value|query|key_value|c_attn)\.weight$"), 0, _HEADS, ""),
)
_LAYER = re.compile(r"(?:^|[./])(?:layers|h)\.(\d+)\.")
_PROJECTION = re.compile(r"attention\.(query_key_value|query|key_value)\.weight$")


def _num_layers(names: Iterable[str]) -> int:
    indices = [int(match.group(1)) for name in names if (match := _LAYER.search(name))]
    return max(indices) + 1 if indices else 0


def _projections(names: Iterable[str]) -> str:
    return " and ".join(sorted({match.group(1) for name in names if (match := _PROJECTION.search(name))}))


def likely_causes(expected: Mapping[str, Shape], found: Mapping[str, Shape]) -> list[str]:
    """The flags the differences point to, each with the checkpoint's and the model's size."""
    causes = []
    layers = (_num_layers(found), _num_layers(expected))
    if layers[0] != layers[1] and all(layers):  # no layer at all: not a layer count, other weights
        causes.append(f"--num-layers (checkpoint {layers[0]}, model {layers[1]})")
    projections = (_projections(found), _projections(expected))
    if projections[0] != projections[1] and all(projections):
        causes.append(
            f"--attention-head-type (checkpoint {projections[0]}, model {projections[1]}; "
            "multiquery keeps query and key_value apart)"
        )
    for pattern, dim, flag, hint in _DIMENSION_RULES:
        if flag in (_HEADS, "--ffn-hidden-size") and any(c.startswith("--hidden-size") for c in causes):
            continue  # follows from the hidden size
        for name, shape in expected.items():
            other = found.get(name)
            if other is None or not len(other) == len(shape) > dim or not pattern.search(name):
                continue
            if other[dim] != shape[dim]:
                causes.append(f"{flag} (checkpoint {other[dim]}, model {shape[dim]}){hint}")
                break
    return causes


def _show(shape) -> str:
    return str(list(shape))


def mismatch_message(
    source: str,
    expected: Mapping[str, Shape],
    found: Mapping[str, Shape],
    *,
    extra_ok: Iterable[str] = (),
    found_name: str = "checkpoint",
) -> str | None:
    """None when ``found`` (name -> shape of the weights read) fits ``expected`` (the model's), else the
    message: ``source`` (the checkpoint or file), the counts, the likely flags, the first differences."""
    extra_ok = set(extra_ok)
    differing = [n for n, shape in expected.items() if n in found and tuple(found[n]) != tuple(shape)]
    missing = [n for n in expected if n not in found]
    unexpected = sorted(n for n in found if n not in expected and n not in extra_ok)
    if not (differing or missing or unexpected):
        return None
    lines = [f"{n}: {found_name} {_show(found[n])}, model {_show(expected[n])}" for n in differing]
    lines += [f"{n}: missing from the {found_name} (model {_show(expected[n])})" for n in missing]
    lines += [f"{n}: not in the model ({found_name} {_show(found[n])})" for n in unexpected]
    counts = [
        f"{len(what)} {label}"
        for what, label in (
            (differing, "differs in shape" if len(differing) == 1 else "differ in shape"),
            (missing, "missing"),
            (unexpected, "unexpected"),
        )
        if what
    ]
    head = f"{source} does not fit the model: of {len(expected)} tensors, {', '.join(counts)}"
    causes = likely_causes(expected, {n: tuple(s) for n, s in found.items()})
    if causes:
        head += f"; likely {'; '.join(causes)}"
    shown = [f"  {line}" for line in lines[:NUM_SHOWN]]
    if len(lines) > NUM_SHOWN:
        shown.append(f"  ... and {len(lines) - NUM_SHOWN} more")
    return "\n".join([head, *shown])


def check_fits(
    source: str,
    expected: Mapping[str, Shape],
    found: Mapping[str, Shape],
    *,
    extra_ok: Iterable[str] = (),
    found_name: str = "checkpoint",
) -> None:
    """ValueError with :func:`mismatch_message` when the weights do not fit the model."""
    message = mismatch_message(source, expected, found, extra_ok=extra_ok, found_name=found_name)
    if message is not None:
        raise ValueError(message)
