"""The child side of the sandbox: run one program under limits and report how it ended.

    python -I sandbox_runner.py PROGRAM RESULT_FD MEMORY_BYTES CPU_SECONDS FILE_BYTES OUTPUT_CHARS

Started by `megatron.evaluation.sandbox` in a fresh temporary directory (its cwd, HOME and TMPDIR).
Standard library only, and nothing of the package is imported: the program sees a bare interpreter.

In order: resource limits (address space, CPU seconds, file size, processes, no core files); the program
is compiled (a SyntaxError is the `syntax` kind); an audit hook (`sys.addaudithook`, which Python code
cannot remove) refuses process creation (fork, exec, spawn, subprocess, os.system), signals to other
processes, ctypes and sockets, file writes, deletions, renames and permission changes outside the
temporary directory, and file reads outside it and the Python installation; stdout and stderr keep
only their first OUTPUT_CHARS characters. Then the program runs and one JSON line goes to RESULT_FD:
{"kind": passed | failed | error | memory, "error": exception type, "message": ...}.

This is a guard against accidents of generated code, not a security boundary: code that reaches the
interpreter's internals or native code by other routes is not stopped (docs/evaluation.md).
"""

import io
import json
import os
import resource
import sys

_PROCESS_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.startfile",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.setuid",
}  # fmt: skip
_PATH_CHANGE_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
    "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
    "shutil.copytree", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
}  # fmt: skip
_BLOCKED_PREFIXES = ("ctypes.", "socket.", "_ctypes.", "webbrowser.", "urllib.", "ftplib.", "http.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _limit(kind: int, value: int) -> None:
    """Soft and hard limit `value`, or the existing hard limit when that is lower."""
    hard = resource.getrlimit(kind)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))


def set_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    _limit(resource.RLIMIT_AS, memory_bytes)
    _limit(resource.RLIMIT_CPU, cpu_seconds)
    _limit(resource.RLIMIT_FSIZE, file_bytes)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)  # not enforced for root: the audit hook refuses fork too


class _Guard:
    """The audit hook: PermissionError for what the module docstring lists."""

    def __init__(self, sandbox_dir: str) -> None:
        self.writable = os.path.realpath(sandbox_dir)
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        self.readable = [self.writable, *(os.path.realpath(p) for p in prefixes)]
        self.readable_files = {"/dev/null", "/dev/urandom", "/dev/random"}

    def _inside(self, path, roots) -> bool:
        if isinstance(path, int):  # an already open descriptor
            return True
        resolved = os.path.realpath(os.fsdecode(path))
        if resolved in self.readable_files:
            return True
        return any(resolved == root or resolved.startswith(root + os.sep) for root in roots)

    def __call__(self, event: str, args) -> None:
        if event in _PROCESS_EVENTS or event.startswith(_BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in _PATH_CHANGE_EVENTS:
            paths = [arg for arg in args[:2] if isinstance(arg, (str, bytes, os.PathLike))]
            if not all(self._inside(path, [self.writable]) for path in paths):
                raise PermissionError(f"sandbox: {event} outside the sandbox directory: {paths}")
        elif event == "open" and args[0] is not None:
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
            roots = [self.writable] if writes else self.readable
            if not self._inside(path, roots):
                what = "writing" if writes else "reading"
                raise PermissionError(f"sandbox: {what} {path!r} outside the sandbox is not allowed")


class _CappedText(io.TextIOBase):
    """A text stream that keeps its first `limit` characters and counts (drops) the rest."""

    def __init__(self, limit: int) -> None:
        self.limit, self.kept, self.dropped = limit, [], 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        room = self.limit - self.size
        if room > 0:
            self.kept.append(text[:room])
            self.size += min(room, len(text))
        self.dropped += max(0, len(text) - max(room, 0))
        return len(text)


def _outcome(error: BaseException | None) -> dict:
    if error is None:
        return {"kind": "passed"}
    kind = "failed" if isinstance(error, AssertionError) else "error"
    if isinstance(error, MemoryError):
        kind = "memory"
    message = str(error)[:500]
    return {"kind": kind, "error": type(error).__name__, "message": message}


def main(argv: list[str]) -> None:
    program_path, result_fd = argv[0], int(argv[1])
    memory_bytes, cpu_seconds, file_bytes, output_chars = (int(value) for value in argv[2:6])
    with open(program_path, encoding="utf-8") as file:
        source = file.read()
    set_limits(memory_bytes, cpu_seconds, file_bytes)
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as error:
        result = {"kind": "syntax", "error": type(error).__name__, "message": str(error)[:500]}
    else:
        output = _CappedText(output_chars)
        sys.stdout = sys.stderr = output
        sys.stdin = io.StringIO("")
        sys.addaudithook(_Guard(os.getcwd()))
        try:
            exec(code, {"__name__": "__sandbox__", "__builtins__": __builtins__})
            error = None
        except BaseException as caught:  # noqa: BLE001 - every way the program ends is reported
            error = caught
        result = _outcome(error)
        result["output"] = "".join(output.kept)
        result["output_dropped_chars"] = output.dropped
    os.write(result_fd, (json.dumps(result) + "\n").encode("utf-8"))
    os._exit(0)  # no atexit handlers or threads of the program run after the verdict


if __name__ == "__main__":
    main(sys.argv[1:])
