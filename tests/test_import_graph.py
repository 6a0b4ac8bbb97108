"""The `ace` package has no import cycles, counting imports hidden inside functions.

An import inside a function hides a cycle from Python at load time but not from a reader: the two
modules still depend on each other. This test reads every module of `ace` with `ast` (nothing is
imported), collects every `import` and `from ... import` statement anywhere in the file, and fails
listing each cycle it finds.

What counts as an edge, and why:
  * `import a.b.c` and `from a.b.c import name` point at `a.b.c`; `from a.b import c` points at the
    submodule `a.b.c` when it is one, else at the package `a.b`. Relative imports are resolved.
  * Python runs `a/__init__.py` and `a/b/__init__.py` before `a.b.c` itself. Those implicit
    parent edges are not drawn: with them, every package whose `__init__` re-exports its
    submodules would be a cycle. A package `__init__` importing its submodules is an edge.
  * A submodule that names its own package explicitly (`from ace.rl import policy_loss` inside
    `ace/rl/losses.py`) is an edge, so it is a cycle when that `__init__` imports the submodule:
    that is the case where a name is read from a half-initialised package.
Self-imports are ignored; anything outside `ace` is ignored.

It also checks the layering between packages that docs/architecture.md describes: `ace.core` (the
checks and registries) imports nothing of ace; the pure core (`ace.rl`, `ace.curriculum`) and
`ace.env`, `ace.models` import no other ace package but `ace.core`, `ace.rollout` only `ace.models`
besides, and only `ace.train` wires them together.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every `.py` file under `package_dir` (a package)."""
    base = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(package) - 1:
        raise ValueError(f"{module}: relative import of level {level} goes above the top-level package")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of the package (None if it is outside)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports, from every import statement in its file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                      else node.module)
            # `from pkg import sub` names the submodule when there is one, else the package.
            named = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                     for alias in node.names]
        else:
            continue
        targets.update(t for t in (_known_prefix(n, modules) for n in named) if t)
    targets.discard(module)
    return targets


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, for every module of the package."""
    modules = module_names(package_dir)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete loop through a component, a -> b -> ... -> a, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [n for n in nxt if n == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [n for n in nxt if n not in seen]
        if not fresh:  # fall back to the first revisit, which closes a loop inside the component
            loop_start = path.index(nxt[0])
            return path[loop_start:] + [nxt[0]]
        path.append(fresh[0])
        seen.add(fresh[0])


# Which other ace packages each package may import: the layering of docs/architecture.md
# ("Packages and what each owns"). `ace` is the top-level `ace/__init__.py`.
# `ace.core` (checks and registries) is the lowest layer: it imports nothing of ace, and any package
# may import it.
_CORE = {"ace.core"}
ALLOWED_PACKAGE_IMPORTS = {
    "ace": set(),
    "ace.core": set(),
    "ace.rl": _CORE,
    "ace.curriculum": _CORE,
    "ace.env": _CORE,
    "ace.models": _CORE,
    "ace.eval": _CORE,
    "ace.rollout": _CORE | {"ace.models"},
    "ace.train": _CORE | {"ace.rl", "ace.curriculum", "ace.env", "ace.models", "ace.eval", "ace.rollout"},
}


def package_of(module: str) -> str:
    """The top-level subpackage (or module) of `ace` that `module` belongs to: ace.env.gym -> ace.env."""
    return ".".join(module.split(".")[:2])


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports between ace packages that `ALLOWED_PACKAGE_IMPORTS` does not allow, as readable lines."""
    out = []
    for module in sorted(graph):
        source = package_of(module)
        if source not in ALLOWED_PACKAGE_IMPORTS:
            out.append(f"{module}: package {source} is not in ALLOWED_PACKAGE_IMPORTS (add it here and "
                       "to docs/architecture.md)")
            continue
        for target in sorted(graph[module]):
            dest = package_of(target)
            if dest != source and dest not in ALLOWED_PACKAGE_IMPORTS[source]:
                out.append(f"{module} imports {target}: {source} may import only "
                           f"{sorted(ALLOWED_PACKAGE_IMPORTS[source]) or 'nothing else of ace'}")
    return out


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return root / "pkg"


def test_ace_has_no_import_cycles():
    graph = import_graph(ROOT / "ace")
    assert len(graph) > 50, f"only {len(graph)} modules found under {ROOT / 'ace'}"
    found = cycles(graph)
    loops = ["  " + " -> ".join(cycle_path(graph, c)) for c in found]
    assert not found, "import cycles in ace (imports inside functions count):\n" + "\n".join(loops)


def test_packages_keep_their_layers():
    bad = layering_violations(import_graph(ROOT / "ace"))
    assert not bad, "imports across ace packages that break the layering:\n  " + "\n  ".join(bad)


def test_layering_catches_an_upward_import():
    graph = {"ace.rl.losses": {"ace.train.queue"}, "ace.train.queue": set(), "ace.newpkg.x": set()}
    bad = layering_violations(graph)
    assert any(line.startswith("ace.rl.losses imports ace.train.queue") for line in bad), bad
    assert any("ace.newpkg" in line for line in bad), bad


def test_known_edges_are_seen():
    """The walker sees top-level, relative-free and in-function imports of the real package."""
    graph = import_graph(ROOT / "ace")
    assert "ace.models.sharding" in graph["ace.models.qwen3"]
    assert "ace.rl.losses" in graph["ace.rl"]  # a package __init__ re-exporting its submodule
    assert "ace.env.docker_sandbox" in graph["ace.env.sandboxes"]


def test_core_is_the_bottom_layer():
    graph = {"ace.core.checks": {"ace.rl.losses"}, "ace.rl.losses": {"ace.core.checks"}}
    bad = layering_violations(graph)
    assert len(bad) == 1 and bad[0].startswith("ace.core.checks imports ace.rl.losses"), bad


def test_sibling_cycle_hidden_in_a_function_fails(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "def f():\n    from pkg.b import g\n    return g()\n",
        "pkg/b.py": "from . import a\n\ndef g():\n    return 1\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
    assert cycle_path(graph, ["pkg.a", "pkg.b"]) == ["pkg.a", "pkg.b", "pkg.a"]


def test_reexporting_init_is_not_a_cycle_but_naming_the_parent_is(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\nfrom pkg.sub import h\n",
        "pkg/a.py": "import pkg.sub.c\n\ndef f():\n    return 1\n",
        "pkg/sub/__init__.py": "from .c import h\n",
        "pkg/sub/c.py": "from .. import a as _a\n\ndef h():\n    return 2\n",
    })
    graph = import_graph(pkg)
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.c"]]
    (tmp_path / "pkg/sub/c.py").write_text("def h():\n    return 2\n")
    assert cycles(import_graph(pkg)) == []
    (tmp_path / "pkg/sub/c.py").write_text("from pkg.sub import h as _h\n")
    assert cycles(import_graph(pkg)) == [["pkg.sub", "pkg.sub.c"]]


@pytest.mark.parametrize("module,is_package,level,target,want", [
    ("pkg.a", False, 1, "b", "pkg.b"),
    ("pkg.sub", True, 1, "c", "pkg.sub.c"),
    ("pkg.sub.c", False, 2, None, "pkg"),
])
def test_relative_imports_resolve(module, is_package, level, target, want):
    assert _resolve_relative(module, is_package, level, target) == want


def test_relative_import_above_the_top_fails():
    with pytest.raises(ValueError, match="above the top-level package"):
        _resolve_relative("pkg.a", False, 3, None)
