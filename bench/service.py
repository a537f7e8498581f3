"""Benchmark of the suggestion service against Optuna's RDB storages.

One command, one table:

    source .ci/postgres.sh && python bench/service.py

1. Suggest-and-report round trip through HTTP with PostgreSQL, at 100, 1,000
   and 10,000 completed trials, two ways side by side (alternating in blocks
   of ten): ``POST ask {count: 1}`` + ``POST finish`` with the final metrics
   and the trial token (ask + tell), and ``POST ask`` + ``POST observations``
   (the objective, with the trial token) + ``POST finish`` (a trial with one
   report); on one keep-alive connection, against one ``kubetune-service``
   process. Completed trials are
   prefilled directly through the store. The sampler is TPE when registered,
   else random (the table says which). Next to it, in the same run: Optuna's
   ``study.ask`` + ``study.tell`` (TPE, same search space, same prefilled
   counts via ``add_trials``) with ``RDBStorage`` on SQLite and on PostgreSQL.
   The engine's own in-process ``suggest`` time at each count is shown too,
   so the service's overhead can be read off.
2. Observation ingestion: 50 concurrent reporters (one trial each, one
   keep-alive connection each) posting observations into PostgreSQL through
   ``kubetune-service --workers N``; reports per second.

Each PostgreSQL measurement runs in a fresh schema of the server at
``KUBETUNE_TEST_POSTGRES_URL`` (default: the one ``.ci/postgres.sh`` starts).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kubetune_suggestion.engine.history import RecordState, TrialRecord
from kubetune_suggestion.engine.samplers import SAMPLERS, make_sampler
from kubetune_suggestion.service.testing import API_KEY, free_port
from kubetune_suggestion.spec import parse_experiment
from kubetune_suggestion.store import Store
from kubetune_suggestion.store.testing import postgres_schema

DEFAULT_PG = "postgresql+psycopg://kubetune:kubetune@127.0.0.1:5432/kubetune"
UID = "bench"
SPEC: dict[str, Any] = {
    "objective": {"metric": "loss", "direction": "minimize"},
    "parameters": [
        {"name": "lr", "type": "float", "min": 1e-4, "max": 1e-1, "log": True},
        {"name": "layers", "type": "int", "min": 1, "max": 4},
        {"name": "opt", "type": "categorical", "values": ["adam", "sgd"]},
    ],
    "maxTrials": 100_000,
    "template": {"spec": {"containers": [{"name": "train", "image": "trial:1"}]}},
}


def loss(params: dict[str, Any]) -> float:
    """A cheap synthetic objective over the benchmark space."""
    lr = float(params["lr"])
    return (
        (lr - 0.01) ** 2 * 1e3
        + 0.1 * int(params["layers"])
        + (0.05 if params["opt"] == "sgd" else 0.0)
    )


def percentiles(samples: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p99 * 1000


def prefill_configs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` random configurations of the benchmark space."""
    space = parse_experiment(SPEC).search_space()
    return make_sampler("random", space, "minimize", seed).suggest([], n, None).configs


@contextmanager
def service_process(db_url: str, workers: int = 1) -> Iterator[tuple[int, int]]:
    """A ``kubetune-service`` on a free port (its database migrated); yields (port, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("KUBETUNE_SECRET",)}
    env["KUBETUNE_API_KEY"] = API_KEY
    cmd = [sys.executable, "-m", "kubetune_suggestion.service", "--db", db_url, "--port", str(port)]
    cmd += ["--metrics-port", str(free_port())]
    cmd += ["--workers", str(workers), "--log-level", "warning"]
    # Its own session: the CPU of its worker processes is summed by session id.
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError("kubetune-service exited")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("kubetune-service did not become ready")
            time.sleep(0.1)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(20)


def _proc_cpu(select: Callable[[list[str]], bool]) -> float:
    """CPU seconds (user + system) of the processes whose /proc stat fields ``select`` picks."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces: split after its closing parenthesis.
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = [comm, *raw[raw.rindex(")") + 2 :].split()]
        if select(fields):
            total += (int(fields[12]) + int(fields[13])) / tick
    return total


def session_cpu(session_id: int) -> float:
    """CPU seconds of every live process in session ``session_id``."""
    return _proc_cpu(lambda f: int(f[4]) == session_id)


def postgres_cpu() -> float:
    """CPU seconds of every live PostgreSQL server process (backends come and go: see notes)."""
    return _proc_cpu(lambda f: f[0] == "postgres" or f[0].startswith("postgres:"))


class Http:
    """A minimal keep-alive JSON client (stdlib), so the client's cost stays small."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """One request; the decoded JSON answer (or None for 204)."""
        # The trial's token for its own reports, else the service's API key.
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or API_KEY}",
        }
        payload = None if body is None else json.dumps(body)
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data) if data else None


# The two ways a trial's life can go through the API, measured side by side.
TELL = "tell"  # ask, then finish with the final metrics: two requests, as Optuna's ask + tell
REPORTED = "reported"  # ask, report, finish: three requests, as a trial with one report
BLOCK = 10  # round trips of one way before switching to the other


def _round_trip(client: Http, way: str) -> None:
    trial = client.call("POST", f"/v1/experiments/{UID}/ask", {"count": 1})["trials"][0]
    number = trial["number"]
    metrics = {"loss": loss(trial["params"])}
    finish = f"/v1/experiments/{UID}/trials/{number}/finish"
    if way == TELL:
        body = {"state": "succeeded", "step": 1, "metrics": metrics}
        client.call("POST", finish, body, trial["token"])
        return
    client.call(
        "POST",
        f"/v1/experiments/{UID}/trials/{number}/observations",
        {"step": 1, "metrics": metrics},
        trial["token"],
    )
    client.call("POST", finish, {"state": "succeeded"})


def kubetune_round_trips(
    pg_url: str, algorithm: str, n: int, rounds: int, warmup: int
) -> dict[str, tuple[list[float], float]]:
    """Round-trip times (s) through HTTP at ``n`` prefilled completed trials, by way.

    Both ways (:data:`TELL`, :data:`REPORTED`) run ``rounds`` times each on one
    service and experiment, alternating in blocks of :data:`BLOCK`, so that a
    change of the machine's speed touches both alike. With each way's times,
    its CPU seconds per measured round trip (service + PostgreSQL + this
    client), read between blocks.
    """
    times: dict[str, list[float]] = {TELL: [], REPORTED: []}
    cpu: dict[str, float] = {TELL: 0.0, REPORTED: 0.0}
    with postgres_schema(pg_url) as url:
        store = Store.open(url)
        spec = SPEC | {"algorithm": {"name": algorithm, "seed": 1}}
        with service_process(url) as (port, pid):
            client = Http(port)
            client.call(
                "PUT",
                f"/v1/experiments/{UID}",
                {"name": "bench", "namespace": "bench", "spec": spec},
            )
            row = store.experiment(UID)
            assert row is not None
            configs = prefill_configs(n)
            store.bulk_insert_finished(row.id, [(i, c, loss(c)) for i, c in enumerate(configs)])
            store.close()
            for i in range(warmup):
                _round_trip(client, (TELL, REPORTED)[i % 2])
            block = 0
            while min(len(t) for t in times.values()) < rounds:
                way = (TELL, REPORTED)[block % 2]
                block += 1
                size = min(BLOCK, rounds - len(times[way]))
                before = session_cpu(pid) + postgres_cpu() + time.process_time()
                for _ in range(size):
                    start = time.perf_counter()
                    _round_trip(client, way)
                    times[way].append(time.perf_counter() - start)
                cpu[way] += session_cpu(pid) + postgres_cpu() + time.process_time() - before
    return {way: (times[way], cpu[way] / max(1, rounds)) for way in times}


def engine_suggest_times(algorithm: str, n: int, rounds: int) -> list[float]:
    """The engine's in-process ``suggest(history, 1)`` time at ``n`` completed trials."""
    space = parse_experiment(SPEC).search_space()
    history = [
        TrialRecord(i, c, RecordState.SUCCEEDED, loss(c)) for i, c in enumerate(prefill_configs(n))
    ]
    sampler = make_sampler(algorithm, space, "minimize", 1)
    state = None
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        state = sampler.suggest(history, 1, state).state
        times.append(time.perf_counter() - start)
    return times


def optuna_round_trips(
    storage_url: str, n: int, rounds: int, warmup: int
) -> tuple[list[float], float]:
    """Optuna ``ask`` + ``tell`` times (s) with ``RDBStorage`` at ``n`` prefilled trials.

    Also the CPU seconds per measured ask+tell (this process + PostgreSQL).
    """
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {
        "lr": FloatDistribution(1e-4, 1e-1, log=True),
        "layers": IntDistribution(1, 4),
        "opt": CategoricalDistribution(["adam", "sgd"]),
    }
    study = optuna.create_study(
        storage=optuna.storages.RDBStorage(storage_url),
        sampler=optuna.samplers.TPESampler(seed=1),
        direction="minimize",
    )
    study.add_trials(
        [
            optuna.trial.create_trial(params=c, distributions=distributions, value=loss(c))
            for c in prefill_configs(n)
        ]
    )
    times = []
    cpu_before = 0.0
    for i in range(warmup + rounds):
        if i == warmup:
            cpu_before = postgres_cpu() + time.process_time()
        start = time.perf_counter()
        trial = study.ask(distributions)
        study.tell(trial, loss(trial.params))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, (postgres_cpu() + time.process_time() - cpu_before) / max(1, rounds)


async def _reporter(port: int, number: int, token: str, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = f"/v1/experiments/{UID}/trials/{number}/observations"
    step = 0
    try:
        while time.monotonic() < deadline:
            step += 1
            body = json.dumps(
                {"step": step, "metrics": {"loss": 1.0 / step, "accuracy": 0.5}}
            ).encode()
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            if status != 200:
                raise RuntimeError(f"report answered {status}")
            counts[0] += 1
    finally:
        writer.close()


def ingestion(pg_url: str, reporters: int, seconds: float, workers: int) -> dict[str, float]:
    """Reports/s with ``reporters`` concurrent reporters for ``seconds``, and CPU per report."""
    with postgres_schema(pg_url) as url, service_process(url, workers) as (port, pid):
        client = Http(port)
        spec = SPEC | {"algorithm": {"name": "random", "seed": 1}}
        client.call(
            "PUT", f"/v1/experiments/{UID}", {"name": "bench", "namespace": "bench", "spec": spec}
        )
        trials = client.call("POST", f"/v1/experiments/{UID}/ask", {"count": reporters})["trials"]
        client.conn.close()
        counts = [0]

        async def run() -> float:
            start = time.monotonic()
            deadline = start + seconds
            await asyncio.gather(
                *(_reporter(port, t["number"], t["token"], deadline, counts) for t in trials)
            )
            return time.monotonic() - start

        service_before, pg_before, client_before = (
            session_cpu(pid),
            postgres_cpu(),
            time.process_time(),
        )
        elapsed = asyncio.run(run())
        service_cpu = session_cpu(pid) - service_before
        pg_cpu = postgres_cpu() - pg_before
        client_cpu = time.process_time() - client_before
        history = Http(port).call("GET", f"/v1/experiments/{UID}/trials?observations=true")
        stored = sum(len(t["observations"]) for t in history)
        n = max(1, counts[0])
        return {
            "rate": counts[0] / elapsed,
            "acknowledged": counts[0],
            "stored": stored,
            "service_ms": service_cpu / n * 1000,
            "postgres_ms": pg_cpu / n * 1000,
            "client_ms": client_cpu / n * 1000,
        }


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(_row(header, widths))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(_row(r, widths))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="100,1000,10000", help="completed trials to prefill")
    parser.add_argument("--rounds", type=int, default=100, help="measured round trips per cell")
    parser.add_argument(
        "--optuna-rounds-10k", type=int, default=20, help="Optuna rounds at >= 10,000 trials"
    )
    parser.add_argument("--reporters", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="ingestion duration")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers for ingestion")
    parser.add_argument("--skip-optuna", action="store_true")
    args = parser.parse_args(argv)
    pg_url = os.environ.get("KUBETUNE_TEST_POSTGRES_URL") or DEFAULT_PG
    algorithm = "tpe" if "tpe" in SAMPLERS else "random"
    counts = [int(c) for c in args.counts.split(",")]
    print(f"# suggestion service benchmark ({os.cpu_count()} cores, sampler: {algorithm})\n")

    rows: list[list[str]] = []
    cpu_rows: list[list[str]] = []
    fmt: Callable[[Sequence[float]], str] = lambda ts: "{:.1f} / {:.1f}".format(*percentiles(ts))  # noqa: E731
    for n in counts:
        rounds = args.rounds
        optuna_rounds = args.optuna_rounds_10k if n >= 10_000 else args.rounds
        row = [f"{n:,}"]
        measured = kubetune_round_trips(pg_url, algorithm, n, rounds, warmup=6)
        ours = measured[TELL][0]
        row += [fmt(measured[TELL][0]), fmt(measured[REPORTED][0])]
        row.append(fmt(engine_suggest_times(algorithm, n, min(rounds, 30))))
        cpu_row = [f"{n:,}", *(f"{measured[w][1] * 1000:.1f}" for w in (TELL, REPORTED))]
        ratios = []
        if args.skip_optuna:
            row += ["-", "-"]
            cpu_row += ["-", "-"]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                theirs, theirs_cpu = optuna_round_trips(
                    f"sqlite:///{Path(tmp) / 'optuna.db'}", n, optuna_rounds, 2
                )
                row.append(fmt(theirs))
                cpu_row.append(f"{theirs_cpu * 1000:.1f}")
                ratios.append(statistics.median(theirs) / statistics.median(ours))
            with postgres_schema(pg_url) as url:
                theirs, theirs_cpu = optuna_round_trips(url, n, optuna_rounds, 2)
                row.append(fmt(theirs))
                cpu_row.append(f"{theirs_cpu * 1000:.1f}")
                ratios.append(statistics.median(theirs) / statistics.median(ours))
        row.append(" / ".join(f"{r:.1f}x" for r in ratios) or "-")
        rows.append(row)
        cpu_rows.append(cpu_row)
        print(f"  measured {n:,} trials", file=sys.stderr)
    print(
        "Suggest-and-report round trip, milliseconds, p50 / p99. kubetune over HTTP with "
        "PostgreSQL, two ways side by side (alternating): ask + tell (finish with the final "
        "metrics, as Optuna's ask + tell) and ask + report + finish (a trial with one "
        "report). The ratio compares Optuna with ask + tell:\n"
    )
    print_table(
        [
            "completed trials",
            f"kubetune ask + tell ({algorithm})",
            f"kubetune ask + report + finish ({algorithm})",
            f"of which engine suggest ({algorithm})",
            "Optuna ask+tell, SQLite (TPE)",
            "Optuna ask+tell, PostgreSQL (TPE)",
            "Optuna p50 / ours (SQLite / PostgreSQL)",
        ],
        rows,
    )
    print(
        "\nCPU per round trip, milliseconds (every process involved: for kubetune the "
        "service, PostgreSQL and this client; for Optuna this process and PostgreSQL). "
        "On an idle machine a round trip takes about this long plus the commits' fsyncs:\n"
    )
    print_table(
        [
            "completed trials",
            "kubetune ask + tell",
            "kubetune ask + report + finish",
            "Optuna, SQLite",
            "Optuna, PostgreSQL",
        ],
        cpu_rows,
    )
    result = ingestion(pg_url, args.reporters, args.seconds, args.workers)
    server_ms = result["service_ms"] + result["postgres_ms"]
    print(
        f"\nObservation ingestion into PostgreSQL: {args.reporters} concurrent reporters, "
        f"{args.workers} uvicorn workers, {args.seconds:g} s:\n\n"
        f"- measured: {result['rate']:,.0f} reports/s ({result['acknowledged']:,.0f} acknowledged, "
        f"{result['stored']:,.0f} stored)\n"
        f"- CPU per report: service {result['service_ms']:.2f} ms + PostgreSQL "
        f"{result['postgres_ms']:.2f} ms (load generator {result['client_ms']:.2f} ms)\n"
        f"- so 2 cores given to the service and PostgreSQL alone sustain about "
        f"{2000 / server_ms:,.0f} reports/s\n"
        f"- load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
