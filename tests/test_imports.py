"""The project's import graph, read from the source with ast (imports inside functions count:
they run too, and one placed in a function only hides a cycle).

Layers: the CLI layer (parsing options, building processes from them, wording results) sits on
top; capture/, apply/, verify/, conveyor/log/ and the core modules of conveyor/ never import it.
Modules never import each other in a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("conveyor", "capture", "apply", "verify")

# The CLI layer: what parses options, builds processes from them and words their results.
CLI_LAYER = ("conveyor.cli", "conveyor.commands", "conveyor.demo", "conveyor.options",
             "conveyor.wiring", "conveyor.summary", "conveyor.status_view", "conveyor.existing")


def module_name(path: Path) -> str:
    """The name a module is imported by: capture/, apply/ and verify/ install under conveyor."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "conveyor":
        parts.insert(0, "conveyor")
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def in_layer(name: str, layer: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in layer)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run: no cycle at run time)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path],
               runtime_only: bool = False) -> set[str]:
    """The project modules ``name`` imports: ``from a.b import c`` names a.b.c when that is a
    module, else a.b."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(_known_prefix(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else _known_prefix(base, modules))
    found.discard("")
    found.discard(name)
    return found


def _known_prefix(dotted: str, modules: dict[str, Path]) -> str:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return ""


def import_graph(runtime_only: bool = False) -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules, runtime_only) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert "conveyor.cli" in graph and "conveyor.capture.process" in graph and "conveyor.log" in graph
    assert "conveyor.errors" in graph["conveyor.capture.process"]
    # an import inside a function counts as well
    assert "conveyor.log" in graph["conveyor.runner"]


def test_lower_layers_never_import_the_cli_layer():
    offending = {name: sorted(m for m in deps if in_layer(m, CLI_LAYER))
                 for name, deps in import_graph().items() if not in_layer(name, CLI_LAYER)}
    offending = {name: deps for name, deps in offending.items() if deps}
    assert offending == {}


def test_no_import_cycles():
    assert cycles(import_graph(runtime_only=True)) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_wheel_installs_everything_under_conveyor(tmp_path):
    """Given the project built as a wheel, every module in it lives under conveyor/: no top-level
    capture, apply or verify that would clash with other packages of those names."""
    import subprocess
    import sys
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel, = tmp_path.glob("conveyor-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"conveyor"}
    for module in ("capture/process.py", "apply/applier.py", "verify/compare.py",
                   "schemas/event.v2.avsc"):
        assert f"conveyor/{module}" in names


MAX_MODULE_LINES = 420        # "about 400": a module of one job; cli.py is the options table
LONG_BY_DESIGN = {"conveyor/cli.py"}


def test_every_module_stays_about_one_job_long():
    """Given the source packages, no module but the CLI's options table grows past about 400
    lines (a file that does is doing several jobs: split it by what it does)."""
    long = {}
    for pkg in ("capture", "apply", "verify", "conveyor"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES and rel not in LONG_BY_DESIGN:
                long[rel] = n
    assert long == {}
