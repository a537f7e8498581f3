"""Two service processes on one database, hammered with asks and reports at once.

No trial number may be handed out twice for different trials, numbers stay
dense, and every acknowledged observation is stored. Run on PostgreSQL (the
replicated deployment) and on SQLite (several local processes on one file).
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kubetune_suggestion.service.testing import (
    API_KEY,
    CLIENT_HEADERS,
    EXAMPLE_ASHA,
    example_spec,
    free_port,
)

UID = "hammered"
MAX_TRIALS = 120
STEPS = 4
ASKERS = 4
REPORTERS = 6


@pytest.fixture
def two_services(db_url: str, tmp_path: Any) -> Iterator[list[str]]:
    """Two `kubetune-service` processes on ``db_url`` (started at once: both migrate)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBETUNE_SECRET", "KUBETUNE_DB_URL")}
    env["KUBETUNE_API_KEY"] = API_KEY
    processes, urls = [], []
    for i in range(2):
        port = free_port()
        log = open(tmp_path / f"service-{i}.log", "w")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "kubetune_suggestion.service", "--db", db_url]
        command += ["--port", str(port), "--metrics-port", str(free_port())]
        command += ["--log-level", "warning"]
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        for (process, _), url in zip(processes, urls, strict=True):
            while True:
                assert process.poll() is None, (tmp_path / "service-0.log").read_text()
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "service did not become ready"
                time.sleep(0.1)
        yield urls
    finally:
        for process, log in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


@pytest.mark.parametrize(
    ("early_stopping", "ask_count"),
    # With a rule, reports of the objective also decide stops; without one,
    # single asks.
    [(EXAMPLE_ASHA, 2), (None, 1)],
    ids=["asha", "no-rule"],
)
def test_two_processes_never_duplicate_a_trial_or_lose_an_observation(
    two_services: list[str], early_stopping: dict[str, Any] | None, ask_count: int
) -> None:
    clients = [
        httpx.Client(base_url=url, timeout=60, headers=CLIENT_HEADERS) for url in two_services
    ]
    spec = example_spec(maxTrials=MAX_TRIALS, algorithm={"name": "tpe", "seed": 3})
    if early_stopping is not None:
        spec["earlyStopping"] = early_stopping
    body = {"name": "h", "namespace": "ns", "spec": spec}
    # Both replicas register at once, as two operator workers might.
    responses = [c.put(f"/v1/experiments/{UID}", json=body) for c in clients]
    assert sorted(r.status_code for r in responses) == [200, 201]

    lock = threading.Lock()
    handed_out: dict[int, list[dict[str, Any]]] = {}
    acknowledged: set[tuple[int, int]] = set()
    work: queue.Queue[dict[str, Any]] = queue.Queue()
    failures: list[str] = []
    askers_done = threading.Event()

    def ask(i: int) -> None:
        try:
            while True:
                client = clients[i % 2]
                result = client.post(f"/v1/experiments/{UID}/ask", json={"count": ask_count})
                assert result.status_code == 200, result.text
                answer = result.json()
                for trial in answer["trials"]:
                    with lock:
                        seen = trial["number"] in handed_out
                        handed_out.setdefault(trial["number"], []).append(trial["params"])
                    if not seen:
                        # Start it on the other replica, then hand it to a reporter.
                        started = clients[(i + 1) % 2].post(
                            f"/v1/experiments/{UID}/trials/{trial['number']}/start"
                        )
                        assert started.status_code == 204, started.text
                        work.put(trial)
                if answer["exhausted"] and not answer["trials"]:
                    return
                i += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(f"asker: {exc!r}")

    def report(i: int) -> None:
        try:
            while not (askers_done.is_set() and work.empty()):
                try:
                    trial = work.get(timeout=0.1)
                except queue.Empty:
                    continue
                number, headers = trial["number"], {"Authorization": f"Bearer {trial['token']}"}
                for step in range(1, STEPS + 1):
                    client = clients[(i + step) % 2]
                    url = f"/v1/experiments/{UID}/trials/{number}/observations"
                    metrics = {"loss": 1.0 / (number + 1) + 1.0 / step, "step_time": 0.1}
                    response = client.post(
                        url, json={"step": step, "metrics": metrics}, headers=headers
                    )
                    assert response.status_code == 200, response.text
                    with lock:
                        acknowledged.add((number, step))
                finish = clients[i % 2].post(
                    f"/v1/experiments/{UID}/trials/{number}/finish", json={"state": "succeeded"}
                )
                assert finish.status_code == 200, finish.text
        except BaseException as exc:  # reported by the main thread
            failures.append(f"reporter: {exc!r}")

    askers = [threading.Thread(target=ask, args=(i,)) for i in range(ASKERS)]
    reporters = [threading.Thread(target=report, args=(i,)) for i in range(REPORTERS)]
    for t in askers + reporters:
        t.start()
    for t in askers:
        t.join()
    askers_done.set()
    for t in reporters:
        t.join()
    assert failures == []

    # Each number was only ever one configuration, and numbers are dense.
    assert sorted(handed_out) == list(range(MAX_TRIALS))
    for number, params in handed_out.items():
        assert all(p == params[0] for p in params), f"trial {number} handed out as two configs"
    trials = clients[0].get(f"/v1/experiments/{UID}/trials", params={"observations": True}).json()
    assert [t["number"] for t in trials] == list(range(MAX_TRIALS))
    assert all(t["params"] == handed_out[t["number"]][0] for t in trials)
    stored = {(t["number"], o["step"]) for t in trials for o in t["observations"]}
    assert acknowledged <= stored
    assert len(acknowledged) == MAX_TRIALS * STEPS
    summary = clients[1].get(f"/v1/experiments/{UID}").json()
    assert summary["done"] == MAX_TRIALS and summary["complete"] is True
    for c in clients:
        c.close()


def test_two_processes_asking_with_parallelism_never_run_more_at_once(
    two_services: list[str],
) -> None:
    """Asks that overlap starts and finishes, on two replicas, keep to ``parallelism``."""
    parallelism, total = 5, 60
    clients = [
        httpx.Client(base_url=url, timeout=60, headers=CLIENT_HEADERS) for url in two_services
    ]
    spec = example_spec(maxTrials=total, algorithm={"name": "random", "seed": 3})
    clients[0].put(f"/v1/experiments/{UID}", json={"name": "h", "namespace": "ns", "spec": spec})
    lock = threading.Lock()
    live: set[int] = set()  # handed out and not yet being finished
    claimed: set[int] = set()  # taken by a worker (a pending trial may be handed out twice)
    peak = [0]
    finished: list[int] = []
    errors: list[str] = []

    def worker(i: int) -> None:
        client = clients[i % 2]
        try:
            while True:
                answer = client.post(
                    f"/v1/experiments/{UID}/ask",
                    json={"count": 3, "parallelism": parallelism},
                ).json()
                with lock:
                    mine = [t["number"] for t in answer["trials"] if t["number"] not in claimed]
                    claimed.update(mine)
                    live.update(mine)
                    peak[0] = max(peak[0], len(live))
                if not mine:
                    if answer["exhausted"]:
                        return
                    time.sleep(0.005)
                    continue
                client.post(f"/v1/experiments/{UID}/start", json={"numbers": mine})
                for number in mine:
                    with lock:
                        live.discard(number)  # from here the service may free its slot
                    client.post(
                        f"/v1/experiments/{UID}/trials/{number}/finish",
                        json={"state": "failed"},
                    ).raise_for_status()
                    with lock:
                        finished.append(number)
        except Exception as exc:  # reported below: a thread's failure must fail the test
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for c in clients:
        c.close()
    assert not errors
    assert sorted(finished) == list(range(total))
    assert 1 < peak[0] <= parallelism
