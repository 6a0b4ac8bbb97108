"""docs/architecture.md stays true: every module, file and name it cites exists, and the code's
pointers into it land on sections (and numbered invariants) that exist.

Modules are checked by reading files, never by importing them, so the test needs no optional
dependency. A dotted name is a module (`ace.train.queue`), or a module followed by one name defined
at its top level (`ace.models.qwen3.param_shardings`); a path is a file or folder of the repository.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# Top-level folders whose paths the page may name.
PATH_ROOTS = ("ace", "experiments", "bench", "tests", "hydra_configs", "notebooks", "docs")

DOTTED = re.compile(r"(?<![\w./-])ace(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./<>-])(?:%s)/[\w./-]*\w" % "|".join(PATH_ROOTS))
# A pointer from the code: (docs/architecture.md, "Section"[, N]).
POINTER = re.compile(r'docs/architecture\.md,\s*"([^"]+)"(?:,\s*(\d+))?')


def doc_text() -> str:
    return DOC.read_text()


def module_file(name: str) -> Path | None:
    """The file of module `name` (a package's __init__.py), or None when there is no such module."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level: functions, classes, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def dotted_name_problem(name: str) -> str | None:
    """Why `name` does not resolve (None when it does): a module, or a module plus one top-level name."""
    if module_file(name):
        return None
    module, _, attr = name.rpartition(".")
    path = module_file(module)
    if path is None:
        return f"{name}: neither {name} nor {module} is a module"
    if attr not in top_level_names(path):
        return f"{name}: {path.relative_to(ROOT)} defines no top-level {attr!r}"
    return None


def headings(text: str) -> list[str]:
    return [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]


def invariant_numbers(text: str) -> set[int]:
    """The numbers of the list items under the "Invariants" heading."""
    section = text.split("\n## Invariants\n", 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^(\d+)\. ", section, flags=re.MULTILINE)}


def test_doc_names_modules_and_paths():
    text = doc_text()
    names, paths = set(DOTTED.findall(text)), set(PATH.findall(text))
    assert len(names) >= 10 and len(paths) >= 10, (sorted(names), sorted(paths))
    problems = [p for p in (dotted_name_problem(n) for n in sorted(names)) if p]
    problems += [f"{p}: no such file or folder" for p in sorted(paths) if not (ROOT / p).exists()]
    assert not problems, "docs/architecture.md cites what does not exist:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name,ok", [
    ("ace.train.queue", True),
    ("ace.rl", True),
    ("ace.models.qwen3.param_shardings", True),
    ("ace.models.sharding.param_shardings", False),
    ("ace.train.no_such_module", False),
])
def test_dotted_names_resolve_only_when_they_exist(name, ok):
    assert (dotted_name_problem(name) is None) == ok


def test_doc_has_the_sections_a_newcomer_needs():
    found = set(headings(doc_text()))
    for section in ("The loop in one picture", "Packages and what each owns", "What crosses each boundary",
                    "Invariants", "Learnability Potential", "The scale-out path"):
        assert section in found, f"docs/architecture.md has no section {section!r}; it has {sorted(found)}"


def _code_files():
    for folder in ("ace", "experiments", "bench", "hydra_configs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml", ".md"):
                yield path


def test_code_pointers_land_on_sections_that_exist():
    text = doc_text()
    found, numbers = set(headings(text)), invariant_numbers(text)
    bad = []
    for path in _code_files():
        for section, number in POINTER.findall(path.read_text()):
            where = path.relative_to(ROOT)
            if section not in found:
                bad.append(f"{where}: section {section!r} is not in docs/architecture.md")
            elif number and (section != "Invariants" or int(number) not in numbers):
                bad.append(f"{where}: {section!r} {number} does not exist (invariants: {sorted(numbers)})")
    assert not bad, "\n".join(bad)


def test_nothing_refers_to_design_md():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in _code_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bDESIGN\b", line)]
    assert not hits, f"references to the retired DESIGN.md (use docs/architecture.md): {hits}"
