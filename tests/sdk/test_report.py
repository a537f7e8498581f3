"""The SDK writes lines the collector's parser reads, from a real training process."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kubetune
from kubetune_suggestion.metrics_protocol import MetricsFileReader, MetricsParser, Report


def _reports(path: Path) -> list[Report]:
    parser = MetricsParser()
    return [r for line in MetricsFileReader(path).read_lines() if (r := parser.feed(line))]


def test_report_appends_json_lines_the_collector_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("KUBETUNE_METRICS_FILE", str(path))
    kubetune.report(step=1, val_loss=0.5, accuracy=1)
    kubetune.report(step=2, val_loss=0.25)
    assert path.read_text().count("\n") == 2
    assert _reports(path) == [
        Report(1, {"val_loss": 0.5, "accuracy": 1.0}),
        Report(2, {"val_loss": 0.25}),
    ]


def test_numpy_scalars_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np = pytest.importorskip("numpy")
    path = tmp_path / "metrics"
    monkeypatch.setenv("KUBETUNE_METRICS_FILE", str(path))
    kubetune.report(step=np.int64(3), loss=np.float32(0.5), acc=np.float64(0.25), n=np.int32(7))
    assert _reports(path) == [Report(3, {"loss": 0.5, "acc": 0.25, "n": 7.0})]
    with pytest.raises(ValueError, match="must be finite"):
        kubetune.report(step=4, loss=np.float32("nan"))
    with pytest.raises(ValueError, match="must be a number"):
        kubetune.report(step=4, loss=np.bool_(True))


def test_a_training_process_reports_through_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    code = "import kubetune\nfor i in range(1, 4):\n    kubetune.report(step=i, loss=1.0 / i)\n"
    env = {**os.environ, "KUBETUNE_METRICS_FILE": str(path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert [r.step for r in _reports(path)] == [1, 2, 3]


def test_without_the_environment_variable_it_prints_to_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KUBETUNE_METRICS_FILE", raising=False)
    kubetune.report(step=0, loss=1.5)
    assert capsys.readouterr().err == 'kubetune report: {"step":0,"loss":1.5}\n'


@pytest.mark.parametrize(
    ("step", "metrics", "needle"),
    [
        (-1, {"loss": 1.0}, "non-negative integer"),
        (1.5, {"loss": 1.0}, "non-negative integer"),
        (True, {"loss": 1.0}, "non-negative integer"),
        (1, {}, "at least one metric"),
        (1, {"loss": math.nan}, "must be finite"),
        (1, {"loss": math.inf}, "must be finite"),
        (1, {"loss": "0.5"}, "must be a number"),
        (1, {"loss": True}, "must be a number"),
        (1, {"val loss": 1.0}, "invalid metric name"),
        (1, {"9lives": 1.0}, "invalid metric name"),
    ],
)
def test_invalid_reports_raise_and_write_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: object,
    metrics: dict[str, object],
    needle: str,
) -> None:
    path = tmp_path / "metrics"
    monkeypatch.setenv("KUBETUNE_METRICS_FILE", str(path))
    with pytest.raises(ValueError, match=needle):
        kubetune.report(step, **metrics)  # type: ignore[arg-type]
    assert not path.exists()


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics"
    code = (
        "import sys, kubetune\n"
        "w = int(sys.argv[1])\n"
        "for i in range(200):\n"
        "    kubetune.report(step=i, **{f'writer{w}': float(i)})\n"
    )
    env = {**os.environ, "KUBETUNE_METRICS_FILE": str(path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(w)], env=env) for w in range(3)]
    assert all(p.wait(timeout=60) == 0 for p in procs)
    reports = _reports(path)
    assert len(reports) == 600


def test_the_sdk_and_the_collector_accept_the_same_metric_names() -> None:
    from kubetune_suggestion import metrics_protocol

    assert kubetune.METRIC_NAME.pattern == metrics_protocol.METRIC_NAME.pattern
