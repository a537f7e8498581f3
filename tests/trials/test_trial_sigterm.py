"""The trial programs end at SIGTERM at once, also as a container's PID 1.

A pruned trial's Pod is deleted: the kubelet sends SIGTERM to PID 1 of each
container, and a process without a handler would wait out the grace period.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from kubetune_trials import synthetic

from tests.sigterm import PROMPT_SECONDS, catches_sigterm, start, wait_until

REPO = Path(__file__).resolve().parents[2]


def test_synthetic_trial_stops_at_sigterm_with_whole_lines(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics"
    trial = start(
        [
            sys.executable,
            "-m",
            "kubetune_trials.synthetic",
            "--epochs=1000",
            "--sleep=0.3",
        ],
        env={**os.environ, "KUBETUNE_METRICS_FILE": str(metrics)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 30, "reports")
        assert catches_sigterm(trial.pid)
        code, seconds = trial.sigterm()
    finally:
        trial.kill()
    out = trial.popen.stdout.read() if trial.popen.stdout else ""
    assert code == synthetic.EXIT_TERMINATED == 143, out
    assert seconds < PROMPT_SECONDS
    assert "stopped by SIGTERM" in out
    # Every line it wrote is a whole report: the collector loses nothing.
    assert metrics.read_text().endswith("\n")
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_synthetic_main_puts_the_sigterm_handler_back() -> None:
    # In-process callers (tests, a runner thread) keep their own handler.
    before = signal.getsignal(signal.SIGTERM)
    assert synthetic.main(["--epochs=1", "--sleep=0"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_pytorch_trial_stops_at_sigterm_while_torch_imports(tmp_path: Path) -> None:
    # Importing torch takes seconds; SIGTERM then must not be lost either.
    # A stand-in torch that never finishes importing (no torch needed here).
    stubs = tmp_path / "stubs"
    marker = tmp_path / "importing"
    (stubs / "torch").mkdir(parents=True)
    (stubs / "torch" / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib, time
            pathlib.Path({str(marker)!r}).write_text("torch")
            time.sleep(600)
            """
        )
    )
    trial = start(
        [sys.executable, str(REPO / "trial-images" / "pytorch-mlp" / "train.py"), "--epochs=1"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), str(REPO / "sdk")])},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(marker.exists, 30, "the import of torch")
        code, seconds = trial.sigterm()
    finally:
        trial.kill()
    out = trial.popen.stdout.read() if trial.popen.stdout else ""
    assert code == 143, out
    assert seconds < PROMPT_SECONDS
    assert "stopped by SIGTERM" in out
