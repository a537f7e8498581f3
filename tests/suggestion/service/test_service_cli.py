"""`kubetune-service` (python -m kubetune_suggestion.service): migrate, settings, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_suggestion.service.__main__ import main
from kubetune_suggestion.store import make_engine, migrate


def test_migrate_brings_the_database_to_the_shipped_schema(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--db", db_url]) == 0
    assert "up to date" in capsys.readouterr().out
    engine = make_engine(db_url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


def test_the_database_url_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_DB_URL", f"sqlite:///{tmp_path}/env.db")
    assert main(["migrate"]) == 0
    assert (tmp_path / "env.db").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["migrate", "--db", "mysql://x/y"], "unsupported database 'mysql'"),
        (["--db", "sqlite:///x.db", "--secret-file", "/nonexistent/secret"], "cannot read"),
    ],
)
def test_bad_settings_exit_2_with_a_reason(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_an_empty_secret_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("\n")
    assert main(["--db", f"sqlite:///{tmp_path}/x.db", "--secret-file", str(secret)]) == 2
    assert "is empty" in capsys.readouterr().err
