"""The layer rule of docs/architecture.md: import-linter's contracts, and no transaction or publish in handlers."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("server", "handlers", "db")
# What only services may do: own a transaction, publish, or queue an event through the outbox.
SERVICE_ONLY_CALLS = {"transaction", "publish", "publish_many", "enqueue"}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter over the tree at `cwd` with its pyproject.toml contracts."""
    # A fresh interpreter with `cwd` first on the path, so the packages analysed are the ones there.
    return subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, '.'); "
                               "from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"],
        cwd=cwd, capture_output=True, text=True, timeout=120)


def test_imports_follow_the_layer_contracts():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_breaks_the_contracts(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    money = tmp_path / "server" / "core" / "money.py"
    money.write_text(money.read_text() + "\nfrom server.services import chain  # noqa\n")
    (tmp_path / "handlers" / "games.py").write_text(
        (ROOT / "handlers" / "games.py").read_text() + "\nfrom handlers import dao  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "server.core.money -> server.services.chain" in result.stdout
    assert "handlers.games -> handlers.dao" in result.stdout


def service_only_calls(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line name` of each call in `path` to a function only services may call."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in SERVICE_ONLY_CALLS:
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_handlers_neither_open_transactions_nor_publish():
    offending = [hit for path in sorted((ROOT / "handlers").glob("*.py")) for hit in service_only_calls(path)]
    assert offending == []


def test_the_handler_check_finds_a_transaction(tmp_path):
    sample = tmp_path / "handlers" / "sample.py"
    sample.parent.mkdir()
    sample.write_text("async def handle(pool):\n    async with pool.acquire() as conn, conn.transaction():\n"
                      "        await publish(None, 'market', 'x', {})\n")
    assert service_only_calls(sample, tmp_path) == ["handlers/sample.py:2 transaction", "handlers/sample.py:3 publish"]
