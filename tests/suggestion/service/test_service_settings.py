"""The service's settings: read from the environment, with the documented defaults.

Also that the chart README's table names every variable with its default, that
an unusable value is refused naming its variable, and that ``kubetune-service``
takes its defaults (port 8000 included) from the same settings.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from kubetune_suggestion.env_settings import SettingsError
from kubetune_suggestion.service import __main__ as service_main
from kubetune_suggestion.service.__main__ import main
from kubetune_suggestion.service.settings import ServiceSettings
from kubetune_suggestion.store import make_engine, migrate

README = Path(__file__).resolve().parents[3] / "charts" / "kubetune" / "README.md"

# One value per variable, each different from its default, and what it parses to.
EXAMPLES: dict[str, tuple[str, Any]] = {
    "KUBETUNE_DB_URL": ("postgresql+psycopg://u:p@db/kt", "postgresql+psycopg://u:p@db/kt"),
    "KUBETUNE_SECRET": ("s3cret", "s3cret"),
    "KUBETUNE_MIGRATE": ("false", False),
    "KUBETUNE_HOST": ("0.0.0.0", "0.0.0.0"),
    "KUBETUNE_PORT": ("8123", 8123),
    "KUBETUNE_STOP_POLL_SECONDS": ("0.5", 0.5),
    "KUBETUNE_METRICS_PORT": ("9191", 9191),
    "KUBETUNE_SECRET_NAME": ("kt-token-key", "kt-token-key"),
    "KUBETUNE_API_KEY": ("k3y", "k3y"),
    "KUBETUNE_TOKEN_AUDIENCE": ("kubetune", "kubetune"),
    "KUBETUNE_ALLOWED_USERS": (
        "system:serviceaccount:kt:op, alice",
        frozenset({"system:serviceaccount:kt:op", "alice"}),
    ),
    "KUBETUNE_NO_AUTH": ("yes", True),
}


def variables() -> dict[str, str]:
    """Every variable the service reads, mapped to its field."""
    return {f.metadata["env"]: f.name for f in fields(ServiceSettings)}


def test_defaults_without_any_variable() -> None:
    assert ServiceSettings.from_env({}) == ServiceSettings(
        db_url="sqlite:///kubetune.db",
        secret=None,
        migrate=True,
        host="127.0.0.1",
        port=8000,
        metrics_port=9090,
        stop_poll_seconds=0.15,
        secret_name=None,
        api_key=None,
        token_audience=None,
        allowed_users=frozenset(),
        no_auth=False,
    )


def test_every_setting_comes_from_its_variable() -> None:
    assert set(EXAMPLES) == set(variables())
    settings = ServiceSettings.from_env({name: text for name, (text, _) in EXAMPLES.items()})
    for name, (_, value) in EXAMPLES.items():
        assert getattr(settings, variables()[name]) == value, name


@pytest.mark.parametrize(
    ("text", "expected"), [("1", True), ("YES", True), ("True", True), ("0", False), ("no", False)]
)
def test_migrate_takes_the_usual_spellings(text: str, expected: bool) -> None:
    assert ServiceSettings.from_env({"KUBETUNE_MIGRATE": text}).migrate is expected


def test_an_empty_variable_counts_as_unset() -> None:
    assert ServiceSettings.from_env({name: "" for name in variables()}) == ServiceSettings()


def test_the_chart_readme_documents_every_variable_with_its_default() -> None:
    section = README.read_text().split("### Suggestion service\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(KUBETUNE_\w+)` \| ([^|]+) \|", section, re.MULTILINE)
    documented = {name: default.strip() for name, default in rows}
    assert set(documented) == set(variables())
    for name, default in documented.items():
        if default == "unset":
            assert not getattr(ServiceSettings(), variables()[name]), name
        else:
            # The documented default, given as the value, changes nothing.
            assert ServiceSettings.from_env({name: default.strip("`")}) == ServiceSettings(), name


def test_the_chart_sets_only_variables_that_are_read() -> None:
    template = (README.parent / "templates" / "suggestion-deployment.yaml").read_text()
    assert set(re.findall(r"- name: (KUBETUNE_\w+)", template)) <= set(variables())


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KUBETUNE_PORT", "http", "a port"),
        ("KUBETUNE_PORT", "8000.5", "a port"),
        ("KUBETUNE_PORT", "65536", "a port"),
        ("KUBETUNE_MIGRATE", "maybe", "expected 1, true, yes, 0, false or no"),
        ("KUBETUNE_STOP_POLL_SECONDS", "-1", "seconds > 0"),
        ("KUBETUNE_STOP_POLL_SECONDS", "0", "seconds > 0"),
    ],
)
def test_an_unusable_value_is_refused_naming_its_variable(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"{name}={value!r}: ")) as error:
        ServiceSettings.from_env({name: value})
    assert expected in str(error.value)


def test_the_cli_refuses_an_unusable_variable_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBETUNE_PORT", "eighty")
    assert main(["migrate"]) == 2
    assert "KUBETUNE_PORT='eighty'" in capsys.readouterr().err


def test_the_migrate_command_migrates_whatever_kubetune_migrate_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBETUNE_MIGRATE", "0")
    db_url = f"sqlite:///{tmp_path}/migrated.db"
    assert main(["migrate", "--db", db_url]) == 0
    engine = make_engine(db_url)
    assert migrate.current_revision(engine) == migrate.head_revision()
    engine.dispose()


class Served:
    """What ``kubetune-service`` handed to uvicorn, with uvicorn replaced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.run: dict[str, Any] = {}
        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: self.run.update(kw))
        self.metrics: dict[str, Any] = {}
        monkeypatch.setattr(
            service_main, "start_http_server", lambda port, addr: self.metrics.update(port=port)
        )
        for name in variables():
            monkeypatch.delenv(name, raising=False)
        # main() hands the settings to uvicorn's workers through these
        # variables: set here, they are put back after the test.
        monkeypatch.setenv("KUBETUNE_DB_URL", f"sqlite:///{tmp_path}/served.db")
        monkeypatch.setenv("KUBETUNE_SECRET", "s")
        monkeypatch.setenv("KUBETUNE_MIGRATE", "1")
        monkeypatch.setenv("KUBETUNE_API_KEY", "k")


def test_the_cli_serves_on_port_8000_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = Served(monkeypatch, tmp_path)
    assert main([]) == 0
    assert (served.run["host"], served.run["port"]) == ("127.0.0.1", 8000)
    assert served.metrics == {"port": 9090}


def test_the_cli_refuses_to_serve_without_a_way_to_authenticate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    served = Served(monkeypatch, tmp_path)
    monkeypatch.delenv("KUBETUNE_API_KEY")
    assert main([]) == 2
    assert "KUBETUNE_API_KEY" in capsys.readouterr().err and not served.run
    key = tmp_path / "key"
    key.write_text("from-a-file\n")
    assert main(["--api-key-file", str(key)]) == 0
    assert served.run and os.environ["KUBETUNE_API_KEY"] == "from-a-file"
    monkeypatch.setenv("KUBETUNE_TOKEN_AUDIENCE", "kubetune")
    assert main(["--api-key-file", str(key)]) == 2
    assert "KUBETUNE_ALLOWED_USERS" in capsys.readouterr().err
    # TokenReviews need the Kubernetes API: outside a Pod, said at once.
    monkeypatch.setenv("KUBETUNE_ALLOWED_USERS", "system:serviceaccount:kt:op")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main([]) == 2
    assert "run the service in a Pod" in capsys.readouterr().err


def test_the_cli_takes_the_environment_and_its_flags_win(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    served = Served(monkeypatch, tmp_path)
    monkeypatch.setenv("KUBETUNE_HOST", "0.0.0.0")
    monkeypatch.setenv("KUBETUNE_PORT", "8123")
    assert main([]) == 0
    assert (served.run["host"], served.run["port"]) == ("0.0.0.0", 8123)
    assert main(["--port", "8124"]) == 0
    assert served.run["port"] == 8124
