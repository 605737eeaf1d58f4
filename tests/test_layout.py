"""Imports go one way: in the package no cycle, and only the CLI imports the orchestrator; tools
import tests (tests/harness.py, tests/models.py), never the other way round."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamprune"
TESTS = Path(__file__).resolve().parent


def import_graph() -> dict[str, set[str]]:
    """module -> the streamprune modules it imports (top-level and inside functions)."""
    modules = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in PACKAGE.rglob("*.py")}
    graph = {}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in modules}
        graph[name] = deps - {name}
    return graph


def test_no_import_cycle():
    graph, done, cycles = import_graph(), set(), []

    def visit(node, path):
        for dep in graph[node]:
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for node in graph:
        visit(node, [node])
    assert not cycles, cycles


def test_only_the_cli_imports_the_orchestrator():
    assert {m for m, deps in import_graph().items() if "streamprune.pipeline" in deps} == {"streamprune.cli"}


def imported_modules(tree: ast.AST) -> set[str]:
    """Every absolute module name an import statement names (top-level and inside functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_imported_modules_sees_every_form_of_import():
    tree = ast.parse("import tools\nimport os, tools.synthetic as s\ndef f():\n    from tools.fault_bench import x\n"
                     "from . import models\nfrom tests.harness import digests")
    assert imported_modules(tree) == {"tools", "os", "tools.synthetic", "tools.fault_bench", "tests.harness"}


def test_tests_never_import_tools():
    offenders = {str(f.relative_to(TESTS.parent)): sorted(m for m in imported_modules(ast.parse(f.read_text()))
                                                          if m.split(".")[0] == "tools")
                 for f in sorted(TESTS.rglob("*.py"))}
    assert not {f: m for f, m in offenders.items() if m}, "tests import tools/ (move the helper to tests/harness.py)"
