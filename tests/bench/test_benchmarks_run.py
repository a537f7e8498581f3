"""Each benchmark still runs with one command (tiny sizes: what runs, not how fast).

The figures in ``bench/README.md`` come from these scripts at full size;
these tests keep the scripts working as the code under them changes.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_suggestion.store import testing

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_sampler_benchmark_runs() -> None:
    out = run_bench("samplers.py", "--quick", "--seeds", "1", "--trials", "10")
    assert re.search(r"TPE timing \w+: [0-9.]+ ms at 1,000 trials", out)
    assert "CMA-ES: at least as good on" in out


def test_the_early_stopping_benchmark_runs() -> None:
    out = run_bench("early_stopping.py", "--seeds", "1", "--trials", "9")
    assert re.search(r"\| kubetune median +\|", out)
    assert re.search(r"\| optuna Median +\|", out)


def test_the_real_training_benchmark_runs() -> None:
    out = run_bench(
        "early_stopping.py",
        *("--training", "--seeds", "1", "--trials", "12", "--epochs", "9", "--epoch-sleep", "0"),
    )
    assert re.search(r"^\| kubetune tpe\+asha +\| +[0-9.]+ \| +[0-9]+ \|", out, re.MULTILINE)
    assert re.search(r"^\| optuna tpe\+Median +\|", out, re.MULTILINE)


def test_the_service_benchmark_runs() -> None:
    if testing.postgres_base_url() is None:
        if testing.postgres_required():
            pytest.fail(f"CI=true but {testing.POSTGRES_ENV} is unset")
        pytest.skip(f"{testing.POSTGRES_ENV} is unset (source .ci/postgres.sh)")
    out = run_bench(
        "service.py",
        *("--counts", "100", "--rounds", "5", "--seconds", "1", "--reporters", "5"),
        "--skip-optuna",
    )
    # Both ways of a trial's life (ask + tell; ask + report + finish) side by side.
    assert re.search(r"^\| 100 +\| [0-9.]+ / [0-9.]+ +\| [0-9.]+ / [0-9.]+ +\|", out, re.MULTILINE)
    stored = re.search(r"\(([0-9,]+) acknowledged, ([0-9,]+) stored\)", out)
    assert stored is not None and stored.group(1) == stored.group(2) != "0"
