"""Layering: `jaxdec.core` stands alone (it imports nothing from the method families), and the package's
import graph (module-level and function-level imports alike) has no cycle between families' modules."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jaxdec", "pallas_kernels")


def test_core_imports_no_method_family():
    code = ("import sys, jaxdec.core, jaxdec.core.generate, jaxdec.core.token, jaxdec.core.logits; "
            "print(sorted(m for m in sys.modules if m.startswith(('jaxdec.search', 'jaxdec.speculative'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _nodes(tree, import_time: bool):
    """Every node, or (import_time) only those that run when the module is imported: not the bodies of
    functions and lambdas, nor ``if TYPE_CHECKING:`` blocks."""
    if not import_time:
        yield from ast.walk(tree)
        return
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def module_graph(root: str = ROOT, packages=PACKAGES, import_time: bool = False) -> dict:
    """module -> set of jaxdec/pallas_kernels modules it imports (anywhere in the file).

    import_time: only imports that run when the module is imported, and with Python's semantics for
    them: importing ``a.b.c`` first runs ``a/__init__`` and ``a/b/__init__``, so those packages count as
    imported too (except the importer's own enclosing packages, which are already being imported). This
    graph has a cycle exactly when some import order can meet a partly initialized module.
    """
    mods = {}
    for pkg in packages:
        for dirpath, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                    mods[rel.removesuffix(".__init__")] = os.path.join(dirpath, f)
    graph = {}
    for name, path in mods.items():
        deps = set()
        own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)} | {name}
        for node in _nodes(ast.parse(open(path).read()), import_time):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + ".") and (
                        import_time or not t.startswith(name + ".")):  # a package's __init__ runs its imports
                    deps.add(t)
                if import_time and t:  # the packages enclosing t run first
                    deps |= {p for p in (t.rsplit(".", k)[0] for k in range(1, t.count(".") + 1))
                             if p in mods and p not in own}
        graph[name] = deps
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_import_time_cycles():
    """No loop through package initialisation either (e.g. cache/quantized.py -> pallas_kernels ->
    ``import jaxdec.x`` -> jaxdec/__init__ -> ... -> cache/quantized.py): pallas_kernels reaches jaxdec
    only inside functions."""
    graph = module_graph(import_time=True)
    found = cycles(graph)
    assert not found, "import-time cycles: " + "; ".join(" <-> ".join(c) for c in found)
    for name, deps in graph.items():
        if name.startswith("pallas_kernels"):
            assert not {d for d in deps if d.startswith("jaxdec")}, (name, deps)


def test_import_time_graph_sees_package_initialisation(tmp_path):
    """A planted loop that only exists through a package's __init__ (what the plain graph misses)."""
    for rel, text in {"a/__init__.py": "from a.heavy import f\n", "a/heavy.py": "import k.user\n",
                      "a/leaf.py": "X = 1\n", "k/__init__.py": "", "k/user.py": "import k.util\n",
                      "k/util.py": "def g():\n    from a.leaf import X\n",
                      "a/fine.py": "def h():\n    import k.user\n"}.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cycles(module_graph(str(tmp_path), ("a", "k"), import_time=True)) == []
    (tmp_path / "k/util.py").write_text("from a.leaf import X\n")  # now at import time: k.util -> a/__init__
    assert cycles(module_graph(str(tmp_path), ("a", "k"), import_time=True)) == [["a", "a.heavy", "k.user", "k.util"]]
    assert cycles(module_graph(str(tmp_path), ("a", "k"))) == []  # the plain graph cannot see it


def test_kernels_package_stands_alone():
    """jaxdec.kernels (sources and build cache) imports nothing else from jaxdec, so quant can use it."""
    graph = module_graph()
    for name, deps in graph.items():
        if name.startswith("jaxdec.kernels"):
            assert all(d.startswith("jaxdec.kernels") for d in deps), (name, deps)
    assert "jaxdec.kernels.build" in graph["jaxdec.quant.native"]


def family(module: str) -> str:
    """The family a module belongs to: ``jaxdec.<sub>`` (or a top-level jaxdec module) or a top package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "jaxdec" else parts[0]


def test_no_cycles_between_families():
    """Collapsed to families (jaxdec.cache, jaxdec.attention, pallas_kernels, ...) the graph is acyclic:
    e.g. jaxdec.cache -> pallas_kernels -> jaxdec.attention is fine while jaxdec.attention does not
    import jaxdec.cache."""
    fam = {}
    for name, deps in module_graph().items():
        fam.setdefault(family(name), set()).update(family(d) for d in deps if family(d) != family(name))
    found = cycles(fam)
    assert not found, "cycles between families: " + "; ".join(" <-> ".join(c) for c in found)
    assert "jaxdec.attention" in fam["pallas_kernels"] and "pallas_kernels" in fam["jaxdec.cache"]


def test_production_packages_do_not_import_test_helpers():
    """The toy models live in jaxdec.testing; no production module imports them (or the old homes)."""
    graph = module_graph()
    assert {"jaxdec.testing.toy_search", "jaxdec.testing.toy_speculative"} <= set(graph)
    assert "jaxdec.search.toy" not in graph and "jaxdec.speculative.toy" not in graph
    users = {m for m, deps in graph.items() if not m.startswith("jaxdec.testing")
             and any(d.startswith("jaxdec.testing") for d in deps)}
    assert not users, users


def test_jaxdec_never_imports_train():
    """train/ (training scripts) imports jaxdec; jaxdec and pallas_kernels never import train, anywhere in a
    file (function bodies included)."""
    def imports_of(path):
        out = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
        return out
    users = []
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            users += [os.path.join(dirpath, f) for f in files if f.endswith(".py")
                      and "train" in imports_of(os.path.join(dirpath, f))]
    assert not users, users
    train_dir = os.path.join(ROOT, "train")
    assert "jaxdec" in imports_of(os.path.join(train_dir, "medusa.py"))  # the direction that is allowed
    planted = os.path.join(ROOT, "tests", "data", "train_layering_planted.py")
    assert "train" in imports_of(planted)  # the check sees such an import
