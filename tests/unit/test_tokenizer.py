"""Tokenizers: StarCoder special tokens, lossless byte-level round trips, literal special text, padding."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend

from megatron.data.tokenizer import (
    STARCODER_SPECIAL_TOKENS,
    build_tokenizer,
    byte_level_token_to_bytes,
    byte_level_unicode_to_byte,
    pad_vocab_size,
)

# Code full of the spacing that text clean-up used to destroy, plus multi-byte UTF-8 and emoji.
TRICKY_CODE = (
    "def f(a, b):\n"
    "    if a != b and x . y:\n"
    "        return 'it' 's' \" ,\" + b' !' ; x ?\n"
    '    s = "héllo wörld — ünïcode ✓ 中文 日本語 🚀😀👩‍💻"  # \U0001f600 \t tab\r\n'
    "\n\n   \n"
    "x = 1234567890 + 3.14e-10\n"
)
LITERAL_SPECIAL_TEXT = "tok = '<|endoftext|>'\nFIM = \"<fim_middle>\" + '<fim-prefix><filename>'\n"


def test_special_tokens_have_starcoder_ids_in_order(tiny_tokenizer, tiny_tokenizer_path):
    backend = Backend.from_file(str(tiny_tokenizer_path))
    for token_id, token in enumerate(STARCODER_SPECIAL_TOKENS):
        assert backend.token_to_id(token) == token_id
        assert tiny_tokenizer.token_to_id(token) == token_id
        assert tiny_tokenizer.special_token_ids[token] == token_id
    assert len(STARCODER_SPECIAL_TOKENS) == 19
    assert (tiny_tokenizer.eod, tiny_tokenizer.fim_prefix, tiny_tokenizer.fim_middle) == (0, 1, 2)
    assert (tiny_tokenizer.fim_suffix, tiny_tokenizer.fim_pad) == (3, 4)
    assert tiny_tokenizer.vocab_size == 1024
    assert "tokenizer.json" in tiny_tokenizer.name


def test_digits_are_split_one_by_one(tiny_tokenizer):
    ids = tiny_tokenizer.encode("1234567890")
    assert [tiny_tokenizer.decode([i]) for i in ids] == list("1234567890")
    # No vocabulary entry holds two digits, whatever the corpus had.
    assert not any(sum(byte in b"0123456789" for byte in token) > 1 for token in tiny_tokenizer.token_bytes)


def test_no_prefix_space_is_added(tiny_tokenizer):
    ids = tiny_tokenizer.encode("def")
    assert tiny_tokenizer.decode(ids) == "def"
    assert not tiny_tokenizer.token_bytes[ids[0]].startswith(b" ")
    assert tiny_tokenizer.encode(" def")[0] != ids[0]


@pytest.mark.parametrize("text", [TRICKY_CODE, " .", " !=", " 's", "a ,b", "😀", "é", "", "   "])
def test_round_trip_is_lossless(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert b"".join(tiny_tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")


def test_round_trip_on_demo_corpus(tiny_tokenizer, demo_corpus_path):
    documents = [json.loads(line)["content"] for line in demo_corpus_path.open(encoding="utf-8")][:10]
    batch = tiny_tokenizer.encode_batch(documents)
    assert batch == [tiny_tokenizer.encode(document) for document in documents]
    for document, ids in zip(documents, batch):
        assert tiny_tokenizer.decode(ids) == document


def test_literal_special_token_text_is_ordinary_text(tiny_tokenizer, tiny_tokenizer_path):
    special_ids = set(range(len(STARCODER_SPECIAL_TOKENS)))
    ids = tiny_tokenizer.encode(LITERAL_SPECIAL_TEXT)
    assert not special_ids & set(ids)
    assert tiny_tokenizer.decode(ids) == LITERAL_SPECIAL_TEXT
    assert tiny_tokenizer.encode_batch([LITERAL_SPECIAL_TEXT]) == [ids]
    assert tiny_tokenizer.encode("<|endoftext|>") == tiny_tokenizer.encode("<|") + tiny_tokenizer.encode(
        "endoftext|>"
    )
    # The default behaviour of the library, which this guards against, does produce the special ids.
    default_ids = Backend.from_file(str(tiny_tokenizer_path)).encode(LITERAL_SPECIAL_TEXT).ids
    assert {0, 2, 5} <= set(default_ids)


def test_decode_keeps_special_tokens_and_replaces_invalid_utf8(tiny_tokenizer):
    assert tiny_tokenizer.decode([0]) == "<|endoftext|>"
    assert tiny_tokenizer.token_bytes[2] == b"<fim_middle>"
    emoji_ids = tiny_tokenizer.encode("😀")
    assert len(emoji_ids) > 1  # a 4-byte character the tiny vocabulary has not merged
    assert tiny_tokenizer.decode(emoji_ids[:1]) == "\ufffd"
    assert tiny_tokenizer.decode(np.array(emoji_ids)) == "😀"


def test_decode_of_padding_and_out_of_range_ids(tiny_tokenizer_path):
    tokenizer = build_tokenizer(
        "TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path), tensor_model_parallel_size=3
    )
    assert tokenizer.padded_vocab_size == 1152
    assert tokenizer.decode([tokenizer.vocab_size, 1100]) == ""
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([1152])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([-1])


@pytest.mark.parametrize(
    "vocab_size, divisible_by, tensor_parallel, padded",
    [
        (1024, 128, 1, 1024),
        (1025, 128, 1, 1152),
        (50257, 128, 1, 50304),
        (50257, 128, 8, 51200),
        (49152, 128, 4, 49152),
        (1, 1, 1, 1),
    ],
)
def test_padded_vocab_follows_megatron(vocab_size, divisible_by, tensor_parallel, padded):
    assert pad_vocab_size(vocab_size, divisible_by, tensor_parallel) == padded


def test_padded_vocab_rejects_bad_flags(tiny_tokenizer_path):
    with pytest.raises(ValueError, match="--make-vocab-size-divisible-by"):
        build_tokenizer(
            "TokenizerFromFile", tokenizer_file=str(tiny_tokenizer_path), make_vocab_size_divisible_by=0
        )
    with pytest.raises(ValueError, match="--tensor-model-parallel-size"):
        pad_vocab_size(100, 128, 0)


def test_byte_level_table_is_a_bijection():
    table = byte_level_unicode_to_byte()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n") and table["a"] == ord("a")
    assert byte_level_token_to_bytes("ĠĠ") == b"  "


def write_vocab_and_merges(tokenizer_path, directory):
    """GPT-2 style vocab.json/merges.txt holding the same BPE model as a tokenizer.json."""
    model = json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(vocab_path), str(merges_path)


def test_gpt2_bpe_from_vocab_and_merges_matches_tokenizer_file(
    tiny_tokenizer, tiny_tokenizer_path, demo_corpus_path, tmp_path
):
    vocab_file, merge_file = write_vocab_and_merges(tiny_tokenizer_path, tmp_path)
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    documents = [json.loads(line)["content"] for line in demo_corpus_path.open(encoding="utf-8")][:5]
    texts = [TRICKY_CODE, LITERAL_SPECIAL_TEXT, "x  1  22", *documents]
    assert gpt2.encode_batch(texts) == tiny_tokenizer.encode_batch(texts)
    assert (gpt2.vocab_size, gpt2.padded_vocab_size, gpt2.eod, gpt2.fim_pad) == (1024, 1024, 0, 4)
    assert gpt2.special_token_ids == tiny_tokenizer.special_token_ids
    assert gpt2.token_bytes == tiny_tokenizer.token_bytes
    assert gpt2.decode(gpt2.encode(TRICKY_CODE)) == TRICKY_CODE


def test_gpt2_bpe_keeps_multi_digit_tokens_of_a_gpt2_vocabulary(tmp_path):
    alphabet = sorted(byte_level_unicode_to_byte())
    vocab = {token: i for i, token in enumerate([*alphabet, "12", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n1 2\n", encoding="utf-8")
    gpt2 = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"), merge_file=str(tmp_path / "merges.txt")
    )
    assert gpt2.encode("12") == [256]
    assert gpt2.eod == 257 and gpt2.fim_prefix is None and gpt2.fim_pad is None
    assert gpt2.encode("<|endoftext|>") != [257]


def train_sentencepiece_model(path, user_defined_symbols):
    import sentencepiece

    lines = [f"def function_{i}(value):\n    return value * {i} + offset_{i % 7}" for i in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=user_defined_symbols,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_tokenizer(tmp_path):
    fim_tokens = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
    model_path = train_sentencepiece_model(tmp_path / "sp.model", fim_tokens)
    tokenizer = build_tokenizer(
        "SentencePieceTokenizer", tokenizer_model=model_path, make_vocab_size_divisible_by=64
    )
    assert (tokenizer.vocab_size, tokenizer.padded_vocab_size) == (400, 448)
    assert tokenizer.eod == tokenizer.token_to_id("</s>")
    assert [tokenizer.fim_prefix, tokenizer.fim_middle, tokenizer.fim_suffix, tokenizer.fim_pad] == [
        tokenizer.token_to_id(token) for token in fim_tokens
    ]
    assert tokenizer.token_to_id("<not a piece>") is None
    text = "def f(x):\n    return x != 3 . 's é😀 <fim_middle> </s>"
    ids = tokenizer.encode(text)
    assert not set(tokenizer.special_token_ids.values()) & set(ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode_batch([text, "value"]) == [ids, tokenizer.encode("value")]
    # sentencepiece's dummy prefix is a leading space in the bytes; the rest is exact.
    assert b"".join(tokenizer.token_bytes[i] for i in ids) == b" " + text.encode("utf-8")


def test_sentencepiece_without_fim_tokens(tmp_path):
    model_path = train_sentencepiece_model(tmp_path / "plain.model", [])
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model_path)
    assert tokenizer.fim_prefix is None and tokenizer.fim_pad is None
    assert tokenizer.padded_vocab_size == 512


def test_transformers_loads_the_trained_file(tiny_tokenizer, tiny_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_path))
    ids = hf_tokenizer.encode(TRICKY_CODE, add_special_tokens=False)
    assert ids == tiny_tokenizer.encode(TRICKY_CODE)
    assert hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False) == TRICKY_CODE
    assert hf_tokenizer.convert_tokens_to_ids("<fim_middle>") == 2
    assert len(hf_tokenizer) == 1024


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokenizer_type": "TokenizerFromFile"}, "needs --tokenizer-file"),
        (
            {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": "/nonexistent/t.json"},
            "/nonexistent/t.json",
        ),
        ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": "/nonexistent/v.json"}, "/nonexistent/v.json"),
        ({"tokenizer_type": "SentencePieceTokenizer"}, "needs --tokenizer-model"),
        (
            {"tokenizer_type": "BertWordPieceLowerCase"},
            "TokenizerFromFile, GPT2BPETokenizer, SentencePieceTokenizer",
        ),
    ],
)
def test_missing_files_and_flags(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer(kwargs.pop("tokenizer_type"), **kwargs)


def test_gpt2_needs_merge_file(tiny_tokenizer_path, tmp_path):
    vocab_file, _ = write_vocab_and_merges(tiny_tokenizer_path, tmp_path)
    with pytest.raises(ValueError, match="needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file)


def test_invalid_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": ', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json.*not a valid Hugging Face tokenizers JSON"):
        build_tokenizer("TokenizerFromFile", tokenizer_file=str(broken))
    with pytest.raises(ValueError, match="broken.json.*not a valid GPT-2"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(broken), merge_file=str(broken))
    with pytest.raises(ValueError, match="broken.json.*not a valid SentencePiece"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(broken))


def test_vocabulary_without_end_of_document_token(tmp_path):
    vocab = {token: i for i, token in enumerate(sorted(byte_level_unicode_to_byte()))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.json\): no end-of-document token"):
        build_tokenizer(
            "GPT2BPETokenizer",
            vocab_file=str(tmp_path / "vocab.json"),
            merge_file=str(tmp_path / "merges.txt"),
        )


def test_lone_surrogate_is_a_value_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny_tokenizer.encode("a\ud800b")
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny_tokenizer.encode_batch(["ok", "a\ud800b"])


def test_pickled_tokenizer_still_encodes_special_text_as_ordinary_text(tiny_tokenizer):
    # Worker processes receive the tokenizer pickled; the library drops `encode_special_tokens` then.
    copy = pickle.loads(pickle.dumps(tiny_tokenizer))
    assert copy.encode(LITERAL_SPECIAL_TEXT) == tiny_tokenizer.encode(LITERAL_SPECIAL_TEXT)
    assert copy.encode_batch([LITERAL_SPECIAL_TEXT]) == [tiny_tokenizer.encode(LITERAL_SPECIAL_TEXT)]
    assert copy.token_bytes == tiny_tokenizer.token_bytes and copy.padded_vocab_size == 1024


def test_non_byte_level_tokenizer_file(tmp_path):
    """A SentencePiece-style tokenizer.json (Metaspace + byte fallback) decodes through its own decoder."""
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<fim_prefix>": 1, "\u2581": 2, "a": 3, "b": 4, "\u2581a": 5}
    vocab |= {f"<0x{byte:02X}>": 6 + byte for byte in range(256)}
    backend = Backend(models.BPE(vocab=vocab, merges=[("\u2581", "a")], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(["<|endoftext|>", "<fim_prefix>"])
    backend.save(str(tmp_path / "metaspace.json"))
    tokenizer = build_tokenizer("TokenizerFromFile", tokenizer_file=str(tmp_path / "metaspace.json"))
    assert (tokenizer.eod, tokenizer.fim_prefix, tokenizer.fim_middle) == (0, 1, None)
    text = "a ab é <fim_prefix> ba"
    ids = tokenizer.encode(text)
    assert 1 not in ids and 5 in ids
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes[i] for i in ids) == text.encode("utf-8")
