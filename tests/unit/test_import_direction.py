"""The house is one-way: which package may import which (docs/architecture.md, "Imports").

    common   <- everything      (imports nothing of kmd)
    sources  -> common          (never the daemon, never the model side)
    editors  -> common          (never the daemon, never the sources)
    daemon   -> sources, editors, common

Every `import` statement counts: at module level, inside functions (the lazy imports the
CLI uses) and under TYPE_CHECKING. Inside the daemon, the HTTP surfaces (api, openai_api,
console) see the service only through `kmd.daemon.surface`, never `kmd.daemon.service`.

Import cycles (`import_cycles`): a module that imports another which imports it back, at
any depth and in any of those places, is one piece split in two. None may remain among the
HTTP surfaces and the service; those elsewhere are reported by `test_report_import_cycles`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED = {
    "common": {"common"},
    "sources": {"sources", "common"},
    "editors": {"editors", "common"},
    "daemon": {"daemon", "sources", "editors", "common", "policies"},
}
SURFACES = ("daemon/api.py", "daemon/auth.py", "daemon/web.py", "daemon/routes/", "daemon/openai_api/", "daemon/console/")


def _kmd_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import of a `kmd.*` module in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("kmd.")]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write kmd.<package>... instead"
            if node.module and node.module.startswith("kmd."):
                found.append((node.lineno, node.module))
                found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "kmd"]
    return found


def _files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(package):
    assert _files(package), f"no Python files under {package}/"
    wrong = []
    for path in _files(package):
        for line, module in _kmd_imports(path):
            target = module.split(".")[1]
            if target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}:\n  " + "\n  ".join(wrong)


def test_http_surfaces_depend_on_the_service_interface_only():
    wrong = []
    for path in _files("daemon"):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith(SURFACES):
            continue
        for line, module in _kmd_imports(path):
            if module == "kmd.daemon.service" or module.startswith("kmd.daemon.service."):
                wrong.append(f"{rel}:{line}: imports {module}")
    assert not wrong, "the API sees the daemon through kmd.daemon.surface.Service:\n  " + "\n  ".join(wrong)


def test_the_check_sees_a_violation(tmp_path):
    """The checker itself: an import of the daemon from a source module is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kmd.daemon.ledger import Ledger\n")
    assert _kmd_imports(bad) == [(2, "kmd.daemon.ledger")]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(["kmd", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def import_graph(folder: str) -> dict[str, set[str]]:
    """Module -> the modules of the same folder it imports (every import statement counts;
    `from kmd.a import b` names the module `kmd.a.b` when there is one, else `kmd.a`: a
    package's submodule imported by name is not an import of the package's own names)."""
    modules = {_module_name(p): p for p in _files(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                candidates = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                              for alias in node.names]  # fmt: skip
            else:
                continue
            for target in candidates:
                while target and target not in modules:  # a name inside a module: that module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def import_cycles(folder: str) -> list[list[str]]:
    """The folder's import cycles: each strongly connected group of modules (sorted names),
    found with Tarjan's algorithm on `import_graph`."""
    graph = import_graph(folder)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while (top := stack.pop()) != module:
                group.append(top)
            if group:
                cycles.append(sorted([module, *group]))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(cycles)


# The HTTP surfaces and the service: no module here may be part of an import cycle.
ONE_WAY = ("kmd.daemon.api", "kmd.daemon.auth", "kmd.daemon.web", "kmd.daemon.routes", "kmd.daemon.surface",
           "kmd.daemon.openai_api", "kmd.daemon.console", "kmd.daemon.service", "kmd.daemon.serving")


def _one_way(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ONE_WAY)


def test_no_import_cycle_among_the_http_surfaces_and_the_service():
    wrong = [cycle for cycle in import_cycles("daemon") if any(_one_way(m) for m in cycle)]
    assert not wrong, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in wrong)


def test_report_import_cycles(capsys):
    """The cycles elsewhere (maintainer <-> reconcile, editors: being removed on their own
    branches): listed, not failed on."""
    with capsys.disabled():
        for folder in ("daemon", "editors"):
            for cycle in import_cycles(folder):
                print(f"\nimport cycle in {folder}/: " + " <-> ".join(cycle))


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from kmd.pkg.b import B\n")
    (package / "b.py").write_text("def f():\n    from kmd.pkg import c\n")
    (package / "c.py").write_text("import kmd.pkg.a\n")
    (package / "d.py").write_text("from kmd.pkg.a import A\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert import_cycles("pkg") == [["kmd.pkg.a", "kmd.pkg.b", "kmd.pkg.c"]]


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore means "this module only": what two modules share gets a public name."""
    wrong = []
    for package in ("daemon", "sources", "editors", "common"):
        for path in _files(package):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kmd."):
                    wrong += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert not wrong, "private names imported across modules:\n  " + "\n  ".join(wrong)


def test_nothing_reaches_into_a_ledger_transactions_session():
    """Rows are written through `LedgerTransaction`'s public methods only: its session
    (`_s`) is touched by transaction.py alone."""
    wrong = []
    for package in ("daemon", "sources", "common"):
        for path in _files(package):
            if path.relative_to(ROOT).as_posix() == "daemon/ledger/transaction.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr == "_s":
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not wrong, "a transaction's session is private:\n  " + "\n  ".join(wrong)
