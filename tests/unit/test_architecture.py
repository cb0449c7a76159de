"""The code's shape as checked facts: the package layering (import-linter, pyproject.toml), no import
circle between any two modules, and the size limits of CONTRIBUTING.md (functions up to 80 lines in
megatron/ and tools/, modules up to 600 lines in megatron/)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp  # installed with import-linter (requirements-dev.txt)
import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 600


def _sources(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _import_cycles() -> list[list[str]]:
    """Strongly connected groups (more than one module) of megatron's module import graph."""
    graph = grimp.build_graph("megatron")
    edges = {module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules}
    order, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(module: str) -> None:  # Tarjan's algorithm
        order[module] = low[module] = len(order)
        stack.append(module)
        on_stack.add(module)
        for other in edges[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(edges):
        if module not in order:
            visit(module)
    return groups


def test_no_import_cycle_between_modules():
    assert _import_cycles() == []


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    if not lint_imports.exists():
        pytest.fail(f"{lint_imports} is missing: `make setup` installs import-linter (requirements-dev.txt)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run(
        [str(lint_imports), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layer_contract_holds_and_rejects_an_upward_import(tmp_path):
    shutil.copytree(ROOT / "megatron", tmp_path / "megatron", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    # parallel/ is below training/: importing upward must break the contract
    state = tmp_path / "megatron" / "parallel" / "state.py"
    state.write_text(state.read_text() + "\nimport megatron.training.step  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "megatron.parallel.state -> megatron.training.step" in broken.stdout


def test_function_and_module_sizes():
    too_long = []
    for path in _sources("megatron", "tools"):
        source = path.read_text()
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "megatron" and source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{relative}: {source.count(chr(10))} lines (module)")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{relative}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "over the size limits (split them): " + "; ".join(too_long)
