"""The package's imports go one way: no cycle, and only the CLI imports the orchestrator."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamprune"


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
