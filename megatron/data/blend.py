"""Dataset blending and train/valid/test splits: ``--data-path``, ``--split`` and weighted split files.

Blending is a deterministic greedy interleave. Sample k (0-based) of the blend comes from the dataset
whose achieved count lags its target the most, the target being ``weight * (k + 1)`` (the share the
blend should hold once sample k is placed); ties go to the lowest dataset index; within the chosen
dataset the next unused sample is taken. With that target every dataset stays within one sample of
``weight * k`` at every prefix k: never a full sample ahead (a dataset is only chosen while it lags, so
it ends at most 1 - 1/n ahead), and never a full sample behind on every input the tests and the
benchmark try (random, very uneven, tied and zero weights; this side is checked, not proven here).
Megatron-LM measures the lag against ``weight * max(k, 1)`` instead, which lets a dataset fall up to
about 1.5 samples behind.

The greedy is inherently sequential, so it runs in a small C kernel (``blend_kernel.c`` beside this
module) compiled on first use with the system C compiler (cached as a shared library, like Megatron-LM's ``helpers.cpp``). The kernel keeps
only datasets whose lag is close to the maximum in an active set and the others in a timing wheel keyed
by the step at which their lag gets there, so a step costs a few operations instead of a scan of every
dataset (the result is the same as the scan's).
Without a compiler a pure-Python loop of the same rule is used (correct, much slower, with a warning).
Index arrays are int32 (dataset) and int64 (sample), so there is no limit on the number of datasets.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np

from megatron.config.data import weights_and_prefixes
from megatron.data import indexed as indexed_lib
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.gpt_indices import PROGRESS_MIN_ENTRIES, _Phases, _small_pages
from megatron.data.token_ids import StartupCheck, TokenBound
from megatron.log import get_logger

logger = get_logger(__name__)

SAMPLES_MARGIN = 1.005  # each blended dataset gets 0.5% more samples than its share, as Megatron-LM

_KERNEL_FILE = "blend_kernel.c"  # package data beside this module (setup.py ships it in the wheel)
_KERNEL_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]  # no FMA: lags must round as NumPy's do
_kernel = None
_kernel_loaded = False


def _kernel_dir() -> str:
    base = os.environ.get("MEGATRON_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron-starcoder-kernels")


def _compile_kernel(directory: str, kernel_source: str) -> str:
    """Compile the blend kernel into ``directory`` (atomically) and return the library path."""
    digest = hashlib.sha256((kernel_source + " ".join(_KERNEL_FLAGS) + sys.platform).encode()).hexdigest()
    library = os.path.join(directory, f"blend_{digest[:16]}.so")
    if os.path.isfile(library):
        return library
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source = os.path.join(work, "blend.c")
        with open(source, "w") as stream:
            stream.write(kernel_source)
        built = os.path.join(work, "blend.so")
        compiler = os.environ.get("CC", "cc")
        subprocess.run(
            [compiler, *_KERNEL_FLAGS, "-o", built, source],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, library)
    return library


def _load_kernel():
    """The compiled ``blend_greedy`` function, or None when no C compiler works here."""
    global _kernel, _kernel_loaded
    if _kernel_loaded:
        return _kernel
    _kernel_loaded = True
    # read outside the try below: a missing source file is a broken install, not a missing compiler
    kernel_source = importlib.resources.files(__package__).joinpath(_KERNEL_FILE).read_text()
    for directory in (_kernel_dir(), os.path.join(tempfile.gettempdir(), "megatron-starcoder-kernels")):
        try:
            function = ctypes.CDLL(_compile_kernel(directory, kernel_source)).blend_greedy
        except (OSError, subprocess.SubprocessError) as error:
            logger.debug("blend kernel unavailable in %s: %s", directory, error)
            continue
        function.restype = ctypes.c_int
        function.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int64,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        _kernel = function
        return _kernel
    logger.warning("no working C compiler: blending falls back to a slow pure-Python loop")
    return None


def normalize_weights(weights, *, source: str = "blend weights") -> np.ndarray:
    """Weights as float64 summing to 1 (``ValueError`` if any is negative/non-finite or all are zero)."""
    array = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(array) == 0:
        raise ValueError(f"{source}: no weights given")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"{source}: weights must be finite and non-negative, got {array.tolist()}")
    total = array.sum()
    if total <= 0:
        raise ValueError(f"{source}: weights are all zero ({array.tolist()}); at least one must be positive")
    return array / total


def _blend_python(weights: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The greedy rule as a plain loop (the fallback without a compiler)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(size, dtype=np.int32)
    sample_index = np.empty(size, dtype=np.int64)
    for k in range(size):
        best = int(np.argmax(weights * float(k + 1) - counts))  # argmax breaks ties to the lowest index
        dataset_index[k] = best
        sample_index[k] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int32, dataset_sample_index int64) of a blend of ``size`` samples.

    ``weights`` are normalised here. See the module docstring for the rule.
    """
    weights = normalize_weights(weights)
    if size < 0:
        raise ValueError(f"blend size must be non-negative, got {size}")
    kernel = _load_kernel()
    if kernel is None:
        return _blend_python(weights, size)
    weights = np.ascontiguousarray(weights)
    with _small_pages():  # the kernel writes these once, front to back
        dataset_index = np.empty(size, dtype=np.int32)
        sample_index = np.empty(size, dtype=np.int64)
    status = kernel(
        weights.ctypes.data, len(weights), size, dataset_index.ctypes.data, sample_index.ctypes.data
    )
    if status != 0:
        raise MemoryError("blend kernel ran out of memory")
    return dataset_index, sample_index


class BlendedDataset:
    """A weighted, deterministic interleave of datasets: ``ds[i]`` is a sample of one of them.

    ``dataset_index[i]`` names the dataset and ``dataset_sample_index[i]`` the sample within it.
    """

    def __init__(self, datasets: list, weights: list[float], size: int, *, name: str = "blend"):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(
                f"{name}: need one weight per dataset, got {len(datasets)} datasets, {len(weights)} weights"
            )
        self.datasets = list(datasets)
        self.name = name
        self.weights = normalize_weights(weights, source=f"{name} blend weights")
        self.size = int(size)
        phases = _Phases(f"blend {name}", self.size >= PROGRESS_MIN_ENTRIES)
        phases(f"interleaving {self.size:,} samples of {len(self.datasets)} datasets")
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
        phases("blending indices built")
        needed = np.bincount(self.dataset_index, minlength=len(datasets))
        for position, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if count > len(dataset):
                raise ValueError(
                    f"{name}: dataset {position} ({dataset!r}) has {len(dataset)} samples, the blend needs {count}"
                )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} samples of {self.name}")
        dataset = self.datasets[int(self.dataset_index[index])]
        return dataset[int(self.dataset_sample_index[index])]

    def __repr__(self) -> str:
        return f"BlendedDataset(name={self.name!r}, datasets={len(self.datasets)}, size={self.size})"


# ---------------------------------------------------------------------------------------------------
# Flags: --data-path, --split, weighted split files


def parse_data_path(data_path) -> list[tuple[float, str]]:
    """``--data-path`` as (weight, prefix) pairs: ``["P"]``, ``["W1", "P1", "W2", "P2", ...]`` or a string.

    Weights are returned as given (normalise with :func:`normalize_weights`).
    """
    if isinstance(data_path, str):
        data_path = data_path.split()
    items = [str(item) for item in (data_path or [])]
    if not items:
        raise ValueError("--data-path: no data prefix given")
    pairs = weights_and_prefixes(items)  # the same parser the config validation uses
    normalize_weights([w for w, _ in pairs], source="--data-path")
    return pairs


def parse_split(split: str) -> list[float]:
    """``--split "969, 30, 1"`` (also ``969,30,1`` or ``969/30/1``) as three fractions summing to 1."""
    parts = [part.strip() for part in re.split(r"[,/]", str(split))]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(f"--split '{split}': expected up to three numbers such as '969, 30, 1'") from None
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"--split '{split}': expected one to three non-negative numbers with a positive sum, e.g. '969, 30, 1'"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document ranges of train, valid and test (Megatron-LM's rounding; the rest goes to the last)."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_documents)))
    excess = bounds[-1] - num_documents
    bounds = [bounds[0]] + [bound - excess for bound in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


@dataclass(frozen=True)
class WeightedSplitEntry:
    """One ``NAME: WEIGHT START:END PREFIX`` entry of a weighted split file."""

    name: str
    weight: float
    start: float
    end: float
    prefix: str


_ENTRY_PATTERN = re.compile(
    r"^(?:(?P<name>[^:\s]+)\s*:\s*)?(?P<weight>\S+)\s+(?P<start>[^:\s]+):(?P<end>\S+)\s+(?P<prefix>.+)$"
)


def _parse_entry(text: str, path: str, number: int, group: str | None) -> WeightedSplitEntry:
    where = f"{path}: entry {number} '{text}'"
    match = _ENTRY_PATTERN.match(text)
    if match is None:
        raise ValueError(
            f"{where}: expected 'NAME: WEIGHT START:END PREFIX', e.g. 'python: 60.4 0:0.969 /data/py'"
        )
    name = match["name"] or group
    if name is None:
        raise ValueError(f"{where}: the first entry needs a name ('NAME: WEIGHT START:END PREFIX')")
    try:
        weight, start, end = float(match["weight"]), float(match["start"]), float(match["end"])
    except ValueError:
        raise ValueError(f"{where}: WEIGHT, START and END must be numbers") from None
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{where}: weight must be a non-negative number, got {match['weight']}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{where}: split range must satisfy 0 <= START < END <= 1, got {start}:{end}")
    return WeightedSplitEntry(name, weight, start, end, match["prefix"].strip())


def parse_weighted_split_file(path: str) -> list[WeightedSplitEntry]:
    """Entries of a BigCode weighted split file: comma-separated ``NAME: WEIGHT START:END PREFIX``.

    An entry without ``NAME:`` joins the group of the entry before it (BigCode's grouped form).
    """
    try:
        with open(path) as stream:
            text = stream.read()
    except OSError as error:
        raise ValueError(f"weighted split file {path}: cannot read it ({error.strerror})") from None
    text = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip()
    text = text.strip("\"'")
    pieces = [piece.strip() for piece in text.split(",")]
    if not text or any(not piece for piece in pieces):
        raise ValueError(
            f"weighted split file {path}: empty file or empty entry (entries are separated by ',')"
        )
    entries: list[WeightedSplitEntry] = []
    for number, piece in enumerate(pieces, start=1):
        entries.append(_parse_entry(piece, path, number, entries[-1].name if entries else None))
    normalize_weights([e.weight for e in entries], source=f"weighted split file {path}")
    return entries


def samples_per_dataset(weights: np.ndarray, num_samples: int) -> list[int]:
    """Samples to build per blended dataset: its share plus a 0.5% margin (Megatron-LM's rule)."""
    return [int(math.ceil(weight * num_samples * SAMPLES_MARGIN)) for weight in weights]


# ---------------------------------------------------------------------------------------------------
# build_datasets


@dataclass
class DatasetSplits:
    """The datasets of one run: ``train`` and ``test`` (dataset or None), ``valid`` as (name, dataset)."""

    train: object | None = None
    valid: list[tuple[str, object]] = field(default_factory=list)
    test: object | None = None


class _Builder:
    """Opens each indexed dataset once and builds GPT datasets and blends over it."""

    def __init__(self, seq_length: int, seed: int, cache_dir: str | None, token_bound: TokenBound | None):
        self.seq_length, self.seed, self.cache_dir = seq_length, seed, cache_dir
        self.token_bound = token_bound
        self.startup_check = StartupCheck(token_bound, cache_dir) if token_bound is not None else None
        self._opened: dict[str, indexed_lib.IndexedDataset] = {}

    def open(self, prefix: str, source: str):
        if prefix not in self._opened:
            if not indexed_lib.exists(indexed_lib.strip_suffix(prefix)):
                raise ValueError(
                    f"{source}: data prefix '{prefix}' does not exist (need {prefix}.bin and {prefix}.idx)"
                )
            self._opened[prefix] = indexed_lib.IndexedDataset(prefix)
            if self.startup_check is not None:
                self.startup_check.check(self._opened[prefix])
        return self._opened[prefix]

    def gpt(self, indexed, name: str, document_range: tuple[int, int], num_samples: int) -> GPTDataset:
        return GPTDataset(
            indexed,
            name=name,
            document_range=document_range,
            num_samples=num_samples,
            seq_length=self.seq_length,
            seed=self.seed,
            cache_dir=self.cache_dir,
            token_bound=self.token_bound,
        )

    def blend(self, parts: list[tuple[float, object, tuple[int, int]]], name: str, num_samples: int):
        """One dataset over ``(weight, indexed, document_range)`` parts: a GPTDataset or a blend of them."""
        parts = [part for part in parts if part[0] > 0]
        if len(parts) == 1:
            _, indexed, document_range = parts[0]
            return self.gpt(indexed, name, document_range, num_samples)
        weights = normalize_weights([weight for weight, _, _ in parts], source=f"{name} blend")
        datasets = [
            self.gpt(indexed, name, document_range, count)
            for (_, indexed, document_range), count in zip(parts, samples_per_dataset(weights, num_samples))
        ]
        return BlendedDataset(datasets, list(weights), num_samples, name=name)


def _document_range(indexed, start: float, end: float, where: str) -> tuple[int, int]:
    num_documents = len(indexed.sizes)
    document_range = (int(round(start * num_documents)), int(round(end * num_documents)))
    if document_range[0] >= document_range[1]:
        raise ValueError(f"{where}: range {start}:{end} of {num_documents} documents holds no document")
    return document_range


def _from_weighted_file(builder: _Builder, path: str, name: str, num_samples: int, grouped: bool):
    """A dataset (or, when ``grouped``, a list of (group name, dataset)) from a weighted split file."""
    entries = parse_weighted_split_file(path)
    groups: dict[str, list] = {}
    for number, entry in enumerate(entries, start=1):
        where = f"{path}: entry {number} ({entry.name})"
        indexed = builder.open(entry.prefix, where)
        document_range = _document_range(indexed, entry.start, entry.end, where)
        groups.setdefault(entry.name if grouped else name, []).append((entry.weight, indexed, document_range))
    if not grouped:
        return builder.blend(groups[name], name, num_samples)
    return [(group, builder.blend(parts, group, num_samples)) for group, parts in groups.items()]


def _from_data_path(builder: _Builder, data_path, split: str, num_samples: tuple[int, int, int]) -> list:
    """Train, valid and test datasets (or None) from ``--data-path`` and ``--split``."""
    pairs = parse_data_path(data_path)
    parse_split(split)  # report a malformed split before opening any file
    opened = [(weight, builder.open(prefix, "--data-path")) for weight, prefix in pairs]
    result = []
    for split_number, name in enumerate(("train", "valid", "test")):
        parts = []
        for weight, indexed in opened:
            document_range = split_document_ranges(split, len(indexed.sizes))[split_number]
            if document_range[1] > document_range[0]:
                parts.append((weight, indexed, document_range))
            elif weight > 0 and num_samples[split_number] > 0 and split_number > 0:
                _warn_empty_split(name, split, split_number, indexed, alone=len(opened) == 1)
        has_weight = any(weight > 0 for weight, _, _ in parts)
        result.append(
            builder.blend(parts, name, num_samples[split_number])
            if has_weight and num_samples[split_number] > 0
            else None
        )
    return result


_SPLIT_USE = {"valid": "validation", "test": "the test evaluation"}


def _warn_empty_split(name: str, split: str, split_number: int, indexed, alone: bool) -> None:
    """A split the user asked to evaluate that holds no document of a dataset: say so, once.

    Megatron-LM skips an empty split silently; its users expect a run to go on (a small test corpus is
    common), so this is a warning, not an error. A share of zero in --split is a deliberate choice
    (``--split 98,2,0``) and is not reported.
    """
    num_documents = len(indexed.sizes)
    share = parse_split(split)[split_number]
    if share == 0:
        return
    outcome = f"{_SPLIT_USE[name]} is skipped" if alone else f"it is left out of the {name} blend"
    logger.info(
        f"WARNING: the {name} split is empty: --split '{split}' gives it {share:.1%} of the "
        f"{num_documents} document(s) of {indexed.path_prefix}, which rounds to 0 documents, so "
        f"{outcome}; use more documents, a larger {name} share, or --eval-iters 0 to evaluate nothing"
    )


def build_datasets(
    *,
    data_path,
    split: str,
    train_weighted_split_paths_path: str | None,
    valid_weighted_split_paths_path: str | None,
    test_weighted_split_paths_path: str | None,
    num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_dir: str | None,
    token_bound: TokenBound | None = None,
) -> DatasetSplits:
    """Train, validation and test datasets from the data flags.

    A weighted split file, where given, defines its split (validation: one group per entry name);
    otherwise ``--data-path`` with ``--split`` does (validation group named "valid"). A split with no
    documents or zero requested samples is None (no validation group).

    With ``token_bound`` every token id is checked against the tokenizer's vocabulary: each dataset at
    open where cheap, and every sample as it is read (``TokenIdError``, see ``megatron.data.token_ids``).
    """
    builder = _Builder(seq_length, seed, cache_dir, token_bound)
    weighted_files = (
        train_weighted_split_paths_path,
        valid_weighted_split_paths_path,
        test_weighted_split_paths_path,
    )
    if not data_path and not train_weighted_split_paths_path:
        raise ValueError("no training data: give --data-path or --train-weighted-split-paths-path")
    from_path = [None, None, None]
    left_to_data_path = tuple(0 if file else count for file, count in zip(weighted_files, num_samples))
    if data_path and any(left_to_data_path):
        from_path = _from_data_path(builder, data_path, split or "969, 30, 1", left_to_data_path)
    splits = DatasetSplits(train=from_path[0], test=from_path[2])
    if from_path[1] is not None:
        splits.valid = [("valid", from_path[1])]
    if train_weighted_split_paths_path:
        splits.train = _from_weighted_file(
            builder, train_weighted_split_paths_path, "train", num_samples[0], False
        )
    if valid_weighted_split_paths_path and num_samples[1] > 0:
        splits.valid = _from_weighted_file(
            builder, valid_weighted_split_paths_path, "valid", num_samples[1], True
        )
    if test_weighted_split_paths_path and num_samples[2] > 0:
        splits.test = _from_weighted_file(
            builder, test_weighted_split_paths_path, "test", num_samples[2], False
        )
    if builder.startup_check is not None:
        builder.startup_check.report()
    return splits
