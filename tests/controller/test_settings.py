"""The operator's settings: read from the environment, with the documented defaults.

Also that the chart README's table names every variable with its default, that
an unusable value is refused naming its variable, and that the flags of
``python -m kubetune_controller`` win over the variables they name.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import kubetune_controller.__main__ as operator_main
from kubetune_controller.settings import OperatorSettings, settings_from_env
from kubetune_suggestion.env_settings import SettingsError

README = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "README.md"

# One value per variable, each different from its default, and what it parses to.
EXAMPLES: dict[str, tuple[str, Any]] = {
    "KUBETUNE_SERVICE_URL": ("http://svc.kubetune:8000/", "http://svc.kubetune:8000"),
    "KUBETUNE_COLLECTOR_SERVICE_URL": ("https://svc.example", "https://svc.example"),
    "KUBETUNE_SERVICE_TOKEN_FILE": ("/var/run/token", "/var/run/token"),
    "KUBETUNE_SERVICE_API_KEY": ("k3y", "k3y"),
    "KUBETUNE_COLLECTOR_IMAGE": ("registry/kubetune:1.2.3", "registry/kubetune:1.2.3"),
    "KUBETUNE_COLLECTOR_COMMAND": ("kubetune-collector --quiet", ("kubetune-collector", "--quiet")),
    "KUBETUNE_COLLECTOR_RESOURCES": (
        '{"requests": {"cpu": "20m"}, "limits": {"cpu": "1"}}',
        {"requests": {"cpu": "20m"}, "limits": {"cpu": "1"}},
    ),
    "KUBETUNE_METRICS_DIR": ("/metrics", "/metrics"),
    "KUBETUNE_NAMESPACES": ("team-a, team-b,", ("team-a", "team-b")),
    "KUBETUNE_METRICS_PORT": ("9191", 9191),
    "KUBETUNE_HEALTH_PORT": ("8181", 8181),
    "KUBETUNE_WORKERS": ("2", 2),
    "KUBETUNE_TRIAL_CONCURRENCY": ("16", 16),
    "KUBETUNE_STOP_GRACE_SECONDS": ("0", 0),
    "KUBETUNE_LOG_TAIL_LINES": ("40", 40),
    "KUBETUNE_RECONCILE_INTERVAL_SECONDS": ("0.5", 0.5),
    "KUBETUNE_RESYNC_SECONDS": ("60", 60.0),
    "KUBETUNE_STATUS_INTERVAL_SECONDS": ("0", 0.0),
    "KUBETUNE_EVENT_WINDOW_SECONDS": ("0", 0.0),
    "KUBETUNE_TRIAL_RUNNING_DELAY_SECONDS": ("2.5", 2.5),
    "KUBETUNE_WATCH_GRACE_SECONDS": ("30", 30.0),
    "KUBETUNE_STEP_REFRESH_SECONDS": ("1", 1.0),
    "KUBETUNE_STOPS_WAIT_SECONDS": ("20", 20.0),
    "KUBETUNE_LOST_POD_GRACE_SECONDS": ("60", 60.0),
    "KUBETUNE_SERVICE_RETRIES": ("0", 0),
    "KUBETUNE_SERVICE_TIMEOUT_SECONDS": ("5", 5.0),
}


def variables() -> dict[str, str]:
    """Every variable the operator reads, mapped to its field."""
    return {f.metadata["env"]: f.name for f in fields(OperatorSettings)}


def readme_table(heading: str) -> dict[str, str]:
    """The chart README's settings table under ``heading``: variable -> default cell."""
    section = README.read_text().split(f"### {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(KUBETUNE_\w+)` \| ([^|]+) \|", section, re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_defaults_without_any_variable() -> None:
    settings = settings_from_env({})
    assert settings == OperatorSettings()
    assert settings.service_url == "http://kubetune-suggestion:8000"
    assert settings.sidecar_service_url == settings.service_url
    assert settings.namespaces == ()  # every namespace
    assert (settings.metrics_port, settings.health_port) == (9090, 8080)
    assert settings.collector_resources == {
        "requests": {"cpu": "10m", "memory": "32Mi"},
        "limits": {"memory": "128Mi"},
    }


def test_every_setting_comes_from_its_variable() -> None:
    assert set(EXAMPLES) == set(variables())
    settings = settings_from_env({name: text for name, (text, _) in EXAMPLES.items()})
    for name, (_, value) in EXAMPLES.items():
        assert getattr(settings, variables()[name]) == value, name
    assert settings.sidecar_service_url == "https://svc.example"


def test_an_empty_variable_counts_as_unset() -> None:
    assert settings_from_env({name: "" for name in variables()}) == OperatorSettings()
    assert settings_from_env({"KUBETUNE_WORKERS": "  "}) == OperatorSettings()


def test_the_chart_readme_documents_every_variable_with_its_default() -> None:
    documented = readme_table("Operator")
    assert set(documented) == set(variables())
    for name, default in documented.items():
        if default == "unset":
            assert getattr(OperatorSettings(), variables()[name]) in (None, ()), name
        else:
            # The documented default, given as the value, changes nothing.
            assert settings_from_env({name: default.strip("`")}) == OperatorSettings(), name


def test_the_chart_sets_only_variables_that_are_read() -> None:
    template = (README.parent / "templates" / "operator-deployment.yaml").read_text()
    assert set(re.findall(r"- name: (KUBETUNE_\w+)", template)) <= set(variables())


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KUBETUNE_METRICS_PORT", "http", "a port"),
        ("KUBETUNE_HEALTH_PORT", "70000", "a port"),
        ("KUBETUNE_HEALTH_PORT", "0", "a port"),
        ("KUBETUNE_RESYNC_SECONDS", "-1", "seconds > 0"),
        ("KUBETUNE_STOPS_WAIT_SECONDS", "0", "seconds > 0"),
        ("KUBETUNE_EVENT_WINDOW_SECONDS", "-0.5", "seconds >= 0"),
        ("KUBETUNE_RECONCILE_INTERVAL_SECONDS", "nan", "seconds >= 0"),
        ("KUBETUNE_SERVICE_TIMEOUT_SECONDS", "15s", "seconds > 0"),
        ("KUBETUNE_WORKERS", "0", "integer >= 1"),
        ("KUBETUNE_SERVICE_RETRIES", "-1", "integer >= 0"),
        ("KUBETUNE_STOP_GRACE_SECONDS", "1.5", "integer >= 0"),
        ("KUBETUNE_SERVICE_URL", "kubetune-suggestion:8000", "http:// or https:// URL"),
        ("KUBETUNE_NAMESPACES", "team-a,Team_B", "'Team_B' is not a namespace"),
        ("KUBETUNE_COLLECTOR_RESOURCES", "cpu=10m", "JSON object"),
        ("KUBETUNE_COLLECTOR_RESOURCES", '{"limits": {"cpu": 1}}', "JSON object"),
    ],
)
def test_an_unusable_value_is_refused_naming_its_variable(
    name: str, value: str, expected: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(f"{name}={value!r}: ")) as error:
        settings_from_env({name: value})
    assert expected in str(error.value)


class Started:
    """What ``main`` handed to kopf, with kopf itself replaced."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.app: operator_main.OperatorApp | None = None
        self.run: dict[str, Any] = {}

        def build_registry(app: operator_main.OperatorApp) -> None:
            self.app = app

        monkeypatch.setattr(operator_main, "build_registry", build_registry)
        monkeypatch.setattr(operator_main, "_event_loop", lambda: None)
        monkeypatch.setattr(operator_main.kopf, "run", lambda **kw: self.run.update(kw))
        for name in variables():
            monkeypatch.delenv(name, raising=False)

    @property
    def settings(self) -> OperatorSettings:
        assert self.app is not None
        return self.app.settings


def test_main_takes_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    started = Started(monkeypatch)
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "team-a,team-b")
    monkeypatch.setenv("KUBETUNE_HEALTH_PORT", "8181")
    monkeypatch.setenv("KUBETUNE_WORKERS", "3")
    assert operator_main.main([]) == 0
    assert started.settings.workers == 3
    assert started.run["namespaces"] == ["team-a", "team-b"]
    assert started.run["clusterwide"] is False
    assert started.run["liveness_endpoint"] == "http://0.0.0.0:8181/healthz"


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    started = Started(monkeypatch)
    monkeypatch.setenv("KUBETUNE_NAMESPACES", "team-a")
    monkeypatch.setenv("KUBETUNE_SERVICE_URL", "http://from-env:8000")
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "9191")
    argv = ["--all-namespaces", "--service-url", "http://flag:8000/", "--metrics-port", "9292"]
    assert operator_main.main(argv) == 0
    assert started.settings.service_url == "http://flag:8000"
    assert started.settings.metrics_port == 9292
    assert started.run["clusterwide"] is True
    assert started.run["namespaces"] == []

    assert operator_main.main(["-n", "team-c", "-n", "team-d"]) == 0
    assert started.run["namespaces"] == ["team-c", "team-d"]


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        ([], {"KUBETUNE_METRICS_PORT": "metrics"}, "KUBETUNE_METRICS_PORT='metrics'"),
        (["--health-port", "-1"], {}, "KUBETUNE_HEALTH_PORT='-1'"),
        ([], {"KUBETUNE_RESYNC_SECONDS": "-30"}, "KUBETUNE_RESYNC_SECONDS='-30'"),
    ],
)
def test_main_refuses_an_unusable_value_naming_its_variable(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = Started(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        operator_main.main(argv)
    assert exit.value.code == 2
    assert named in capsys.readouterr().err
    assert started.run == {}


def test_the_service_credentials_are_the_token_file_read_anew_else_the_api_key(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    settings = settings_from_env(
        {"KUBETUNE_SERVICE_TOKEN_FILE": str(token), "KUBETUNE_SERVICE_API_KEY": "key"}
    )
    assert settings.service_credentials() == "first"
    token.write_text("rotated\n")
    assert settings.service_credentials() == "rotated"
    assert settings_from_env({"KUBETUNE_SERVICE_API_KEY": "key"}).service_credentials() == "key"
    assert settings_from_env({}).service_credentials() is None
