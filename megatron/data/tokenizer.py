"""Tokenizers behind one interface: a Hugging Face `tokenizer.json`, GPT-2 vocab/merges, SentencePiece.

`build_tokenizer` picks one by Megatron's `--tokenizer-type` name. Every tokenizer:
- finds its end-of-document and FIM tokens by name (FIM ids are None when absent, so plain tokenizers work),
- pads its vocabulary the way Megatron does (next multiple of divisible_by x tensor-parallel size),
- encodes literal special-token text inside a document as ordinary text, never as the special id
  (code corpora contain files that mention `<|endoftext|>`; a false end-of-document would be injected),
- decodes without any clean-up of spaces (`" ."` stays `" ."`),
- exposes `token_bytes`, the raw bytes of every token, for lossless byte-level work such as FIM.
"""

from __future__ import annotations

import abc
import functools
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# StarCoder's special tokens; the position in this tuple is the token id in StarCoder's vocabulary.
STARCODER_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)

# Names tried in order; the hyphenated spellings are SantaCoder's.
EOD_NAMES = ("<|endoftext|>",)
FIM_PREFIX_NAMES = ("<fim_prefix>", "<fim-prefix>")
FIM_MIDDLE_NAMES = ("<fim_middle>", "<fim-middle>")
FIM_SUFFIX_NAMES = ("<fim_suffix>", "<fim-suffix>")
FIM_PAD_NAMES = ("<fim_pad>", "<fim-pad>")
KNOWN_SPECIAL_TOKENS = STARCODER_SPECIAL_TOKENS + tuple(
    names[1] for names in (FIM_PREFIX_NAMES, FIM_MIDDLE_NAMES, FIM_SUFFIX_NAMES, FIM_PAD_NAMES)
)

TOKENIZER_TYPES = ("TokenizerFromFile", "GPT2BPETokenizer", "SentencePieceTokenizer")


def pad_vocab_size(
    vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int
) -> int:
    """Megatron's rule: round `vocab_size` up to a multiple of divisible_by x tensor-parallel size."""
    if make_vocab_size_divisible_by < 1:
        raise ValueError(
            f"--make-vocab-size-divisible-by must be at least 1, got {make_vocab_size_divisible_by}"
        )
    if tensor_model_parallel_size < 1:
        raise ValueError(f"--tensor-model-parallel-size must be at least 1, got {tensor_model_parallel_size}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


@functools.cache
def byte_level_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table used by byte-level BPE token strings.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD)
    are shifted, in byte order, to the characters from U+0100 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(byte): byte for byte in printable}
    shifted = (byte for byte in range(256) if byte not in table.values())
    for offset, byte in enumerate(shifted):
        table[chr(256 + offset)] = byte
    return table


def byte_level_token_to_bytes(token: str) -> bytes:
    """The raw bytes a byte-level BPE token string stands for (its UTF-8 if it is not byte-level text)."""
    table = byte_level_unicode_to_byte()
    try:
        return bytes(table[character] for character in token)
    except KeyError:
        return token.encode("utf-8")


def _as_id_list(ids) -> list[int]:
    """Accept lists, tuples, numpy arrays and torch tensors of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _find_token(token_to_id: Callable[[str], int | None], names: Sequence[str]) -> int | None:
    for name in names:
        token_id = token_to_id(name)
        if token_id is not None:
            return token_id
    return None


class Tokenizer(abc.ABC):
    """What training and data code use: ids, special tokens, vocabulary sizes and token bytes.

    Subclasses implement `token_to_id`, `encode`, `encode_batch`, `decode` and `_build_token_bytes`.
    """

    name: str

    def __init__(
        self,
        *,
        name: str,
        vocab_size: int,
        eod: int | None,
        special_token_ids: dict[str, int],
        make_vocab_size_divisible_by: int,
        tensor_model_parallel_size: int,
    ):
        if eod is None:
            raise ValueError(
                f"{name}: no end-of-document token in the vocabulary (looked for {', '.join(EOD_NAMES)}, "
                "or the eos piece of a SentencePiece model)"
            )
        self.name = name
        self.vocab_size = vocab_size
        self.padded_vocab_size = pad_vocab_size(
            vocab_size, make_vocab_size_divisible_by, tensor_model_parallel_size
        )
        self.eod = eod
        self.fim_prefix = _find_token(self.token_to_id, FIM_PREFIX_NAMES)
        self.fim_middle = _find_token(self.token_to_id, FIM_MIDDLE_NAMES)
        self.fim_suffix = _find_token(self.token_to_id, FIM_SUFFIX_NAMES)
        self.fim_pad = _find_token(self.token_to_id, FIM_PAD_NAMES)
        self.special_token_ids = dict(special_token_ids)
        for token_id in (eod, self.fim_prefix, self.fim_middle, self.fim_suffix, self.fim_pad):
            if token_id is not None:
                self.special_token_ids.setdefault(self._token_text(token_id), token_id)

    @abc.abstractmethod
    def token_to_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled `text`, or None if there is none."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; literal special-token text is encoded as ordinary text. Adds no BOS/EOS."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed in parallel where the backend can."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, without clean-up of spaces; bytes that are not valid UTF-8 become U+FFFD."""

    @abc.abstractmethod
    def _build_token_bytes(self) -> list[bytes]:
        """Raw bytes of every id in [0, vocab_size)."""

    @abc.abstractmethod
    def _token_text(self, token_id: int) -> str:
        """The vocabulary string of `token_id`."""

    @functools.cached_property
    def token_bytes(self) -> list[bytes]:
        """Raw bytes of every token id; their concatenation over `encode(text)` is `text`'s UTF-8."""
        return self._build_token_bytes()

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.padded_vocab_size):
            raise ValueError(
                f"{self.name}: token id out of range [0, {self.padded_vocab_size}): min {min(ids)}, max {max(ids)}"
            )

    def __repr__(self) -> str:
        return f"<{self.name}: vocab_size={self.vocab_size} padded={self.padded_vocab_size} eod={self.eod}>"


class _HuggingFaceTokenizer(Tokenizer):
    """Shared code for tokenizers run by the Hugging Face `tokenizers` library.

    Byte-level files (ByteLevel decoder) decode through `token_bytes`, exactly. Other files (e.g. a
    SentencePiece conversion with Metaspace/ByteFallback) decode through the file's own decoder, and
    their `token_bytes` read `<0xNN>` as a byte and `▁` as a space.
    """

    def __init__(
        self, backend, *, name: str, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int
    ):
        # Special tokens stay recognised for decoding and lookup, but text that spells them is split
        # like any other text.
        backend.encode_special_tokens = True
        self._backend = backend
        self._added_tokens = backend.get_added_tokens_decoder()
        configuration = json.loads(backend.to_str())
        self._byte_level = "ByteLevel" in json.dumps(configuration.get("decoder"))
        vocab_size = max(
            backend.get_vocab_size(with_added_tokens=True), max(self._added_tokens, default=-1) + 1
        )
        special_token_ids = {
            token.content: token_id for token_id, token in self._added_tokens.items() if token.special
        }
        super().__init__(
            name=name,
            vocab_size=vocab_size,
            eod=_find_token(self.token_to_id, EOD_NAMES),
            special_token_ids=special_token_ids,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_model_parallel_size=tensor_model_parallel_size,
        )

    def __setstate__(self, state: dict) -> None:
        # The library does not pickle `encode_special_tokens`; without this a tokenizer sent to a
        # worker process would turn literal special-token text back into special ids.
        self.__dict__.update(state)
        self._backend.encode_special_tokens = True

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer` (for engines that read its JSON or pre-tokenizer)."""
        return self._backend

    def token_to_id(self, text: str) -> int | None:
        return self._backend.token_to_id(text)

    def _token_text(self, token_id: int) -> str:
        return self._backend.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        try:
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError as error:
            raise ValueError(
                f"{self.name}: cannot encode text: {error} (not valid UTF-8, e.g. a lone surrogate)"
            ) from error

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError as error:
            raise ValueError(
                f"{self.name}: cannot encode text: {error} (not valid UTF-8, e.g. a lone surrogate)"
            ) from error
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_list(ids)
        self._check_ids(ids)
        if not self._byte_level:
            real_ids = [token_id for token_id in ids if token_id < self.vocab_size]
            return self._backend.decode(real_ids, skip_special_tokens=False)
        token_bytes = self.token_bytes
        # Ids in the padding (>= vocab_size) have no text.
        return b"".join([token_bytes[i] if i < self.vocab_size else b"" for i in ids]).decode(
            "utf-8", "replace"
        )

    def _build_token_bytes(self) -> list[bytes]:
        return [self._bytes_of(token_id) for token_id in range(self.vocab_size)]

    def _bytes_of(self, token_id: int) -> bytes:
        token = self._backend.id_to_token(token_id)
        if token is None:  # a hole in the id space
            return b""
        if token_id in self._added_tokens:  # added tokens are stored as their plain text
            return token.encode("utf-8")
        if not self._byte_level:
            return _metaspace_token_to_bytes(token)
        return byte_level_token_to_bytes(token)


_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _metaspace_token_to_bytes(token: str) -> bytes:
    """Bytes of a SentencePiece-style piece: `<0xNN>` is one byte, `▁` is a space."""
    match = _BYTE_FALLBACK_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def _check_file(path: str | None, flag: str, tokenizer_type: str) -> Path:
    if path is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not Path(path).is_file():
        raise ValueError(f"{flag} {str(path)!r} does not exist or is not a file")
    return Path(path)


class TokenizerFromFile(_HuggingFaceTokenizer):
    """A Hugging Face `tokenizers` JSON file (`--tokenizer-file`), e.g. StarCoder's tokenizer.json."""

    def __init__(
        self,
        tokenizer_file: str,
        *,
        make_vocab_size_divisible_by: int = 128,
        tensor_model_parallel_size: int = 1,
    ):
        from tokenizers import Tokenizer as Backend

        path = _check_file(tokenizer_file, "--tokenizer-file", "TokenizerFromFile")
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:
            raise ValueError(
                f"--tokenizer-file {str(path)!r} is not a valid Hugging Face tokenizers JSON file: {error}"
            ) from error
        super().__init__(
            backend,
            name=f"TokenizerFromFile({path})",
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_model_parallel_size=tensor_model_parallel_size,
        )


class GPT2BPETokenizer(_HuggingFaceTokenizer):
    """Byte-level BPE from GPT-2 style `vocab.json` + `merges.txt` (`--vocab-file`, `--merge-file`).

    Digits are split one by one exactly when the vocabulary has no token with two adjacent digits (a
    vocabulary trained that way, like StarCoder's); GPT-2's own vocabulary has many, so it is unaffected.
    """

    def __init__(
        self,
        vocab_file: str,
        merge_file: str,
        *,
        make_vocab_size_divisible_by: int = 128,
        tensor_model_parallel_size: int = 1,
    ):
        vocab_path = _check_file(vocab_file, "--vocab-file", "GPT2BPETokenizer")
        merge_path = _check_file(merge_file, "--merge-file", "GPT2BPETokenizer")
        backend = self._build_backend(vocab_path, merge_path)
        super().__init__(
            backend,
            name=f"GPT2BPETokenizer({vocab_path})",
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_model_parallel_size=tensor_model_parallel_size,
        )

    @staticmethod
    def _build_backend(vocab_path: Path, merge_path: Path):
        from tokenizers import Tokenizer as Backend
        from tokenizers import decoders, models, pre_tokenizers

        try:
            vocabulary = json.loads(vocab_path.read_text(encoding="utf-8"))
            model = models.BPE.from_file(str(vocab_path), str(merge_path))
        except Exception as error:
            raise ValueError(
                f"--vocab-file {str(vocab_path)!r} / --merge-file {str(merge_path)!r} are not a valid GPT-2 "
                f"BPE vocabulary (vocab.json) and merges (merges.txt): {error}"
            ) from error
        backend = Backend(model)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if any(re.search("[0-9]{2}", token) for token in vocabulary):
            backend.pre_tokenizer = byte_level
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level]
            )
        backend.decoder = decoders.ByteLevel()
        # Vocabulary entries that are special tokens by name become added special tokens (same ids),
        # so decoding and `special_token_ids` treat them as such.
        backend.add_special_tokens([token for token in KNOWN_SPECIAL_TOKENS if token in vocabulary])
        return backend


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (`--tokenizer-model`). End of document is the model's `</s>` (eos).

    Decoding follows sentencepiece (its normalisation and dummy-prefix rules, control tokens decode to "").
    """

    def __init__(
        self,
        tokenizer_model: str,
        *,
        make_vocab_size_divisible_by: int = 128,
        tensor_model_parallel_size: int = 1,
    ):
        path = _check_file(tokenizer_model, "--tokenizer-model", "SentencePieceTokenizer")
        try:
            import sentencepiece
        except ImportError as error:
            raise ValueError(
                "--tokenizer-type SentencePieceTokenizer needs the `sentencepiece` package (pip install sentencepiece)"
            ) from error
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as error:
            raise ValueError(
                f"--tokenizer-model {str(path)!r} is not a valid SentencePiece model: {error}"
            ) from error
        vocab_size = self._processor.get_piece_size()
        eos = self._processor.eos_id()
        eod = eos if eos >= 0 else _find_token(self.token_to_id, EOD_NAMES)
        special_token_ids = {
            self._processor.id_to_piece(i): i
            for i in range(vocab_size)
            if self._processor.is_control(i) or self._processor.is_unknown(i)
        }
        special_token_ids |= {
            name: i for name in KNOWN_SPECIAL_TOKENS if (i := self.token_to_id(name)) is not None
        }
        super().__init__(
            name=f"SentencePieceTokenizer({path})",
            vocab_size=vocab_size,
            eod=eod,
            special_token_ids=special_token_ids,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            tensor_model_parallel_size=tensor_model_parallel_size,
        )
        self._ordinary_spelling = self._spell_text_matched_specials()

    def token_to_id(self, text: str) -> int | None:
        token_id = self._processor.piece_to_id(text)
        return token_id if self._processor.id_to_piece(token_id) == text else None

    def _token_text(self, token_id: int) -> str:
        return self._processor.id_to_piece(token_id)

    def _spell_text_matched_specials(self) -> dict[int, list[int]]:
        """Ordinary ids spelling each special token that sentencepiece would match inside text.

        Control tokens (`</s>`) are never matched in text; user-defined symbols (how FIM tokens are usually
        added) are, so their ids are replaced by the ids of their characters (or bytes) after encoding.
        """
        spelled = {}
        for token_id in set(self.special_token_ids.values()):
            if self._processor.is_control(token_id) or self._processor.is_unknown(token_id):
                continue
            spelled[token_id] = [
                i for character in self._token_text(token_id) for i in self._character_ids(character)
            ]
        return spelled

    def _character_ids(self, character: str) -> list[int]:
        token_id = self.token_to_id(character)
        if token_id is not None and token_id not in self.special_token_ids.values():
            return [token_id]
        byte_ids = [self.token_to_id(f"<0x{byte:02X}>") for byte in character.encode("utf-8")]
        return byte_ids if None not in byte_ids else [self._processor.unk_id()]

    def _respell(self, ids: list[int]) -> list[int]:
        if not self._ordinary_spelling or not any(i in self._ordinary_spelling for i in ids):
            return ids
        return [j for i in ids for j in self._ordinary_spelling.get(i, (i,))]

    def encode(self, text: str) -> list[int]:
        return self._respell(self._processor.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._respell(ids) for ids in self._processor.encode(list(texts), out_type=int)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_id_list(ids)
        self._check_ids(ids)
        return self._processor.decode([i for i in ids if i < self.vocab_size])

    def _build_token_bytes(self) -> list[bytes]:
        processor = self._processor
        return [
            processor.id_to_piece(i).encode("utf-8")
            if processor.is_control(i) or processor.is_unknown(i)
            else _metaspace_token_to_bytes(processor.id_to_piece(i))
            for i in range(self.vocab_size)
        ]


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_file: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    tokenizer_model: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> Tokenizer:
    """Build the tokenizer named by Megatron's `--tokenizer-type` from the files its flags name."""
    padding = {
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "tensor_model_parallel_size": tensor_model_parallel_size,
    }
    # Checked before any file is read, so a bad flag value fails fast with its own message.
    pad_vocab_size(1, make_vocab_size_divisible_by, tensor_model_parallel_size)
    if tokenizer_type == "TokenizerFromFile":
        return TokenizerFromFile(tokenizer_file, **padding)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file, **padding)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(tokenizer_model, **padding)
    raise ValueError(
        f"--tokenizer-type {tokenizer_type!r} is not supported; choose one of {', '.join(TOKENIZER_TYPES)}"
    )
