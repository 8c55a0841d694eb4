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
import sys
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


# ----- import cycles ---------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "kmd." + ".".join(parts)


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules of `packages` it imports (every import statement, as above;
    `from kmd.a import b` imports the module kmd.a.b when there is one, else kmd.a)."""
    files = {_module_name(p): p for package in packages for p in _files(package)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for module in modules:
                while module not in files and "." in module:
                    module = module.rsplit(".", 1)[0]  # a name imported from a module: the module
                if module in files and module != name:
                    targets.add(module)
        graph[name] = targets
    return graph


def import_cycles(*packages: str) -> list[list[str]]:
    """The import cycles among the modules of `packages`: each strongly connected group of
    more than one module (Tarjan), sorted."""
    graph = import_graph(*packages)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_no_import_cycle_inside_daemon_or_editors():
    """Issue 28: modules import each other one way inside a folder too (the maintainer owns
    its reconciler and batches, the Daemon its jobs and lifetime, the HTTP surfaces share
    auth/web/surface and never import the app; persistence is editors.state's, not the
    Editor class's). Every import statement counts: module level, in functions, under
    TYPE_CHECKING."""
    cycles = import_cycles("daemon") + import_cycles("editors")
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from kmd.pkg.b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    import kmd.pkg.a\n")
    (tmp_path / "pkg" / "c.py").write_text("from kmd.pkg import a\n")
    assert import_cycles("pkg") == [["kmd.pkg.a", "kmd.pkg.b"]]


if __name__ == "__main__":  # every import cycle among the daemon's and the editors' modules, listed
    for cycle in import_cycles("daemon", "editors"):
        print(" <-> ".join(cycle))
