"""Logging for every package: Python's `logging` under the "megatron" logger, with two console channels.

Each module logs through its own logger, `logger = get_logger(__name__)`, and the level of a record
picks where it goes:

- INFO (and DEBUG, when enabled): progress lines, the run's narrative (what was built, loaded, saved, the
  training line, notes and warnings about the run as a whole). Every rank computes the same ones, so
  only the main rank prints them (`set_logging`), on stdout, flushed at once so progress stays visible
  when the output is piped. A warning that every rank shares is a progress line with a "WARNING: "
  prefix: printed once, in order with the rest.
- WARNING and above: what this process met on its own (an unusable cache directory, no C compiler, an
  error that ends the run), printed by every rank, on stderr.

Lines are printed as the message alone, without level or logger name, and go to whatever `sys.stdout` /
`sys.stderr` is at the time (test capture and redirection replace them). DEBUG is off by default
(`logging.getLogger("megatron").setLevel(logging.DEBUG)` turns it on). The "megatron" logger does not
propagate to the root logger, so an application's own logging setup never prints a line twice; to send
the lines elsewhere, attach handlers to the "megatron" logger.

This module sits in the bottom layer: it imports nothing from megatron.
"""

from __future__ import annotations

import logging
import sys

ROOT_LOGGER_NAME = "megatron"
_DISABLED = logging.CRITICAL + 1  # a handler level no record reaches


class _ConsoleHandler(logging.Handler):
    """Writes each record as one line to the stream `sys.<stream_name>` names when the record arrives."""

    def __init__(self, stream_name: str) -> None:
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = getattr(sys, self.stream_name)
            stream.write(self.format(record) + "\n")  # one write: ranks sharing a pipe keep whole lines
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise into the caller
            self.handleError(record)


def _install() -> tuple[_ConsoleHandler, _ConsoleHandler]:
    """The two channels on the "megatron" logger (once per process, even if this module is reloaded)."""
    root = logging.getLogger(ROOT_LOGGER_NAME)
    found = {getattr(handler, "stream_name", None): handler for handler in root.handlers}
    if "stdout" in found and "stderr" in found:
        return found["stdout"], found["stderr"]
    progress, problems = _ConsoleHandler("stdout"), _ConsoleHandler("stderr")
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    problems.setLevel(logging.WARNING)
    root.addHandler(progress)
    root.addHandler(problems)
    root.setLevel(logging.INFO)
    root.propagate = False
    return progress, problems


_PROGRESS, _PROBLEMS = _install()


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (pass `__name__`), inside the "megatron" hierarchy."""
    if name != ROOT_LOGGER_NAME and not name.startswith(ROOT_LOGGER_NAME + "."):
        name = f"{ROOT_LOGGER_NAME}.{name}"
    return logging.getLogger(name)


def set_logging(enabled: bool) -> None:
    """Progress lines (INFO and below) on or off for this process: `megatron.pretrain` turns them on only
    on the main rank of a multi-process run. Warnings and errors are printed either way."""
    _PROGRESS.setLevel(logging.NOTSET if enabled else _DISABLED)


def progress_bar(
    iterable=None, *, total: float | None = None, desc: str = "", unit: str = "it", enabled=None
):
    """A tqdm progress bar on stderr for a tool's long step (reading a corpus, converting a checkpoint).

    enabled: True or False forces it (a tool's `--no-progress` passes False); None shows it only when
    stderr is a terminal, so logs, pipes and CI output stay free of carriage-return noise. A disabled bar
    accepts `update` / `set_postfix` as no-ops (it does not count), so callers need no second code path.
    Use it as a context manager or iterate it; it closes itself at the end of iteration."""
    from tqdm import tqdm  # tqdm is a requirement; imported here to keep `import megatron.log` light

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
    )
