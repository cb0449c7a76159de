"""FIM: the semantics and the six guarantees of docs/fim.md, checked against an independent reference."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from megatron.data.fim import FIMDataset, FIMTransform, apply_fim, sample_rng

TRICKY_CODE = [
    "x = a . b\nif a != b :\n    print ( 'it 's' ) ; y = x . z  # don 't\n",
    's = "héllo wörld"  # ünïcödé . !=\n' * 3,
    "emoji = '😀🚀🎉' + \"漢字かな\"  . 's !=\n\n\n   tail   \n",
    "def f(x):\n\treturn x  !=  None . real  's\n" + "# 😀 ü 漢\n" * 4,
    "  \n \n\t\t\n' 's 't 're 've 'm 'll 'd . . . ! = !=\n",
    "literal <|endoftext|> and <fim_middle> are text here: 's 12345 67\n",
]


def stream_of(tokenizer, documents: list[str], eods_between=(1,)) -> np.ndarray:
    """Documents encoded and joined with EODs (cycling through `eods_between` EODs after each)."""
    tokens = []
    for position, document in enumerate(documents):
        tokens += tokenizer.encode(document)
        tokens += [tokenizer.eod] * eods_between[position % len(eods_between)]
    return np.array(tokens, dtype=np.int64)


@pytest.fixture(scope="module")
def corpus_stream(tiny_tokenizer, demo_corpus_path) -> np.ndarray:
    with open(demo_corpus_path, encoding="utf-8") as file:
        documents = [json.loads(line)["content"] for line in file][:12]
    return stream_of(tiny_tokenizer, documents + TRICKY_CODE * 3, eods_between=(1, 2, 1))


# ---- an independent, deliberately simple reference: characters exploded into a list ----


def reference_fim(sample, rng, tokenizer, *, fim_rate, spm_rate, split_id=None, fragment_rate=0.5):
    """Straightforward FIM following docs/fim.md, re-encoding every piece in full."""
    pieces, start = [], 0
    eods = [i for i, token in enumerate(sample) if token == tokenizer.eod]
    for end in [*eods, len(sample)]:
        segment = list(sample[start:end])
        if segment and split_id is not None and split_id in segment:
            if rng.random() < fim_rate:
                segment = reference_fragments(segment, rng, tokenizer, split_id, fragment_rate, spm_rate)
        elif segment:
            segment = reference_permute(segment, rng, tokenizer, fim_rate, spm_rate)
        pieces += segment + ([tokenizer.eod] if end < len(sample) else [])
        start = end + 1
    pieces = pieces[: len(sample)]
    return pieces + [tokenizer.fim_pad] * (len(sample) - len(pieces))


def reference_fragments(segment, rng, tokenizer, split_id, rate, spm_rate):
    out, fragment = [], []
    for token in [*segment, None]:
        if token is None or token == split_id:
            if fragment:
                out += reference_permute(fragment, rng, tokenizer, rate, spm_rate)
            out += [split_id] if token is not None else []
            fragment = []
        else:
            fragment.append(token)
    return out


def reference_permute(tokens, rng, tokenizer, rate, spm_rate):
    if rng.random() >= rate:
        return tokens
    special = set(tokenizer.special_token_ids.values())
    token_bytes = tokenizer.token_bytes
    lead = 0
    while lead < len(tokens) and tokens[lead] not in special and 0x80 <= token_bytes[tokens[lead]][0] < 0xC0:
        lead += 1
    tail = 0
    while tail < len(tokens) - lead and tokens[len(tokens) - 1 - tail] not in special:
        decoder = codecs.getincrementaldecoder("utf-8")()
        decoder.decode(b"".join(token_bytes[t] for t in tokens[lead : len(tokens) - tail]), final=False)
        if not decoder.getstate()[0]:
            break
        tail += 1
    characters = []  # one entry per character: a str, or the id of an atomic special token
    run = b""
    for token in [*tokens[lead : len(tokens) - tail], None]:
        if token is None or token in special:
            characters += list(run.decode("utf-8"))
            characters += [token] if token is not None else []
            run = b""
        else:
            run += token_bytes[token]
    low, high = sorted(rng.integers(0, len(characters) + 1, size=2).tolist())
    spm = rng.random() < spm_rate

    def encode(chars):
        out, text = [], ""
        for item in [*chars, None]:
            if isinstance(item, str):
                text += item
                continue
            out += tokenizer.encode(text) if text else []
            out += [item] if item is not None else []
            text = ""
        return out

    prefix = tokens[:lead] + encode(characters[:low])
    middle = encode(characters[low:high])
    suffix = encode(characters[high:]) + tokens[len(tokens) - tail :]
    p, s, m = tokenizer.fim_prefix, tokenizer.fim_suffix, tokenizer.fim_middle
    if spm:
        return [p, s, *suffix, m, *prefix, *middle]
    return [p, *prefix, s, *suffix, m, *middle]


# ---- helpers to read a transformed segment back ----


def split_layout(tokens: list[int], tokenizer) -> tuple[list[int], list[int], list[int], bool]:
    """(prefix, middle, suffix, is_spm) of one transformed segment."""
    p, s, m = tokenizer.fim_prefix, tokenizer.fim_suffix, tokenizer.fim_middle
    assert tokens[0] == p
    middle_at = tokens.index(m)
    if tokens[1] == s:
        rest = tokens[middle_at + 1 :]
        return rest, [], tokens[2:middle_at], True  # prefix and middle are concatenated in SPM
    suffix_at = tokens.index(s)
    return tokens[1:suffix_at], tokens[middle_at + 1 :], tokens[suffix_at + 1 : middle_at], False


def raw_bytes(tokenizer, ids) -> bytes:
    return b"".join(tokenizer.token_bytes[i] for i in ids)


def test_fast_path_is_active_for_starcoder_recipe(tiny_tokenizer):
    assert FIMTransform(tiny_tokenizer, fim_rate=0.5).fast


@pytest.mark.parametrize("spm_rate", [0.0, 1.0])
def test_lossless_on_tricky_code(tiny_tokenizer, spm_rate):
    transform = FIMTransform(tiny_tokenizer, fim_rate=1.0, fim_spm_rate=spm_rate)
    for seed, document in enumerate(TRICKY_CODE * 8):
        segment = tiny_tokenizer.encode(document)
        # Trailing EODs give room: the output is cut back to the sample length at the end.
        sample = np.array(segment + [tiny_tokenizer.eod] * 40)
        out = transform(sample, sample_rng(seed, "lossless", 0)).tolist()
        transformed = out[: out.index(tiny_tokenizer.eod)]
        prefix, middle, suffix, is_spm = split_layout(transformed, tiny_tokenizer)
        assert is_spm == (spm_rate == 1.0)
        assert raw_bytes(tiny_tokenizer, prefix + middle + suffix) == document.encode("utf-8")
        text = tiny_tokenizer.decode(prefix + middle + suffix)
        assert text == document and "\ufffd" not in text  # " ." / " !=" / " 's" untouched


def test_cut_inside_multibyte_character_keeps_edge_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    tokens = tok.encode("a = '😀漢ü' + \"🚀\"\n" * 6)

    def ends_inside_character(ids):
        decoder = codecs.getincrementaldecoder("utf-8")()
        decoder.decode(raw_bytes(tok, ids), final=False)
        return bool(decoder.getstate()[0])

    starts = [i for i, t in enumerate(tokens) if 0x80 <= tok.token_bytes[t][0] < 0xC0]
    ends = [i for i in range(1, len(tokens)) if ends_inside_character(tokens[:i])]
    assert starts and ends, "the fixture needs windows that start and end inside a character"
    transform = FIMTransform(tok, fim_rate=1.0)
    windows = [(s, e) for s in starts[:5] for e in ends if e > s + 3][:15]
    assert windows
    for start, end in windows:
        window = tokens[start:end]
        for seed in range(4):
            out = transform(np.array(window + [tok.eod] * 30), sample_rng(seed, "edges", start)).tolist()
            prefix, middle, suffix, _ = split_layout(out[: out.index(tok.eod)], tok)
            # Lossless, byte for byte: no U+FFFD was ever substituted.
            assert raw_bytes(tok, prefix + middle + suffix) == raw_bytes(tok, window)
            # The partial characters at both edges are the very same token ids, in place.
            assert prefix[0] == window[0]
            assert suffix[-1] == window[-1]


def test_leading_and_doubled_eods_are_kept(tiny_tokenizer):
    eod = tiny_tokenizer.eod
    first = tiny_tokenizer.encode("print ( 'a' )\n")
    second = tiny_tokenizer.encode("x = 1 . real\n")
    sample = np.array([eod, eod, *first, eod, eod, eod, *second, eod, *([eod] * 20)])
    transform = FIMTransform(tiny_tokenizer, fim_rate=1.0)
    for index in range(20):
        out = transform(sample, sample_rng(3, "eods", index)).tolist()
        assert out[:2] == [eod, eod] and out[2] == tiny_tokenizer.fim_prefix
        parts = " ".join("E" if t == eod else "x" for t in out).split("E")
        # empty, empty, segment 1, two empty (doubled EODs), segment 2, then the trailing EODs
        assert [bool(part.strip()) for part in parts[:6]] == [False, False, True, False, False, True]


@pytest.mark.parametrize("spm", [False, True])
def test_psm_and_spm_layouts_token_by_token(tiny_tokenizer, spm):
    tok = tiny_tokenizer
    text = "def add(a, b):\n    return a + b  # sum . 's\n"
    segment = tok.encode(text)
    sample = np.array([*segment, tok.eod, *tok.encode("pass\n"), *[tok.eod] * 10])
    out = FIMTransform(tok, fim_rate=1.0, fim_spm_rate=float(spm))(sample, sample_rng(7, "layout", 11))
    rng = sample_rng(7, "layout", 11)
    rng.random()  # the transform-or-not draw
    low, high = sorted(rng.integers(0, len(text) + 1, size=2).tolist())
    rng.random()  # the SPM draw (rate 0 or 1 decides it)
    prefix, middle, suffix = (tok.encode(part) for part in (text[:low], text[low:high], text[high:]))
    if spm:
        expected = [tok.fim_prefix, tok.fim_suffix, *suffix, tok.fim_middle, *prefix, *middle]
    else:
        expected = [tok.fim_prefix, *prefix, tok.fim_suffix, *suffix, tok.fim_middle, *middle]
    expected.append(tok.eod)
    # The second document is transformed too; compare the first segment and the EOD exactly.
    assert out[: len(expected)].tolist() == expected
    assert len(out) == len(sample)


def test_padding_and_truncation_to_sample_length(tiny_tokenizer):
    tok = tiny_tokenizer
    transform = FIMTransform(tok, fim_rate=1.0)
    sample = np.array(tok.encode("abc"))
    for index in range(10):
        out = transform(sample, sample_rng(0, "truncate", index))
        assert len(out) == len(sample) and out.dtype == np.int64
        assert out[0] == tok.fim_prefix  # three sentinels make it longer: cut at the end
    # One byte per token re-encodes to far fewer tokens: the rest is <fim_pad> on the right.
    text = "self.assertEqual(result)" * 3  # no space or newline: re-encoded in full
    byte_tokens = np.array([tok.token_to_id(character) for character in text])
    for index in range(10):
        out = transform(byte_tokens, sample_rng(0, "pad", index))
        assert len(out) == len(byte_tokens)
        first_pad = int(np.flatnonzero(out == tok.fim_pad)[0])
        assert first_pad > 3 and (out[first_pad:] == tok.fim_pad).all()
        prefix, middle, suffix, _ = split_layout(out[:first_pad].tolist(), tok)
        assert raw_bytes(tok, prefix + middle + suffix) == text.encode()


def test_fast_path_matches_full_reencode_and_reference(tiny_tokenizer, corpus_stream):
    tok = tiny_tokenizer
    options = {
        "fim_rate": 0.9,
        "fim_spm_rate": 0.5,
        "fim_split_sample": "<filename>",
        "fragment_fim_rate": 0.6,
    }
    fast = FIMTransform(tok, **options)
    full = FIMTransform(tok, **options, fast=False)
    split_id = tok.token_to_id("<filename>")
    draw = np.random.default_rng(0)
    for index in range(300):
        length = int(draw.integers(2, 600))
        start = int(draw.integers(0, len(corpus_stream) - length))
        sample = corpus_stream[start : start + length].copy()
        if index % 4 == 0:  # metadata-like special tokens inside segments
            sample[draw.integers(0, length, size=2)] = [split_id, tok.token_to_id("<reponame>")]
        got = fast(sample, sample_rng(5, "identity", index))
        assert got.tolist() == full(sample, sample_rng(5, "identity", index)).tolist(), index
        expected = reference_fim(
            sample.tolist(),
            sample_rng(5, "identity", index),
            tok,
            fim_rate=0.9,
            spm_rate=0.5,
            split_id=split_id,
            fragment_rate=0.6,
        )
        assert got.tolist() == expected, index


def test_fast_path_matches_on_long_samples(tiny_tokenizer, corpus_stream, monkeypatch):
    from megatron.data import fim

    tok = tiny_tokenizer
    reused = []
    original_span = fim._Run._reusable_span

    def counting_span(self, first, last, transform):
        span = original_span(self, first, last, transform)
        reused.append(span is not None)
        return span

    monkeypatch.setattr(fim._Run, "_reusable_span", counting_span)
    fast, full = FIMTransform(tok, fim_rate=1.0), FIMTransform(tok, fim_rate=1.0, fast=False)
    for index in range(0, len(corpus_stream) - 2049, max(1, (len(corpus_stream) - 2049) // 25)):
        sample = corpus_stream[index : index + 2049]
        assert (
            fast(sample, sample_rng(1, "long", index)).tolist()
            == full(sample, sample_rng(1, "long", index)).tolist()
        )
    assert sum(reused) > 0.8 * len(reused)  # the original ids were really reused, not re-encoded


def test_rates_within_binomial_bounds(tiny_tokenizer):
    tok = tiny_tokenizer
    # Long segments: PSM with an empty prefix looks like SPM, and is rare (about 2 / 601) at 600 characters.
    segment = tok.encode("x = y . z\n" * 60)
    sample = np.array((segment + [tok.eod]) * 4 + [tok.eod] * 8)  # 4 segments per sample
    fim_rate, spm_rate, num_samples = 0.3, 0.7, 600
    dataset = FIMDataset([sample] * num_samples, tok, fim_rate=fim_rate, fim_spm_rate=spm_rate, seed=9)
    transformed = spm = trials = 0
    for index in range(num_samples):
        out = dataset[index].tolist()
        for part in " ".join(map(str, out)).split(f" {tok.eod} ")[:4]:
            ids = [int(v) for v in part.split()]
            trials += 1
            if ids and ids[0] == tok.fim_prefix:
                transformed += 1
                spm += ids[1] == tok.fim_suffix
    assert trials == 4 * num_samples

    def within(count, n, p):
        return abs(count - n * p) <= 5 * (n * p * (1 - p)) ** 0.5

    assert within(transformed, trials, fim_rate), (transformed, trials)
    assert within(spm, transformed, spm_rate), (spm, transformed)


def test_same_index_same_output_after_recreation_and_in_another_process(
    tiny_tokenizer, tiny_tokenizer_path, corpus_stream
):
    samples = [corpus_stream[i * 97 : i * 97 + 257] for i in range(16)]
    first = FIMDataset(samples, tiny_tokenizer, fim_rate=0.5, seed=1234, name="train")
    forward = [first[i].tolist() for i in range(16)]
    again = FIMDataset(samples, tiny_tokenizer, fim_rate=0.5, seed=1234, name="train")
    assert [again[i].tolist() for i in reversed(range(16))] == forward[::-1]
    other_name = FIMDataset(samples, tiny_tokenizer, fim_rate=0.5, seed=1234, name="valid")
    assert [other_name[i].tolist() for i in range(16)] != forward

    samples_file = Path(tiny_tokenizer_path).parent / "fim_samples.json"
    samples_file.write_text(json.dumps([s.tolist() for s in samples]))
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        import numpy as np
        from megatron.data.fim import FIMDataset
        from megatron.data.tokenizer import build_tokenizer
        tok = build_tokenizer("TokenizerFromFile", tokenizer_file={str(tiny_tokenizer_path)!r})
        samples = [np.array(s) for s in json.load(open({str(samples_file)!r}))]
        ds = FIMDataset(samples, tok, fim_rate=0.5, seed=1234, name="train")
        print(json.dumps([ds[i].tolist() for i in (15, 3, 0, 7, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14)]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout)
    order = (15, 3, 0, 7, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14)
    assert theirs == [forward[i] for i in order]
    assert any(tiny_tokenizer.fim_prefix in sample for sample in forward)


def test_fragment_level_fim(tiny_tokenizer):
    tok = tiny_tokenizer
    split_id = tok.token_to_id("<filename>")
    fragments = [tok.encode("a = 1 . b\n"), tok.encode("c != 'd'\n"), tok.encode("e ('s)\n")]
    segment = [split_id, *fragments[0], split_id, split_id, *fragments[1], split_id, *fragments[2]]
    sample = np.array(segment + [tok.eod] * 40)
    every = FIMTransform(tok, fim_rate=1.0, fim_split_sample="<filename>", fragment_fim_rate=1.0)
    for index in range(10):
        out = every(sample, sample_rng(0, "fragments", index)).tolist()
        body = out[: out.index(tok.eod)]
        assert body.count(split_id) == 4  # every separator kept, even between empty fragments
        assert body.count(tok.fim_prefix) == 3  # each non-empty fragment transformed on its own
        assert body[0] == split_id and body[1] == tok.fim_prefix
    never = FIMTransform(tok, fim_rate=1.0, fim_split_sample="<filename>", fragment_fim_rate=0.0)
    assert never(sample, sample_rng(0, "fragments", 0)).tolist() == sample.tolist()
    with pytest.raises(ValueError, match="<no_such_token>"):
        FIMTransform(tok, fim_rate=0.5, fim_split_sample="<no_such_token>")


def test_special_tokens_inside_segments_keep_their_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    reponame, filename = tok.token_to_id("<reponame>"), tok.token_to_id("<filename>")
    segment = [reponame, *tok.encode("org/repo"), filename, *tok.encode("a.py"), *tok.encode("\nx = 1 . y\n")]
    sample = np.array(segment + [tok.eod] * 30)
    transform = FIMTransform(tok, fim_rate=1.0)
    for index in range(30):
        out = transform(sample, sample_rng(2, "specials", index)).tolist()
        assert out.count(reponame) == 1 and out.count(filename) == 1


@pytest.fixture(scope="module")
def plain_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer with an end-of-document token but no FIM tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from megatron.data.tokenizer import build_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["def f(x):\n    return x . y\n"] * 20, trainer=trainer)
    path = tmp_path_factory.mktemp("plain") / "tokenizer.json"
    backend.save(str(path))
    return build_tokenizer("TokenizerFromFile", tokenizer_file=str(path))


def test_rate_zero_works_without_fim_tokens(plain_tokenizer):
    tok = plain_tokenizer
    assert tok.fim_prefix is None
    samples = [np.array(tok.encode("def f(x): return x") + [tok.eod] + tok.encode("pass"))]
    dataset = FIMDataset(samples, tok, fim_rate=0.0, seed=1)
    assert dataset[0].tolist() == samples[0].tolist() and dataset[0].dtype == np.int64


def test_rate_above_zero_without_fim_tokens_names_them(plain_tokenizer):
    with pytest.raises(ValueError) as error:
        FIMDataset([], plain_tokenizer, fim_rate=0.5, seed=1)
    for name in ("<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="<fim_prefix>"):
        apply_fim(np.array([1, 2]), np.random.default_rng(0), plain_tokenizer, fim_rate=0.1)


@pytest.mark.parametrize(
    "flag,options",
    [("--fim-rate", {"fim_rate": 1.5}), ("--fim-spm-rate", {"fim_rate": 0.5, "fim_spm_rate": -0.1})],
)
def test_rates_outside_unit_interval_are_rejected(tiny_tokenizer, flag, options):
    with pytest.raises(ValueError, match=flag):
        FIMTransform(tiny_tokenizer, **options)


def test_other_pre_tokenization_falls_back_to_full_reencode(tiny_tokenizer_path, tmp_path):
    """A prefix space breaks the boundary argument: pieces are then re-encoded in full, still exact."""
    from megatron.data.tokenizer import build_tokenizer

    config = json.loads(Path(tiny_tokenizer_path).read_text(encoding="utf-8"))
    config["pre_tokenizer"]["pretokenizers"][-1]["add_prefix_space"] = True
    path = tmp_path / "prefix_space.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    tok = build_tokenizer("TokenizerFromFile", tokenizer_file=str(path))
    transform = FIMTransform(tok, fim_rate=1.0)
    assert not transform.fast
    stream = stream_of(tok, TRICKY_CODE)
    for index in range(20):
        sample = stream[index * 7 : index * 7 + 90]
        expected = reference_fim(
            sample.tolist(), sample_rng(0, "fallback", index), tok, fim_rate=1.0, spm_rate=0.5
        )
        assert transform(sample, sample_rng(0, "fallback", index)).tolist() == expected
