"""Fill-in-the-Middle (FIM) on packed samples, as StarCoder trained, without the original's defects.

Semantics (docs/fim.md): a sample is split at end-of-document (EOD) tokens; each non-empty segment is
transformed with probability `fim_rate`: its text is cut at two character positions drawn uniformly in
[0, len(text)] into prefix / middle / suffix, each piece is tokenized again on its own and the pieces are
laid out as PSM `<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle` or, with probability
`fim_spm_rate`, SPM `<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle`. EODs stay where they
were; the result is truncated or right-padded with `<fim_pad>` to the sample's length. With
`fim_split_sample`, a segment holding that token is (with probability `fim_rate`) split at it and every
fragment is transformed with probability `fragment_fim_rate`.

What this implementation guarantees beyond the original:
- Lossless: text is built from `tokenizer.token_bytes`, never from a decoder that cleans up spaces.
- Tokens at a segment edge that hold part of a UTF-8 character (the sample was cut inside one) are kept
  as the same ids: leading ones stay at the front of the prefix, trailing ones at the end of the suffix.
  Other special tokens inside a segment (e.g. `<filename>`) are atomic: they count as one character and
  keep their id. A segment whose inner bytes are not UTF-8 is left unchanged.
- Every random draw of sample `i` comes from `sample_rng(seed, name, i)`, so any worker, rank or restart
  produces the same result. Draw order per segment: transform? (uniform), the two cuts (integers), SPM?
  (uniform); a split segment first draws its own transform? and then each fragment as above.
- Fast: re-tokenizing a piece only re-encodes its two ends. For byte-level BPE with the GPT-2 regex, a
  position holding a space or newline right after a printable ASCII character is a pre-token boundary
  in any text that contains both characters (no alternative of the regex matches a non-space followed by
  a space), and BPE never merges across pre-tokens. Between the first and the last such anchor inside a
  piece, the piece's pre-tokens are those of the original document, so the original token ids are reused
  as they are; only the text before the first anchor and after the last one is encoded again. This
  assumes the original tokens are the tokenizer's encoding of the document text (as preprocessing
  writes them); anchors that are not token boundaries disable the shortcut for that piece. Tokenizers
  without that pre-tokenization (SentencePiece, prefix spaces, normalizers) re-encode pieces in full.
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np

FIM_TOKEN_ATTRIBUTES = {
    "fim_prefix": "<fim_prefix>",
    "fim_middle": "<fim_middle>",
    "fim_suffix": "<fim_suffix>",
    "fim_pad": "<fim_pad>",
}

# A space or newline right after printable ASCII: a pre-token boundary of the GPT-2 regex in any context.
_ANCHOR = re.compile(rb"[\x21-\x7e][\n ]")
_ANCHOR_SEARCH_WINDOW = 64


def sample_rng(seed: int, name: str, index: int) -> np.random.Generator:
    """The generator for every FIM draw of sample `index` of dataset `name`: a pure function of its inputs."""
    if seed < 0 or index < 0:
        raise ValueError(f"FIM seed and sample index must be non-negative, got seed={seed} index={index}")
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8")), int(index)])


def undecodable_edges(
    tokens: np.ndarray, token_bytes: list[bytes], is_special: np.ndarray
) -> tuple[int, int]:
    """Numbers of leading and trailing tokens that hold part of a UTF-8 character cut at a segment edge.

    Leading: tokens starting with a continuation byte. Trailing: tokens whose removal is needed so the
    remaining bytes do not end inside a multi-byte character. Special tokens always end the search.
    """
    num_tokens = len(tokens)
    lead = 0
    while (
        lead < num_tokens
        and not is_special[tokens[lead]]
        and _starts_mid_character(token_bytes[tokens[lead]])
    ):
        lead += 1
    tail = 0
    while tail < num_tokens - lead and not is_special[tokens[num_tokens - tail - 1]]:
        window = tokens[max(lead, num_tokens - tail - 4) : num_tokens - tail]
        if not _ends_mid_character(b"".join([token_bytes[t] for t in window.tolist()])):
            break
        tail += 1
    return lead, tail


def _starts_mid_character(data: bytes) -> bool:
    return bool(data) and 0x80 <= data[0] < 0xC0


def _ends_mid_character(data: bytes) -> bool:
    """True when `data` ends with the first bytes of a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return False
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return needed > back
    return False


def supports_local_reencoding(tokenizer) -> bool:
    """Whether pieces may be re-encoded only around their ends (see the module docstring).

    True for a `tokenizers` backend with no normalizer, byte-level BPE without dropout, the GPT-2 regex
    without prefix space (optionally after a Digits split) and only special added tokens.
    """
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "to_str"):
        return False
    config = json.loads(backend.to_str())
    model = config.get("model") or {}
    if config.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return False
    if any(not token.get("special") for token in config.get("added_tokens") or []):
        return False
    if not getattr(backend, "encode_special_tokens", False):
        return False
    pre_tokenizer = config.get("pre_tokenizer") or {}
    steps = (
        pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    )
    if not steps or not all(step.get("type") in ("Digits", "ByteLevel") for step in steps):
        return False
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    return (
        len(byte_level) == 1
        and steps[-1] is byte_level[0]
        and byte_level[0].get("use_regex", True)
        and not byte_level[0].get("add_prefix_space", False)
    )


class _Run:
    """A stretch of ordinary tokens with its bytes and text; encodes any character range of it."""

    __slots__ = ("tokens", "data", "text", "num_chars", "_offsets")

    def __init__(self, tokens: np.ndarray, data: bytes, text: str):
        self.tokens = tokens
        self.data = data
        self.text = text
        self.num_chars = len(text)
        self._offsets = None

    def byte_position(self, char_position: int) -> int:
        if self.num_chars == len(self.data):  # all ASCII
            return char_position
        return len(self.text[:char_position].encode("utf-8"))

    def encode_range(self, start: int, end: int, transform: FIMTransform) -> list[np.ndarray]:
        """Token ids of characters [start, end) as the tokenizer encodes that text on its own."""
        if start >= end:
            return []
        first, last = self.byte_position(start), self.byte_position(end)
        reused = self._reusable_span(first, last, transform) if transform.fast else None
        if reused is None:
            return [np.asarray(transform.encode(self.data[first:last].decode("utf-8")), dtype=np.int64)]
        head, tail, first_token, last_token = reused
        return [
            np.asarray(transform.encode(self.data[first:head].decode("utf-8")), dtype=np.int64),
            self.tokens[first_token:last_token],
            np.asarray(transform.encode(self.data[tail:last].decode("utf-8")), dtype=np.int64),
        ]

    def _reusable_span(self, first: int, last: int, transform: FIMTransform):
        """(head, tail, first token, last token) of the original tokens reusable in bytes [first, last)."""
        match = _ANCHOR.search(self.data, first, last)
        if match is None:
            return None
        head = match.start() + 1
        tail = _last_anchor(self.data, head - 1, last)
        if tail is None or tail <= head:
            return None
        if self._offsets is None:
            self._offsets = np.concatenate(([0], np.cumsum(transform.token_lengths[self.tokens])))
        first_token, last_token = np.searchsorted(self._offsets, [head, tail])
        if self._offsets[first_token] != head or self._offsets[last_token] != tail:
            return None  # the original tokens do not follow this tokenizer's pre-tokens here
        return head, tail, int(first_token), int(last_token)


def _last_anchor(data: bytes, start: int, end: int) -> int | None:
    """The largest anchor position p with start < p < end (the anchor's pair lies in [start, end))."""
    window = _ANCHOR_SEARCH_WINDOW
    while True:
        window_start = max(start, end - window)
        last = None
        for last in _ANCHOR.finditer(data, window_start, end):  # noqa: B007 - keep the last match
            pass
        if last is not None:
            return last.start() + 1
        if window_start == start:
            return None
        window *= 4


class _SegmentText:
    """The lossless text view of one segment: frozen edge tokens, runs of text and atomic specials."""

    def __init__(self, tokens: np.ndarray, transform: FIMTransform):
        self.tokens = tokens
        self.lead, self.tail = undecodable_edges(tokens, transform.token_bytes, transform.is_special)
        core = tokens[self.lead : len(tokens) - self.tail]
        self.units: list[_Run | int] = []
        self.starts: list[int] = []
        self.num_chars = 0
        special_positions = np.flatnonzero(transform.is_special[core]).tolist()
        run_start = 0
        for position in [*special_positions, len(core)]:
            if position > run_start:
                self._add(transform.make_run(core[run_start:position]))
            if position < len(core):
                self._add(int(core[position]))
            run_start = position + 1

    def _add(self, unit) -> None:
        self.units.append(unit)
        self.starts.append(self.num_chars)
        self.num_chars += unit.num_chars if isinstance(unit, _Run) else 1

    def encode(self, start: int, end: int, transform: FIMTransform) -> list[np.ndarray]:
        """Token arrays of characters [start, end): ordinary text re-encoded, special tokens kept."""
        pieces = []
        for unit, unit_start in zip(self.units, self.starts):
            if isinstance(unit, int):
                if start <= unit_start < end:
                    pieces.append(np.array([unit], dtype=np.int64))
                continue
            low, high = max(start, unit_start), min(end, unit_start + unit.num_chars)
            if low < high:
                pieces.extend(unit.encode_range(low - unit_start, high - unit_start, transform))
        return pieces


class FIMTransform:
    """The FIM transform of one sample, given its generator: `transform(sample, rng) -> np.ndarray`.

    `fast=False` re-encodes every piece in full (the reference the fast path must equal token for token).
    """

    def __init__(
        self,
        tokenizer,
        *,
        fim_rate: float,
        fim_spm_rate: float = 0.5,
        fim_split_sample: str | None = None,
        fragment_fim_rate: float = 0.5,
        fast: bool = True,
    ):
        for flag, value in (
            ("--fim-rate", fim_rate),
            ("--fim-spm-rate", fim_spm_rate),
            ("--fragment-fim-rate", fragment_fim_rate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{flag} must be in [0, 1], got {value}")
        self.fim_rate = fim_rate
        self.fim_spm_rate = fim_spm_rate
        self.fragment_fim_rate = fragment_fim_rate
        self.tokenizer = tokenizer
        self.eod = tokenizer.eod
        self.fim_ids = _fim_token_ids(tokenizer, fim_rate)
        self.split_id = _split_token_id(tokenizer, fim_split_sample)
        self.fast = fast and supports_local_reencoding(tokenizer)
        self.encode = tokenizer.encode
        if fim_rate > 0:
            self._build_tables(tokenizer)

    def _build_tables(self, tokenizer) -> None:
        size = max(tokenizer.vocab_size, getattr(tokenizer, "padded_vocab_size", 0))
        self.token_bytes = list(tokenizer.token_bytes) + [b""] * (size - len(tokenizer.token_bytes))
        self.token_lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        # Special tokens (and padding ids, which have no text) are atomic units of a segment.
        self.is_special = np.zeros(size, dtype=bool)
        self.is_special[list(tokenizer.special_token_ids.values())] = True
        self.is_special[tokenizer.vocab_size :] = True

    def make_run(self, tokens: np.ndarray) -> _Run:
        data = b"".join(map(self.token_bytes.__getitem__, tokens.tolist()))
        return _Run(tokens, data, data.decode("utf-8"))

    def __call__(self, sample: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        sample = np.asarray(sample, dtype=np.int64)
        if self.fim_rate == 0:
            return sample
        length = len(sample)
        pieces = []
        start = 0
        for end in [*np.flatnonzero(sample == self.eod).tolist(), length]:
            if end > start:
                pieces.extend(self._transform_segment(sample[start:end], rng))
            if end < length:
                pieces.append(sample[end : end + 1])
            start = end + 1
        result = np.concatenate(pieces) if pieces else sample[:0]
        if len(result) >= length:
            return result[:length]
        return np.concatenate([result, np.full(length - len(result), self.fim_ids["fim_pad"], np.int64)])

    def _transform_segment(self, segment: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        if self.split_id is None or not (segment == self.split_id).any():
            return self._maybe_permute(segment, rng, self.fim_rate)
        if rng.random() >= self.fim_rate:
            return [segment]
        pieces = []
        start = 0
        for end in [*np.flatnonzero(segment == self.split_id).tolist(), len(segment)]:
            if end > start:
                pieces.extend(self._maybe_permute(segment[start:end], rng, self.fragment_fim_rate))
            if end < len(segment):
                pieces.append(segment[end : end + 1])
            start = end + 1
        return pieces

    def _maybe_permute(self, tokens: np.ndarray, rng: np.random.Generator, rate: float) -> list[np.ndarray]:
        if rng.random() >= rate:
            return [tokens]
        try:
            view = _SegmentText(tokens, self)
        except UnicodeDecodeError:
            return [tokens]  # bytes that are not UTF-8 inside the segment: nothing to cut safely
        low, high = sorted(rng.integers(0, view.num_chars + 1, size=2).tolist())
        spm = rng.random() < self.fim_spm_rate
        prefix = [tokens[: view.lead], *view.encode(0, low, self)]
        middle = view.encode(low, high, self)
        suffix = [*view.encode(high, view.num_chars, self), tokens[len(tokens) - view.tail :]]
        ids = self.fim_ids
        if spm:
            return [
                np.array([ids["fim_prefix"], ids["fim_suffix"]], np.int64),
                *suffix,
                np.array([ids["fim_middle"]], np.int64),
                *prefix,
                *middle,
            ]
        return [
            np.array([ids["fim_prefix"]], np.int64),
            *prefix,
            np.array([ids["fim_suffix"]], np.int64),
            *suffix,
            np.array([ids["fim_middle"]], np.int64),
            *middle,
        ]


def _fim_token_ids(tokenizer, fim_rate: float) -> dict[str, int | None]:
    ids = {attribute: getattr(tokenizer, attribute, None) for attribute in FIM_TOKEN_ATTRIBUTES}
    missing = [FIM_TOKEN_ATTRIBUTES[attribute] for attribute, value in ids.items() if value is None]
    if fim_rate > 0 and missing:
        raise ValueError(
            f"--fim-rate {fim_rate} needs the FIM tokens, but tokenizer {getattr(tokenizer, 'name', '?')} "
            f"lacks {', '.join(missing)}; use a tokenizer with them or --fim-rate 0"
        )
    return ids


def _split_token_id(tokenizer, fim_split_sample: str | None) -> int | None:
    if fim_split_sample is None:
        return None
    token_id = tokenizer.token_to_id(fim_split_sample)
    if token_id is None:
        raise ValueError(
            f"--fim-split-sample {fim_split_sample!r} is not a token of tokenizer "
            f"{getattr(tokenizer, 'name', '?')}; give a token of its vocabulary (e.g. <file_sep>)"
        )
    return token_id


def apply_fim(
    sample: np.ndarray,
    rng: np.random.Generator,
    tokenizer,
    *,
    fim_rate: float,
    fim_spm_rate: float = 0.5,
    fim_split_sample: str | None = None,
    fragment_fim_rate: float = 0.5,
) -> np.ndarray:
    """FIM-transform one sample with draws from `rng` (a one-off; build a `FIMTransform` to reuse tables)."""
    transform = FIMTransform(
        tokenizer,
        fim_rate=fim_rate,
        fim_spm_rate=fim_spm_rate,
        fim_split_sample=fim_split_sample,
        fragment_fim_rate=fragment_fim_rate,
    )
    return transform(sample, rng)


class FIMDataset:
    """Wraps a dataset of token samples; `ds[i]` is sample i FIM-transformed, same length, int64.

    The draws for sample i come from `sample_rng(seed, name, i)`. With fim_rate 0 it passes samples
    through and needs no FIM tokens.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        *,
        fim_rate: float,
        fim_spm_rate: float = 0.5,
        seed: int,
        name: str = "train",
        fim_split_sample: str | None = None,
        fragment_fim_rate: float = 0.5,
    ):
        if seed < 0:
            raise ValueError(f"--seed must be non-negative for FIM, got {seed}")
        self.dataset = dataset
        self.seed = seed
        self.name = name
        self.transform = FIMTransform(
            tokenizer,
            fim_rate=fim_rate,
            fim_spm_rate=fim_spm_rate,
            fim_split_sample=fim_split_sample,
            fragment_fim_rate=fragment_fim_rate,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += len(self)
        sample = np.asarray(self.dataset[index], dtype=np.int64)
        if self.transform.fim_rate == 0:
            return sample
        return self.transform(sample, sample_rng(self.seed, self.name, index))
