"""tools/preprocess_data.py (and the corpus tools) under bad inputs and faults, through the real CLI.

Each case asserts the exit status, the one-line message and what is left in the output directory:
nothing that looks complete after a failure (no .bin/.idx, no temporary file), no process left behind.
- --workers far above the cores: capped (one line), the run takes seconds, no more workers than cores;
  the pool shuts down without tracebacks, also when a bad line stops a --strict run;
- a full disk (a real tmpfs as root, else a file-size limit): one line naming the output and the errno;
- SIGKILL of the parent: its workers exit within seconds; a worker killed mid-run: one line, status 1;
  SIGINT (Ctrl-C) or SIGTERM mid-run, and SIGINT at moments through start-up: status 130 (143) and
  one line, or a complete run;
- a 50 MB one-line document: split into pieces, under 1 GB peak RSS; --long-documents skip counts it;
- truncated or corrupt .jsonl.gz, damaged Parquet, an unsupported .zst: named, status 2;
- a read-only output directory, an existing dataset without --overwrite: refused up front, status 2;
- the corpus tools' outputs get the umask's mode, not 0600.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from megatron.data.indexed import IndexedDataset
from tests.e2e.runs import REPO_ROOT, launch_env

pytestmark = pytest.mark.slow

TOOL = str(REPO_ROOT / "tools" / "preprocess_data.py")
INTERRUPTED = "preprocess_data: interrupted; no output was written"
# A run that takes seconds (the reference tokenizer: gigatoken does 12 MB in a fraction of a second),
# so that a signal sent once both workers exist lands mid-run.
MID_RUN = ("--workers", 2, "--chunk-mb", 0.25, "--tokenizer-engine", "tokenizers")


def _argv(tokenizer_path, inputs, prefix, *extra) -> list[str]:
    argv = [sys.executable, TOOL, "--input", *map(str, inputs), "--output-prefix", str(prefix)]
    argv += ["--json-keys", "content", "--tokenizer-type", "TokenizerFromFile"]
    return [*argv, "--tokenizer-file", str(tokenizer_path), "--append-eod", *map(str, extra)]


def _run(argv, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=launch_env(), **kwargs)


def _output(result) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-2000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


def _left(directory: Path) -> list[str]:
    """Dataset files, metadata sidecars and temporaries in ``directory`` (what a failed run must not
    leave): every name there but the inputs the tests write."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("out"))


def _complete(directory: Path) -> bool:
    """A finished run's outputs: the dataset pair (and any sidecar), no temporary file."""
    names = _left(directory)
    return {"out_content_document.bin", "out_content_document.idx"} <= set(names) and not any(
        ".tmp" in name for name in names
    )


def _one_error_line(result, *fragments: str) -> str:
    """The single stderr line of a failed run, holding every fragment; no traceback anywhere."""
    assert "Traceback" not in result.stderr and "panicked" not in result.stderr, _output(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("preprocess_data:")]
    assert len(lines) == 1, _output(result)
    assert all(fragment in lines[0] for fragment in fragments), _output(result)
    return lines[0]


@pytest.fixture(scope="module")
def large_input(tmp_path_factory, demo_corpus_path) -> Path:
    """About 12 MB of JSONL (the demo corpus repeated): long enough to interrupt mid-run, and more
    output than the writer's 8 MB buffer, so a full disk fails in a write, not only at the close."""
    path = tmp_path_factory.mktemp("large_input") / "large.jsonl"
    lines = demo_corpus_path.read_bytes()
    with open(path, "wb") as stream:
        while stream.tell() < 12_000_000:
            stream.write(lines)
    return path


def _children_while_running(process: subprocess.Popen, timeout: float) -> int:
    """Poll ``process``'s descendants until it exits; the most seen at once."""
    parent, most, deadline = psutil.Process(process.pid), 0, time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            most = max(most, len(parent.children(recursive=True)))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    return most


def _wait_for_workers(process: subprocess.Popen, count: int, timeout: float = 60) -> list[psutil.Process]:
    parent, deadline = psutil.Process(process.pid), time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = parent.children(recursive=True)
        if len(children) >= count:
            return children
        assert process.poll() is None, "the run ended before its workers were seen"
        time.sleep(0.02)
    raise AssertionError(f"no {count} workers within {timeout} s")


def _gone_within(processes: list[psutil.Process], seconds: float) -> list[int]:
    """The pids still running (not zombies) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------
# Workers


def test_workers_far_above_the_cores_are_capped(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    argv = _argv(tiny_tokenizer_path, [demo_corpus_path], tmp_path / "out", "--workers", 1000)
    process = subprocess.Popen(
        [*argv, "--chunk-mb", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=launch_env()
    )
    start = time.monotonic()
    most = _children_while_running(process, timeout=120)
    stdout, stderr = (stream.decode() for stream in process.communicate(timeout=60))
    seconds = time.monotonic() - start
    assert process.returncode == 0, stderr
    assert f"--workers 1000 is more than the {cores} usable CPU cores; using at most {cores}" in stderr
    assert "Traceback" not in stderr, stderr  # the pool stopped its workers cleanly
    started = int(stdout.split("workers: ")[1].split()[0])
    assert 1 <= started <= cores and most <= cores, (started, most, cores)
    assert seconds < 60, seconds  # was: a 180 s stall at shutdown (128 workers), never done (1000)
    assert _complete(tmp_path)


def test_a_bad_line_stops_a_strict_pool_run_cleanly(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    lines = demo_corpus_path.read_text(encoding="utf-8").splitlines(keepends=True)
    source = tmp_path / "bad.jsonl"
    source.write_text("".join([*lines, "{not json\n", *lines]), encoding="utf-8")
    argv = _argv(tiny_tokenizer_path, [source], tmp_path / "out", "--workers", 2, "--chunk-mb", 0.05)
    result = _run([*argv, "--strict"], timeout=60)
    assert result.returncode == 2, _output(result)
    _one_error_line(result, f"{source}:{len(lines) + 1}: malformed JSON", "--strict")
    assert _left(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# A full disk


def _small_disk(directory: Path):
    """(preexec_fn or None, errno name, cleanup): a real 1 MB tmpfs when the tests run as root, else a
    1 MB file-size limit on the tool (EFBIG instead of ENOSPC, through the same write and abort paths)."""
    directory.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(directory)], capture_output=True
        )
        if mounted.returncode == 0:
            return None, "ENOSPC", lambda: subprocess.run(["umount", str(directory)], check=False)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    return limit_file_size, "EFBIG", lambda: None


def test_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, tiny_tokenizer_path, large_input):
    disk = tmp_path / "disk"
    preexec, errno_name, cleanup = _small_disk(disk)
    try:
        result = _run(
            _argv(tiny_tokenizer_path, [large_input], disk / "out", "--workers", 2), preexec_fn=preexec
        )
        left = _left(disk)
    finally:
        cleanup()
    assert result.returncode == 1, _output(result)
    _one_error_line(result, f"cannot write {disk / 'out_content_document.bin'}", f"({errno_name})")
    assert left == []  # was: a 20 MB .bin.tmp-PID after a double traceback


# ----------------------------------------------------------------------------------------------------------
# Signals


def test_sigkill_of_the_parent_ends_its_workers(tmp_path, tiny_tokenizer_path, large_input):
    argv = _argv(tiny_tokenizer_path, [large_input], tmp_path / "out", *MID_RUN)
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=launch_env())
    workers = _wait_for_workers(process, 2)
    process.kill()
    process.wait(timeout=10)
    assert _gone_within(workers, 10) == []  # was: alive for over a minute, ignoring SIGTERM
    assert not any(name.endswith((".bin", ".idx")) for name in _left(tmp_path))


def test_a_worker_killed_mid_run_is_one_line(tmp_path, tiny_tokenizer_path, large_input):
    argv = _argv(tiny_tokenizer_path, [large_input], tmp_path / "out", *MID_RUN)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=launch_env(), text=True
    )
    workers = _wait_for_workers(process, 2)  # the second starts with the second of 48 chunks
    for worker in workers:  # both, so that chunks are surely lost (one idle worker may die unmissed)
        worker.send_signal(signal.SIGTERM)  # workers take SIGTERM at once (no clean-up to do)
    stdout, stderr = process.communicate(timeout=30)
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    assert result.returncode == 1, _output(result)
    _one_error_line(result, "worker process", "was killed by SIGTERM", "no output was written")
    assert _left(tmp_path) == [] and _gone_within(workers, 10) == []


@pytest.mark.parametrize(
    ("signal_number", "status", "line"),
    [
        (signal.SIGINT, 130, INTERRUPTED),
        (signal.SIGTERM, 143, INTERRUPTED.replace("interrupted", "terminated")),
    ],
)
def test_ctrl_c_or_sigterm_mid_run_is_one_line(
    tmp_path, tiny_tokenizer_path, large_input, signal_number, status, line
):
    argv = _argv(tiny_tokenizer_path, [large_input], tmp_path / "out", *MID_RUN)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=launch_env(), text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a shell's foreground job
    )  # fmt: skip
    workers = _wait_for_workers(process, 2)
    process.send_signal(signal_number)
    stdout, stderr = process.communicate(timeout=20)
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    assert result.returncode == status, _output(result)
    assert _one_error_line(result) == line
    assert _left(tmp_path) == [] and _gone_within(workers, 10) == []


@pytest.mark.parametrize("delay", [0.5, 0.8, 1.1, 1.4])
def test_ctrl_c_at_any_moment_is_one_line(tmp_path, tiny_tokenizer_path, demo_corpus_path, delay):
    """Through imports, the tokenizer and engine self-check (Rust), worker start-up and the run: either
    the run completes, or it exits 130 with one line and no traceback or panic, leaving nothing."""
    argv = _argv(tiny_tokenizer_path, [demo_corpus_path], tmp_path / "out", "--workers", 2, "--chunk-mb", 0.1)
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=launch_env(), text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=20)
    result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    if result.returncode == 0:
        assert _complete(tmp_path)
        assert "Traceback" not in result.stderr, _output(result)
    else:
        assert result.returncode == 130, _output(result)
        assert _one_error_line(result) == INTERRUPTED
        assert _left(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# Long documents


def test_a_50_mb_one_line_document_is_split_in_bounded_memory(
    tmp_path, tiny_tokenizer_path, demo_corpus_path
):
    records = [json.loads(line) for line in demo_corpus_path.read_text(encoding="utf-8").splitlines()]
    text = "".join(record["content"] for record in records)
    text = (text * (50_000_000 // len(text) + 1))[:50_000_000]
    source = tmp_path / "one_line.jsonl"
    source.write_text(json.dumps({"content": text}) + "\n", encoding="utf-8")
    del text, records
    # A fresh parent whose only children are the tool: its RUSAGE_CHILDREN peak is the tool's alone.
    measure = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    argv = _argv(tiny_tokenizer_path, [source], tmp_path / "out", "--workers", 1)
    result = _run([sys.executable, "-c", measure, *argv], timeout=300)
    assert result.returncode == 0, _output(result)
    peak_bytes = int(result.stdout.strip().splitlines()[-1])
    assert peak_bytes < 1 << 30, f"peak RSS {peak_bytes / 2**20:.0f} MiB (was 7 GB)"
    assert "long documents: 1 tokenized in pieces of at most 1,048,576 bytes" in result.stdout
    dataset = IndexedDataset(tmp_path / "out_content_document")
    assert len(dataset) == 1 and int(dataset.sizes[0]) > 5_000_000  # one document, all of it


def test_long_documents_can_be_skipped_and_counted(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    records = [json.loads(line) for line in demo_corpus_path.read_text(encoding="utf-8").splitlines()]
    long_ones = sum(len(record["content"].encode("utf-8")) > 20_000 for record in records)
    assert 0 < long_ones < len(records)
    argv = _argv(tiny_tokenizer_path, [demo_corpus_path], tmp_path / "out", "--max-document-bytes", 20_000)
    result = _run([*argv, "--long-documents", "skip"])
    assert result.returncode == 0, _output(result)
    assert f"skipped lines: {long_ones} ({long_ones} longer than --max-document-bytes)" in result.stdout
    assert len(IndexedDataset(tmp_path / "out_content_document")) == len(records) - long_ones


# ----------------------------------------------------------------------------------------------------------
# Damaged and unsupported inputs


def _damaged_inputs(directory: Path, demo_corpus_path: Path) -> dict[str, tuple[Path, str]]:
    packed = gzip.compress(demo_corpus_path.read_bytes())
    cases = {
        "truncated.jsonl.gz": (
            packed[: len(packed) // 2],
            "truncated (the file ends inside the gzip stream)",
        ),
        "bad_header.jsonl.gz": (b"XXXX" + packed[4:], "not a valid gzip file"),
        "corpus.jsonl.zst": (b"(\xb5/\xfd" + packed, ".zst input is not supported; decompress it first"),
    }
    made = {}
    for name, (data, message) in cases.items():
        (directory / name).write_bytes(data)
        made[name] = (directory / name, message)
    return made


@pytest.mark.parametrize("name", ["truncated.jsonl.gz", "bad_header.jsonl.gz", "corpus.jsonl.zst"])
def test_damaged_or_unsupported_input_is_named(tmp_path, tiny_tokenizer_path, demo_corpus_path, name):
    path, message = _damaged_inputs(tmp_path, demo_corpus_path)[name]
    result = _run(_argv(tiny_tokenizer_path, [path], tmp_path / "out", "--workers", 2))
    assert result.returncode == 2, _output(result)
    _one_error_line(result, str(path), message)
    assert _left(tmp_path) == []


def test_damaged_parquet_is_named(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    records = [json.loads(line) for line in demo_corpus_path.read_text(encoding="utf-8").splitlines()]
    table = pyarrow.table({"content": [record["content"] for record in records]})
    whole = tmp_path / "whole.parquet"
    parquet.write_table(table, whole, row_group_size=10)
    data = bytearray(whole.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(64)  # a damaged page, footer intact
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(bytes(data))
    result = _run(_argv(tiny_tokenizer_path, [damaged], tmp_path / "out"))
    assert result.returncode == 2, _output(result)
    _one_error_line(result, str(damaged))
    assert _left(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# Output directory and existing outputs


def _read_only_dir(directory: Path):
    """(a read-only directory, cleanup): a read-only tmpfs as root (permissions do not bind), else 0555."""
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return "Permission denied", lambda: directory.chmod(0o755)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.decode().strip()}")
    return "Read-only file system", lambda: subprocess.run(["umount", str(directory)], check=False)


def test_a_read_only_output_directory_is_refused_up_front(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    target = tmp_path / "read_only"
    reason, cleanup = _read_only_dir(target)
    try:
        result = _run(_argv(tiny_tokenizer_path, [demo_corpus_path], target / "out", "--workers", 2))
    finally:
        cleanup()
    assert result.returncode == 2, _output(result)
    _one_error_line(result, f"--output-prefix {target / 'out'}: cannot create files in {target}", reason)
    assert "engine:" not in result.stdout  # refused before the tokenizer and the workers


def test_an_existing_dataset_is_kept_unless_overwrite(tmp_path, tiny_tokenizer_path, demo_corpus_path):
    argv = _argv(tiny_tokenizer_path, [demo_corpus_path], tmp_path / "out")
    assert _run(argv).returncode == 0
    files = [tmp_path / name for name in _left(tmp_path)]
    before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files}
    result = _run(argv)
    assert result.returncode == 2, _output(result)
    dataset = [str(path) for path in files if path.suffix in (".bin", ".idx")]
    _one_error_line(result, *dataset, "pass --overwrite")
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files} == before
    replaced = _run([*argv, "--overwrite"])
    assert replaced.returncode == 0, _output(replaced)
    assert all(path.read_bytes() == before[path][1] for path in files)  # same input, same bytes


# ----------------------------------------------------------------------------------------------------------
# File modes


def test_tool_outputs_get_the_umask_mode_not_0600(tmp_path, demo_corpus_path):
    """tempfile.mkstemp made 0600 files: a second user of a shared directory could not read them."""
    corpus, tokenizer = tmp_path / "corpus.jsonl", tmp_path / "tokenizer.json"
    tools = REPO_ROOT / "tools"
    for umask, expected in ((0o022, 0o644), (0o027, 0o640)):
        for path in (corpus, tokenizer, tmp_path / "out_content_document.bin"):
            path.unlink(missing_ok=True)
        commands = [
            [sys.executable, str(tools / "make_demo_corpus.py"), "--output", str(corpus), "--max-files", "3"],
            [
                sys.executable,
                str(tools / "train_tokenizer.py"),
                "--input",
                str(corpus),
                "--output",
                str(tokenizer),
            ]
            + ["--vocab-size", "300", "--json-key", "content", "--quiet"],
            _argv(tokenizer, [corpus], tmp_path / "out", "--overwrite", "--quiet"),
        ]
        for command in commands:
            result = _run(command, preexec_fn=lambda umask=umask: os.umask(umask))
            assert result.returncode == 0, _output(result)
        modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.iterdir()}
        assert set(modes.values()) == {expected}, (
            oct(umask),
            {name: oct(mode) for name, mode in modes.items()},
        )
    assert np.asarray(IndexedDataset(tmp_path / "out_content_document").sizes).sum() > 0
