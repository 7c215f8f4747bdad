"""The layering of docs/architecture.md: no import circles in diffkit/, contracts kept, no upward imports."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).parents[1]


def import_cycles(graph) -> list[list[str]]:
    """Every cycle a depth-first walk of the module graph meets (empty: the graph is acyclic)."""
    colour, stack, cycles = {}, [], []

    def walk(u):
        colour[u] = 1
        stack.append(u)
        for v in sorted(graph.find_modules_directly_imported_by(u)):
            if v not in graph.modules:
                continue
            if colour.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in colour:
                walk(v)
        stack.pop()
        colour[u] = 2

    for m in sorted(graph.modules):
        if m not in colour:
            walk(m)
    return cycles


def test_no_import_cycles_in_diffkit():
    assert import_cycles(grimp.build_graph("diffkit")) == []


def test_cycle_finder_finds_a_constructed_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from . import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(grimp.build_graph("cyc")) == [["cyc.a", "cyc.b", "cyc.c", "cyc.a"]]


def test_nothing_in_diffkit_imports_the_app_benchmarks_or_tests():
    offenders = []
    for path in (ROOT / "diffkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] in ("app", "benchmarks", "tests")]
    assert offenders == []


def test_import_linter_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "lint-imports (import-linter, in the [dev] extra) is not installed"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout
