"""``bench/operator.py`` still runs end to end (tiny sizes: what runs, not how fast)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.cluster import Cluster
from e2e.helpers import Kube

REPO = Path(__file__).resolve().parents[1]


def test_the_operator_benchmark_runs_and_its_floor_too(kube: Kube) -> None:
    if not Cluster().is_up():
        pytest.skip("the benchmark runs on the process cluster (python -m e2e.cluster up)")
    done = subprocess.run(
        [
            *(sys.executable, str(REPO / "bench" / "operator.py")),
            *("--trials", "12", "--parallelism", "4", "--seconds", "0.5", "--nodes", "1"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=kube.env(),
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = dict(
        (key.strip(), value.strip())
        for key, value in re.findall(r"^([^|\n]+)\|([^|\n]+)$", done.stdout, re.MULTILINE)
    )
    assert rows["trials (created / max)"] == "12 / 12"
    assert rows["succeeded / metricsUnavailable"] == "12 / 0"
    assert 1 <= int(rows["peak trial Pods Running at once"]) <= 4
    assert re.fullmatch(r"[0-9.]+ s", rows["floor: the same Pods without kubetune"])
    assert re.fullmatch(r"[0-9.]+x", rows["kubetune's time over the floor"])
