"""The layer contracts in pyproject.toml's [tool.importlinter] hold (`lint-imports`).

Run here so that the README's test command (and CI, which runs it) checks them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _lint_imports(*args: str) -> subprocess.CompletedProcess[str]:
    # The script installed beside this interpreter (the test extra brings it).
    beside = Path(sys.executable).with_name("lint-imports")
    command = str(beside) if beside.exists() else shutil.which("lint-imports")
    assert command, "lint-imports is missing: pip install -e '.[test]'"
    return subprocess.run(
        # --no-cache: leave no .import_linter_cache/ in the work tree.
        [command, "--no-cache", "--no-logo", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layer_contracts_hold() -> None:
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def test_a_broken_contract_fails_the_check(tmp_path: Path) -> None:
    # The runner does import the collector: a contract forbidding it must fail,
    # so the test above would catch a real violation too.
    config = tmp_path / "violated.toml"
    config.write_text(
        '[tool.importlinter]\nroot_packages = ["kubetune_suggestion"]\n\n'
        "[[tool.importlinter.contracts]]\n"
        'name = "The runner does not use the collector (false)"\n'
        'type = "forbidden"\n'
        'source_modules = ["kubetune_suggestion.runner"]\n'
        'forbidden_modules = ["kubetune_suggestion.collector"]\n'
    )
    result = _lint_imports(str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
    assert "kubetune_suggestion.runner.run -> kubetune_suggestion.collector" in result.stdout
