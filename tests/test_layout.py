"""The code's shape: no import cycles among codraft/, drafters/, schedulers/, analysis/ (type-only and
function-level imports counted), no source file over 400 lines, no function over 60 lines in the
core and plug-in packages, and the core never naming a plug-in module or the analysis package."""
import ast
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("codraft", "drafters", "schedulers", "analysis")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules named by any import statement in the file, wherever it sits (module level,
    inside functions, under `if TYPE_CHECKING:`), and by `importlib.import_module("<literal>")`."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            targets = [str(node.args[0].value)]  # importlib.import_module("name"): an import by name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import codraft.x.y` names codraft.x.y (or its nearest known parent)
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    names = sorted(graph)
    index = {n: i for i, n in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    adj = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(adj, directed=True, connection="strong")
    groups: dict[int, list[str]] = {}
    for n, label in zip(names, labels):
        groups.setdefault(label, []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles (strongly connected components): {found}"


def test_core_imports_no_plugin_module_and_no_analysis():
    graph = import_graph()
    bad = {a: sorted(b for b in targets if b.split(".")[0] in ("drafters", "schedulers", "analysis")) for a, targets in graph.items() if a.split(".")[0] == "codraft"}
    assert not {a: b for a, b in bad.items() if b}


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"


def test_no_function_over_60_lines_in_core_and_plugins():
    long = []
    for name, path in modules().items():
        if name.split(".")[0] == "analysis":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"functions over 60 lines: {long}"
