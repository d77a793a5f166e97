"""The shape of the package's imports, read from the source with `ast` (nothing is imported): no module
imports another module's private names, no import circle, and the decoder knows nothing of the GPU room.

Every import statement counts, at module level and inside functions alike: a function-level import
that closes a circle is still a circle, only deferred. `from pkg import name` is an edge to the
submodule `pkg.name` when there is one, else to `pkg`; importing a submodule also runs its parents'
`__init__`, but those implicit edges are left out (every package's `__init__` re-exports its children)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    """{dotted name: (path, is a package's __init__)} for every module under src/semiar."""
    mods = {}
    for path in sorted((SRC / "semiar").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _imports() -> list[tuple[str, str, str, int]]:
    """(importer, imported module, name taken from it or "", line) for every import of a semiar module."""
    mods = _modules()
    found = []
    for mod, (path, is_pkg) in mods.items():
        package = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(mod, a.name, "", node.lineno) for a in node.names if a.name in mods]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                src = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    if f"{src}.{a.name}" in mods:
                        found.append((mod, f"{src}.{a.name}", "", node.lineno))
                    elif src in mods:
                        found.append((mod, src, a.name, node.lineno))
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each one a circle or more."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_the_imports_it_should():
    # a check on the checker: known edges, at module level and inside a function
    edges = {(a, b) for a, b, _, _ in _imports()}
    assert ("semiar.models.cuda.graphs", "semiar.models.decoder") in edges
    assert ("semiar.models.loading", "semiar.models.cuda.graphs") in edges  # inside load_model
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    edges = {m: set() for m in _modules()}
    for a, b, _, _ in _imports():
        if a != b:
            edges[a].add(b)
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    private = [f"{a}:{line} takes {name} from {b}" for a, b, name, line in _imports()
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_the_decoder_imports_nothing_of_the_gpu_room():
    taken = [b for a, b, _, _ in _imports() if a == "semiar.models.decoder"]
    assert not [b for b in taken if b.startswith("semiar.models.cuda")], taken
