"""The checkpoint tools as a user runs them: what they refuse (an existing output, a directory they
cannot write in) and their progress bars (shown on a terminal, silent in a pipe or with --no-progress).

A tool runs as a subprocess where a terminal or a fresh process matters, else in this process. A terminal is a pseudo-terminal from util-linux `script` with a size
set (tqdm draws nothing on a zero-width terminal). A read-only directory is a read-only tmpfs as root
(where permission bits do not bind), else a mode-0555 directory.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import TINY_VOCAB_SIZE
from tests.e2e.runs import REPO_ROOT, launch_env
from tests.helpers import load_tool, tiny_model_config

pytestmark = pytest.mark.slow


def _tool(name: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python tools/NAME.py ARGS` with stdout and stderr captured (pipes: not a terminal)."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *map(str, args)],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _on_terminal(name: str, *args, timeout: float = 180) -> str:
    """Everything `python tools/NAME.py ARGS` wrote to its (pseudo-)terminal, stdout and stderr."""
    if shutil.which("script") is None:
        pytest.skip("util-linux `script` (a pseudo-terminal) is not installed")
    command = shlex.join([sys.executable, str(REPO_ROOT / "tools" / f"{name}.py"), *map(str, args)])
    result = subprocess.run(
        ["script", "-qec", f"stty rows 40 cols 120; {command}", "/dev/null"],
        cwd=REPO_ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_path) -> Path:
    """A --save directory holding one sharded checkpoint of a tiny model (iteration 3)."""
    from megatron.checkpoint import Checkpointer
    from megatron.config import Config
    from megatron.model import GPTModel
    from megatron.parallel.state import ParallelState

    config = tiny_model_config(seq_length=32)
    model = GPTModel(config, TINY_VOCAB_SIZE + 128)
    model.init_weights(5)
    sections = {
        "model": dataclasses.asdict(config),
        "data": {"tokenizer_type": "TokenizerFromFile", "tokenizer_file": str(tiny_tokenizer_path)},
    }
    root = tmp_path_factory.mktemp("progress") / "ckpt"
    Checkpointer(ParallelState.single("cpu")).save(
        root, 3, model, None, None, None, consumed_samples=0, config=Config.from_dict(sections).to_dict()
    )
    return root


@pytest.fixture()
def read_only_dir(tmp_path):
    target = tmp_path / "read_only"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=False)


def _one_error_line(status: int, stderr: str, *parts: str) -> str:
    """The only stderr line, after checking exit status 2, no traceback and every part named."""
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert all(part in lines[0] for part in parts), lines[0]
    return lines[0]


def _leftovers(directory: Path, *keep: str) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name not in keep)


@pytest.fixture(scope="module")
def tools():
    """The tools' modules, run in this process where no terminal is needed (capsys: not a terminal)."""
    names = ("checkpoint_util", "convert_to_hf", "convert_from_hf", "convert_legacy")
    return SimpleNamespace(**{name: load_tool(name) for name in names})


def test_consolidate_refuses_an_existing_output_unless_overwrite(tools, checkpoint, tmp_path, capsys):
    output = tmp_path / "model.safetensors"
    output.write_bytes(b"an earlier export")
    status = tools.checkpoint_util.main(["consolidate", str(checkpoint), "--output", str(output)])
    _one_error_line(status, capsys.readouterr().err, f"--output {output} already exists", "--overwrite")
    assert output.read_bytes() == b"an earlier export"

    assert (
        tools.checkpoint_util.main(["consolidate", str(checkpoint), "--output", str(output), "--overwrite"])
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {output}:") and captured.err == ""  # not a terminal: no bars
    assert output.stat().st_size > 1000 and _leftovers(tmp_path) == ["model.safetensors"]


def test_read_only_output_directories_are_one_error_line(tools, checkpoint, read_only_dir, tmp_path, capsys):
    consolidate = _tool("checkpoint_util", "consolidate", checkpoint, "--output", read_only_dir / "m.pt")
    assert consolidate.stdout == ""
    _one_error_line(
        consolidate.returncode,
        consolidate.stderr,
        "checkpoint_util consolidate: error:",
        f"cannot write in {read_only_dir}",
    )
    status = tools.convert_to_hf.main(["--load", str(checkpoint), "--save", str(read_only_dir / "hf")])
    _one_error_line(
        status, capsys.readouterr().err, f"--save {read_only_dir / 'hf'}: cannot write in {read_only_dir}"
    )
    # checked before the input is read: an HF or legacy directory need not exist for the refusal
    nested = read_only_dir / "sub" / "ckpt"
    status = tools.convert_from_hf.main(["--load", str(tmp_path), "--save", str(nested)])
    _one_error_line(status, capsys.readouterr().err, f"--save {nested}: cannot write in {read_only_dir}")
    status = tools.convert_legacy.main(["--load", str(tmp_path), "--save", str(read_only_dir / "ckpt")])
    _one_error_line(status, capsys.readouterr().err, "error:", f"cannot write in {read_only_dir}")
    assert _leftovers(read_only_dir) == []
    assert _leftovers(tmp_path, "read_only") == []


def test_a_full_disk_during_consolidate_is_one_line_and_leaves_nothing(tools, checkpoint, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.decode().strip()}")
    try:
        output = target / "model.safetensors"  # the embedding alone is over 64 KB
        status = tools.checkpoint_util.main(["consolidate", str(checkpoint), "--output", str(output)])
        _one_error_line(status, capsys.readouterr().err, f"--output {output}: writing", "(ENOSPC)")
        assert _leftovers(target) == []
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_progress_bars_on_a_terminal_only(tools, checkpoint, tmp_path, tiny_tokenizer_path, capsys):
    shown = _on_terminal("checkpoint_util", "verify", checkpoint)
    assert "verifying iter_0000003: 100%" in shown and "OK " in shown
    hf = tmp_path / "hf"
    shown = _on_terminal(
        "convert_to_hf", "--load", checkpoint, "--save", hf, "--tokenizer-file", tiny_tokenizer_path
    )
    assert "verifying: 100%" in shown and "converting: 100%" in shown and f"wrote {hf}" in shown

    back = tmp_path / "back"  # not a terminal: silent
    assert tools.convert_from_hf.main(["--load", str(hf), "--save", str(back)]) == 0
    assert tools.checkpoint_util.main(["verify", str(back)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"wrote {back}" in captured.out and "OK " in captured.out


def test_merge_datasets_progress_and_no_progress(tiny_dataset_prefix, tmp_path):
    inputs = ["--input", tiny_dataset_prefix, tiny_dataset_prefix]
    shown = _on_terminal("merge_datasets", *inputs, "--output-prefix", tmp_path / "merged")
    assert "merging: 100%" in shown and "merged 2 datasets" in shown
    quiet = _on_terminal("merge_datasets", *inputs, "--output-prefix", tmp_path / "quiet", "--no-progress")
    assert "%|" not in quiet and "merged 2 datasets" in quiet
    piped = _tool("merge_datasets", *inputs, "--output-prefix", tmp_path / "piped")
    assert piped.returncode == 0 and piped.stderr == ""
