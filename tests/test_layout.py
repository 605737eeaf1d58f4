"""Imports go one way. In the package: no cycle; each subpackage imports only the layers below it
(LAYERS); the math of pruning never touches storage; only the front (the API) imports the
orchestrator. Tools import tests (tests/harness.py, tests/models.py), never the other way round;
tests mirror the package's tree."""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streamprune"
TESTS = Path(__file__).resolve().parent


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the streamprune modules it imports (top-level and inside functions); read once."""
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


# Bottom to top; a module may import its own subpackage and the layers below it, nothing above and
# nothing beside it. Top-level modules are placed by name.
LAYERS = (
    ("errors", "signals", "version"),  # leaves: no streamprune import
    ("device", "units"),  # where a run computes (--device, the compute dtype); sizes as written and read
    ("store",),  # storage and state: shards, activation cache, journal, lock, log, texts
    ("arch",),  # the model's description: config, shapes, tensor names
    ("inputs",),  # where the inputs come from: the Hub, the calibration text as token windows
    ("pruning",),  # the pure math: forward, scores, selection, slicing, compensation, costs, allocation
    ("config",),  # the run's one config dataclass
    ("checks",),  # what refuses a run before it writes: paths, texts, sparsity, free disk
    ("planning", "output"),  # memory, disk and time predicted from headers; what a run leaves (loader, GGUF, card)
    ("engine", "printing"),  # the streaming engine and the run's steps; what the commands print
    ("api", "cli", "__main__", "__init__"),  # the front: Python API, command line
)


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, group name) of streamprune.<group>[.rest]; the package itself is the front."""
    parts = module.split(".")
    group = parts[1] if len(parts) > 1 else "__init__"
    for i, groups in enumerate(LAYERS):
        if group in groups:
            return i, group
    raise AssertionError(f"{module}: not placed in tests/test_layout.py LAYERS")


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_layers_import_downwards_only():
    wrong = []
    for module, deps in import_graph().items():
        (level, group), front = layer_of(module), len(LAYERS) - 1
        for dep in deps:
            dep_level, dep_group = layer_of(dep)
            if dep_group == group or level == front and dep_level == front:
                continue
            if dep_level >= level:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, wrong


def test_the_math_never_imports_storage_or_the_engine():
    offenders = {m: sorted(d for d in deps if d.split(".")[1] in ("store", "engine", "planning", "output"))
                 for m, deps in import_graph().items() if m.startswith("streamprune.pruning")}
    assert not {m: d for m, d in offenders.items() if d}


def test_only_the_api_imports_the_orchestrator():
    assert {m for m, deps in import_graph().items() if "streamprune.engine.pipeline" in deps} == {"streamprune.api"}


def test_tests_mirror_the_package():
    """A test file per subpackage folder sits in the same-named folder under tests/ (hostile-input
    and fault tests apart, in tests/hostile/)."""
    groups = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert groups <= folders
    for group in groups:
        modules = {f.stem for f in (PACKAGE / group).rglob("*.py")} - {"__init__"}
        tests = {f.stem.removeprefix("test_") for f in (TESTS / group).glob("test_*.py")}
        assert tests <= modules | {"scoring"} | EXTRA_TESTS.get(group, set()), (group, tests - modules)


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


# test files named for a behaviour across modules rather than for one module
EXTRA_TESTS = {"pruning": {"selection_slicing", "row_multiple", "tensor_parallel"}, "arch": {"rope_types"},
               "engine": {"shared_passes", "survey_only", "run_flow"}, "store": set(),
               "planning": set(), "output": set()}


def test_tests_never_import_tools():
    offenders = {str(f.relative_to(TESTS.parent)): sorted(m for m in imported_modules(ast.parse(f.read_text()))
                                                          if m.split(".")[0] == "tools")
                 for f in sorted(TESTS.rglob("*.py"))}
    assert not {f: m for f, m in offenders.items() if m}, "tests import tools/ (move the helper to tests/harness.py)"


def test_no_test_file_imports_another():
    """What several test files share lives in tests/harness.py, tests/models.py, tests/llamacpp.py or a
    conftest.py, not in a test file (importing one runs its module-level code and couples the two)."""
    offenders = {str(f.relative_to(TESTS)): sorted(n for n in imported_modules(ast.parse(f.read_text()))
                                                   if n.split(".")[-1].startswith("test_"))
                 for f in TESTS.rglob("test_*.py")}
    assert not {f: names for f, names in offenders.items() if names}
