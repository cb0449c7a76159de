"""megatron.log: progress lines on stdout (main rank only), this process's warnings on stderr (every rank),
each printed as the bare message."""

from __future__ import annotations

import logging

import pytest

from megatron.log import get_logger, set_logging


@pytest.fixture
def logger():
    yield get_logger("megatron.test_log")
    set_logging(True)  # the default of every process


def test_progress_goes_to_stdout_and_warnings_to_stderr(logger, capsys):
    logger.info("> saved checkpoint 50% done")  # a % in the message is not a format directive
    logger.warning("index cache directory is not usable")
    logger.debug("off by default")
    out, err = capsys.readouterr()
    assert out == "> saved checkpoint 50% done\n"
    assert err == "index cache directory is not usable\n"


def test_other_ranks_print_warnings_only(logger, capsys):
    set_logging(False)
    logger.info("> training 10 iterations")
    logger.error("error: the ranks did not meet")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: the ranks did not meet\n"


def test_every_module_logs_under_megatron():
    assert get_logger("megatron.data.blend").name == "megatron.data.blend"
    assert get_logger("__main__").name == "megatron.__main__"
    assert not logging.getLogger("megatron").propagate  # an application's root handlers print nothing twice
