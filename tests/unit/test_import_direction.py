"""The house is one-way: which package may import which (docs/architecture.md, "Imports").

    common   <- everything      (imports nothing of kmd)
    sources  -> common          (never the daemon, never the model side)
    editors  -> common          (never the daemon, never the sources)
    daemon   -> sources, editors, common

Every `import` statement counts: at module level, inside functions (the lazy imports the
CLI uses) and under TYPE_CHECKING. Inside the daemon, the HTTP surfaces (api, openai_api,
console) see the service only through `kmd.daemon.surface`, never `kmd.daemon.service`.
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
SURFACES = ("daemon/api.py", "daemon/openai_api/", "daemon/console/")


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
