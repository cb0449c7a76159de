"""Data, tokenizer and FIM settings (`cfg.data`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from megatron.config._fields import ConfigError, arg, require_choice, require_range, show

TOKENIZER_TYPES = ("TokenizerFromFile", "GPT2BPETokenizer", "SentencePieceTokenizer")
# Which flags each tokenizer type needs, with a word on what the file is.
TOKENIZER_FILES = {
    "TokenizerFromFile": (("tokenizer_file", "a Hugging Face tokenizers JSON file"),),
    "GPT2BPETokenizer": (("vocab_file", "a GPT-2 vocab.json"), ("merge_file", "a GPT-2 merges.txt")),
    "SentencePieceTokenizer": (("tokenizer_model", "a SentencePiece .model file"),),
}
SPLIT_FLAGS = (
    "train_weighted_split_paths_path",
    "valid_weighted_split_paths_path",
    "test_weighted_split_paths_path",
)


@dataclass
class DataConfig:
    """Where the pre-tokenized data and the tokenizer live, how they are split, and FIM."""

    data_path: list[str] | None = arg(
        None, "Dataset prefix(es) without .bin/.idx: 'PREFIX' or weighted 'W1 PREFIX1 W2 PREFIX2 ...'."
    )
    split: str = arg("969, 30, 1", "Train/valid/test proportions of --data-path, e.g. '969, 30, 1'.")
    train_weighted_split_paths_path: str | None = arg(
        None, "File listing the training blend: 'NAME: WEIGHT START:END PREFIX, ...' (BigCode format)."
    )
    valid_weighted_split_paths_path: str | None = arg(
        None, "File listing the validation groups, same format as --train-weighted-split-paths-path."
    )
    test_weighted_split_paths_path: str | None = arg(
        None, "File listing the test blend, same format as --train-weighted-split-paths-path."
    )
    data_cache_path: str | None = arg(None, "Directory for the index caches (default: next to the data).")
    tokenizer_type: str = arg("TokenizerFromFile", "Tokenizer implementation.", choices=TOKENIZER_TYPES)
    tokenizer_file: str | None = arg(None, "tokenizers JSON file (for --tokenizer-type TokenizerFromFile).")
    vocab_file: str | None = arg(None, "GPT-2 vocab.json (for --tokenizer-type GPT2BPETokenizer).")
    merge_file: str | None = arg(None, "GPT-2 merges.txt (for --tokenizer-type GPT2BPETokenizer).")
    tokenizer_model: str | None = arg(
        None, "SentencePiece model (for --tokenizer-type SentencePieceTokenizer)."
    )
    fim_rate: float = arg(0.0, "Probability of a Fill-in-the-Middle transformation per sample (0 = off).")
    fim_spm_rate: float = arg(
        0.5, "Share of FIM samples in SPM (suffix-prefix-middle) rather than PSM order."
    )
    fim_split_sample: str | None = arg(
        None, "Token text that splits a sample into fragments, each FIM-transformed on its own."
    )
    fragment_fim_rate: float = arg(0.5, "FIM probability per fragment when --fim-split-sample is given.")
    reset_position_ids: bool = arg(False, "Restart position ids after each end-of-document token.")
    reset_attention_mask: bool = arg(False, "Block attention across end-of-document tokens.")
    eod_mask_loss: bool = arg(
        False, "No loss at positions whose input token is end-of-document (Megatron's rule)."
    )
    num_workers: int = arg(2, "Data loader worker processes (0 = load in the training process).")

    @property
    def uses_weighted_split_files(self) -> bool:
        """True when the BigCode weighted-split files are used instead of --data-path."""
        return any(getattr(self, name) for name in SPLIT_FLAGS)

    def validate(self) -> None:
        """Raise ConfigError naming the offending flags (no file-system access; see check_paths)."""
        require_choice(self, "tokenizer_type", TOKENIZER_TYPES)
        for name in ("fim_rate", "fim_spm_rate", "fragment_fim_rate"):
            require_range(self, name, 0.0, 1.0)
        if self.num_workers < 0:
            raise ConfigError(f"{show('num_workers', self.num_workers)} must be >= 0")
        self._validate_split()
        weights_and_prefixes(self.data_path)
        if self.data_path and self.uses_weighted_split_files:
            raise ConfigError("give either --data-path or the --*-weighted-split-paths-path files, not both")
        if self.uses_weighted_split_files and not self.train_weighted_split_paths_path:
            given = " and ".join(
                show(name, getattr(self, name)) for name in SPLIT_FLAGS if getattr(self, name)
            )
            raise ConfigError(
                f"{given} given without --train-weighted-split-paths-path FILE: the validation and test "
                "files go with a training file; give it too"
            )

    def check_paths(self) -> None:
        """Require the data and tokenizer inputs and check that they exist (cheap stat calls only)."""
        self._check_data_exists()
        self._check_tokenizer_exists()

    def _validate_split(self) -> None:
        parts = [p for p in self.split.replace("/", ",").split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        finite = all(math.isfinite(value) for value in values)
        if not 1 <= len(values) <= 3 or not finite or min(values) < 0 or sum(values) <= 0:
            raise ConfigError(
                f"--split '{self.split}' is not valid; give up to 3 finite non-negative numbers with a positive "
                "sum, e.g. '969, 30, 1'"
            )

    def _check_data_exists(self) -> None:
        if not self.data_path and not self.uses_weighted_split_files:
            raise ConfigError(
                "no training data: give --data-path PREFIX (as written by tools/preprocess_data.py) or "
                "--train-weighted-split-paths-path FILE"
            )
        for _, prefix in weights_and_prefixes(self.data_path):
            check_prefix_exists(prefix, "--data-path")
        for name in SPLIT_FLAGS:
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{show(name, path)}: file does not exist")

    def _check_tokenizer_exists(self) -> None:
        for name, what in TOKENIZER_FILES[self.tokenizer_type]:
            path = getattr(self, name)
            if path is None:
                raise ConfigError(
                    f"--tokenizer-type {self.tokenizer_type} needs {show(name, 'FILE')} ({what})"
                )
            if not os.path.isfile(path):
                raise ConfigError(f"{show(name, path)}: file does not exist (expected {what})")


def weights_and_prefixes(data_path: list[str] | None) -> list[tuple[float, str]]:
    """Parse Megatron's --data-path forms: ['P'] or ['W1', 'P1', 'W2', 'P2', ...]."""
    if not data_path:
        return []
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ConfigError(
            f"--data-path {' '.join(data_path)}: give one PREFIX or pairs 'WEIGHT PREFIX WEIGHT PREFIX ...'"
        )
    pairs = []
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not 0 <= value < math.inf:  # also refuses nan
            raise ConfigError(
                f"--data-path: weight '{weight}' before '{prefix}' is not a non-negative number; "
                "give pairs 'WEIGHT PREFIX ...' with finite weights"
            )
        pairs.append((value, prefix))
    return pairs


def check_prefix_exists(prefix: str, flag_name: str) -> None:
    """ConfigError unless PREFIX.idx exists, with a hint when the user passed a .bin/.idx name."""
    if os.path.isfile(prefix + ".idx"):
        return
    hint = "the prefix written by tools/preprocess_data.py, without .bin/.idx"
    if prefix.endswith((".bin", ".idx")) and os.path.isfile(prefix[:-4] + ".idx"):
        hint = f"the prefix without the suffix: {prefix[:-4]}"
    raise ConfigError(f"{flag_name} {prefix}: {prefix}.idx does not exist; give {hint}")
