"""The code type-checks (mypy) and passes the linter and the formatter (ruff), with the project's
configuration in pyproject.toml: CI runs the test suite, so it runs these too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The folders that install as erllama.<name> (pyproject's package-dir).
SUBPACKAGES = ("broker", "worker", "client", "cachestore", "gateway", "host")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, check=False)


def package_tree(root: Path) -> Path:
    """``erllama`` laid out as it installs, made of links to the sources: mypy resolves ``erllama.broker``
    to ``broker/`` only through such a tree (the editable install maps it with an import hook)."""
    pkg = root / "erllama"
    pkg.mkdir()
    for entry in (ROOT / "erllama").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (pkg / name).symlink_to(ROOT / name)
    return pkg


def test_mypy_finds_no_type_errors_in_the_packages(tmp_path: Path) -> None:
    package_tree(tmp_path)
    result = run(
        "mypy",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(tmp_path / ".mypy"),
        "erllama",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check_finds_nothing() -> None:
    result = run("ruff", "check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_would_change_nothing() -> None:
    result = run("ruff", "format", "--check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr
