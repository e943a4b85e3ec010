"""The layout's rules, checked on the source: data flows downhill and private names stay home.

Layers, lowest first: ``shared`` (vocabulary every side speaks), then ``client`` and
``server`` side by side (a merchant and the operator never import each other), then
``simulations`` (the engine and the ``fedshop`` command, which drive both). Inside ``client``,
the data rooms sit below the rest: ``client.data`` reads files and ``client.sources`` makes
them, so neither may reach up into the trainer or the node. Every import counts, including
those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulations")

# module prefix -> the project prefixes it may import (its own prefix always included)
ALLOWED: dict[str, tuple[str, ...]] = {
    "shared": ("shared",),
    "client.data": ("shared", "client.data"),
    "client.sources": ("shared", "client.data", "client.sources"),
    "client": ("shared", "client"),
    "server": ("shared", "server"),
    "simulations": ("shared", "client", "server", "simulations"),
}
# Nothing in the product may import these, whatever its layer.
NEVER = ("benchmarks", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _rule_for(module: str) -> str:
    return max((prefix for prefix in ALLOWED if _within(module, prefix)), key=len)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import in the file, resolving relative ones."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def _product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _project(module: str) -> bool:
    return any(_within(module, top) for top in (*PACKAGES, *NEVER))


def layering_violations(files: list[Path]) -> list[str]:
    problems = []
    for path in files:
        module = _module_name(path)
        allowed = ALLOWED[_rule_for(module)]
        for line, imported, names in _imports(path):
            targets = [imported] + [f"{imported}.{n}" for n in names if _project(f"{imported}.{n}")]
            for target in targets:
                if not _project(target):
                    continue
                if any(_within(target, bad) for bad in NEVER) or not any(_within(target, ok) for ok in allowed):
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target} "
                                    f"(a {_rule_for(module)} module may import only {', '.join(allowed)})")
                    break
    return problems


def private_name_violations(files: list[Path]) -> list[str]:
    """``from a.b import _x`` is fine inside package ``a``'s own sub-package ``a.b``'s family only:
    the importer must live in the same package as the module that defines ``_x``."""
    problems = []
    for path in files:
        module = _module_name(path)
        home = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for line, imported, names in _imports(path):
            if not _project(imported):
                continue
            owner = imported.rpartition(".")[0]
            for name in names:
                if name.startswith("_") and not name.startswith("__") and home != owner:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {module} imports private {imported}.{name}")
    return problems


def test_every_product_module_has_a_layer() -> None:
    files = _product_files()
    assert files, "no product modules found"
    for path in files:
        assert _rule_for(_module_name(path)) in ALLOWED


def test_no_module_imports_a_layer_above_it() -> None:
    assert layering_violations(_product_files()) == []


def test_no_private_name_crosses_a_package() -> None:
    assert private_name_violations(_product_files()) == []


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("shared/x.py", "from client.trainer import train\n", "shared.x imports client.trainer"),
        ("server/x.py", "def f():\n    from client import dp\n", "server.x imports client "),
        ("client/data/x.py", "import client.merchant\n", "client.data.x imports client.merchant"),
        ("client/x.py", "from simulations.engine import run_simulation\n", "client.x imports simulations.engine"),
        ("simulations/x.py", "from tests.helpers import proc\n", "simulations.x imports tests.helpers"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str,
                                            source: str, expected: str) -> None:
    """The check itself can fail: a planted upward import is reported with its file and line."""
    fake = tmp_path / where
    fake.parent.mkdir(parents=True)
    fake.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    problems = layering_violations([fake])
    assert len(problems) == 1 and expected in problems[0], problems


def test_the_check_catches_a_private_name_from_another_package(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "simulations" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from client.merchant import _secret, public\nfrom simulations.engine import _ok\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    problems = private_name_violations([fake])
    assert len(problems) == 1 and "client.merchant._secret" in problems[0], problems
