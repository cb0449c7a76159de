"""Audit: nothing in megatron/, tools/ or bench/ unpickles arbitrary objects from a file.

Every `torch.load` passes `weights_only=True` (tensors and plain containers only; classes that must be
unpickled are allow-listed with `torch.serialization.add_safe_globals`); no `numpy.load` passes
`allow_pickle=True`; plain `pickle.load(s)` appears only in the allow-list below, with the reason. The
scan parses the source (so a call split over several lines is still seen) and fails with file:line.

torch.distributed.checkpoint reads its `.metadata` file with plain `pickle.load` inside its
`FileSystemReader`, which a source scan of our code cannot see. So every DCP read must pass a
`storage_reader` (ours unpickles with an allow-list; never DCP's default reader via `checkpoint_id=`
or a bare `FileSystemReader(...)`), and a crafted `.metadata` is refused by every reading entry point.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import pickle
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("megatron", "tools", "bench")

# (path, reason): where plain pickle is deliberate and reads nothing from disk.
PICKLE_ALLOWED = {
    "megatron/parallel/testing.py": "results sent back by the test harness's own spawned ranks",
}


@functools.cache
def _sources() -> tuple[tuple[str, ast.Module], ...]:
    """(repo-relative path, parsed module) of every scanned file, parsed once per session."""
    return tuple(
        (path.relative_to(REPO_ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8")))
        for folder in SCANNED
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
    )


def _dotted(node: ast.AST) -> str:
    """`torch.serialization.load` for that attribute chain; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, for `import x as y` and `from x import y as z`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:  # `import torch.serialization` binds `torch`
                    head = alias.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _calls(tree: ast.Module):
    """(resolved dotted name, call node) for every call, aliases resolved (`from torch import load`)."""
    imported = _imported_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, rest = name.partition(".")
            origin = imported.get(head, head)
            yield (f"{origin}.{rest}" if rest else origin), node


def _keyword_is_true(call: ast.Call, keyword: str) -> bool:
    return any(
        kw.arg == keyword and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def _findings(predicate) -> list[str]:
    return [
        f"{path}:{call.lineno}: {ast.unparse(call)[:120]}"
        for path, tree in _sources()
        for name, call in _calls(tree)
        if predicate(path, name, call)
    ]


def test_every_torch_load_passes_weights_only_true():
    def unsafe(path, name, call):
        return name in ("torch.load", "torch.serialization.load") and not _keyword_is_true(
            call, "weights_only"
        )

    bad = _findings(unsafe)
    assert not bad, "torch.load without weights_only=True (arbitrary unpickling):\n" + "\n".join(bad)


def test_no_numpy_load_allows_pickle():
    def unsafe(path, name, call):
        return name in ("numpy.load", "np.load", "numpy.lib.npyio.load") and _keyword_is_true(
            call, "allow_pickle"
        )

    bad = _findings(unsafe)
    assert not bad, "numpy.load with allow_pickle=True:\n" + "\n".join(bad)


def test_plain_pickle_only_where_allowed():
    names = {
        f"{module}.{function}" for module in ("pickle", "_pickle", "dill") for function in ("load", "loads")
    }
    names |= {"pickle.Unpickler", "pandas.read_pickle"}

    def unsafe(path, name, call):
        return name in names and path not in PICKLE_ALLOWED

    bad = _findings(unsafe)
    assert not bad, "plain unpickling outside the allow-list:\n" + "\n".join(bad)


DCP_LOADS = {
    "torch.distributed.checkpoint.load",
    "torch.distributed.checkpoint.load_state_dict",
    "torch.distributed.checkpoint.state_dict_loader.load",
    "torch.distributed.checkpoint.state_dict_loader.load_state_dict",
    "torch.distributed.checkpoint.state_dict_loader._load_state_dict",
}
DCP_DEFAULT_READERS = {
    "torch.distributed.checkpoint.FileSystemReader",
    "torch.distributed.checkpoint.filesystem.FileSystemReader",
}


def test_dcp_reads_use_an_explicit_storage_reader():
    def unsafe(path, name, call):
        if name in DCP_DEFAULT_READERS:
            return True
        return name in DCP_LOADS and not any(kw.arg == "storage_reader" for kw in call.keywords)

    bad = _findings(unsafe)
    assert not bad, "DCP read through its default reader (plain pickle.load of .metadata):\n" + "\n".join(bad)


class _Exploit:
    """Unpickling this creates `path`: what a crafted `.metadata` could do with plain pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture()
def crafted_checkpoint(tmp_path):
    """A one-process checkpoint whose `.metadata` is an exploit, with the manifest updated to match
    (so verification passes and the unpickler itself must refuse it); returns (root, marker path)."""
    from megatron.checkpoint import Checkpointer
    from megatron.config import ModelConfig
    from megatron.model import GPTModel
    from megatron.parallel.state import ParallelState

    config = ModelConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, max_position_embeddings=8
    )
    root = tmp_path / "ckpt"
    state = ParallelState.single("cpu")
    directory = Checkpointer(state).save(
        root, 1, GPTModel(config, 128), None, None, None, consumed_samples=0, config={"model": {}}
    )
    marker = tmp_path / "unpickled"
    metadata = directory / ".metadata"
    metadata.write_bytes(pickle.dumps(_Exploit(marker)))
    manifest = json.loads((directory / "manifest.json").read_text())
    data = metadata.read_bytes()
    manifest["files"][".metadata"] = {"bytes": len(data), "blake2b": hashlib.blake2b(data).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return root, marker, config


def test_crafted_dcp_metadata_is_refused_everywhere(crafted_checkpoint):
    import megatron.checkpoint as sharded
    from megatron.model import GPTModel
    from megatron.parallel.state import ParallelState

    root, marker, config = crafted_checkpoint
    directory = root / "iter_0000001"
    readers = {
        "load_full_state": lambda: sharded.load_full_state(directory),
        "iter_tensors": lambda: list(sharded.iter_tensors(directory)),
        "read_metadata": lambda: sharded.read_metadata(directory),
        "Checkpointer.load": lambda: sharded.Checkpointer(ParallelState.single("cpu")).load(
            root, GPTModel(config, 128), None, None, None
        ),
    }
    for name, read in readers.items():
        with pytest.raises(ValueError, match="not allowed"):
            read()
        assert not marker.exists(), f"{name} unpickled the crafted .metadata"


def test_the_scan_sees_what_it_must():
    # The checker itself: aliases, multi-line calls and a keyword set to False are all caught.
    source = (
        "import torch as t\nfrom torch import load\nimport numpy as np\n"
        "t.load('a')\nload('b', weights_only=False)\nt.load(\n  'c',\n  weights_only=True,\n)\n"
        "np.load('d', allow_pickle=True)\n"
    )
    tree = ast.parse(source)
    found = sorted((call.lineno, name) for name, call in _calls(tree))
    assert [line for line, name in found if name == "torch.load"] == [4, 5, 6]
    unsafe = [
        c.lineno for n, c in _calls(tree) if n == "torch.load" and not _keyword_is_true(c, "weights_only")
    ]
    assert sorted(unsafe) == [4, 5]
    assert [
        c.lineno for n, c in _calls(tree) if n == "numpy.load" and _keyword_is_true(c, "allow_pickle")
    ] == [10]
