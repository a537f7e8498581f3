"""The ``kubetune`` command line: run an Experiment manifest on this machine and inspect it.

::

    kubetune run experiment.yaml [--dir .kubetune] [-o table|json]
    kubetune status experiment.yaml|NAME [--dir .kubetune] [-o table|json]
    kubetune trials experiment.yaml|NAME [--dir .kubetune] [-o table|json]
    kubetune curves experiment.yaml|NAME [--dir .kubetune] [-o table|csv|json]

Exit codes: 0 the experiment succeeded (or the command did its job), 1 the
experiment failed (too many failed trials, no result) or another run holds
it, 2 a bad manifest or command line (the message names the field), 130
interrupted by Ctrl-C (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

import sqlalchemy.exc

from kubetune_suggestion.runner.curves import csv_rows, curves_of, render_curves
from kubetune_suggestion.runner.files import RunnerBusy, RunPaths, experiment_lock
from kubetune_suggestion.runner.launch import trial_container
from kubetune_suggestion.runner.manifest import Manifest, experiment_uid, load_manifest
from kubetune_suggestion.runner.outcome import shown_state
from kubetune_suggestion.runner.progress import format_objective, format_params, make_display
from kubetune_suggestion.runner.result import RunResult, stored_result
from kubetune_suggestion.runner.run import LocalRunner
from kubetune_suggestion.service.errors import ServiceError
from kubetune_suggestion.service.models import TrialView
from kubetune_suggestion.spec import SpecError
from kubetune_suggestion.template import TemplateError, check_pod_spec

__all__ = ["main"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130
DEFAULT_DIR: Final = ".kubetune"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune",
        description="Hyperparameter tuning: run an Experiment manifest locally and inspect it.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    json_help = "table for people (default), json for scripts: one document at the end"

    def common(sub: argparse.ArgumentParser, formats: Sequence[str], output_help: str) -> None:
        sub.add_argument(
            "--dir",
            type=Path,
            default=Path(DEFAULT_DIR),
            help=f"where the store and trial logs live (default: ./{DEFAULT_DIR})",
        )
        sub.add_argument(
            "-o",
            "--output",
            choices=formats,
            default="table",
            help=output_help,
        )

    run = commands.add_parser(
        "run",
        help="run an Experiment manifest's trials as local processes",
        description="Run an Experiment manifest on this machine. Re-running the same "
        "manifest continues its experiment.",
    )
    run.add_argument("manifest", type=Path, help="the Experiment manifest (YAML)")
    common(run, ("table", "json"), json_help)
    run.add_argument(
        "--grace",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long a stopped trial gets between SIGTERM and SIGKILL (default: 5)",
    )
    for name, text, formats, output_help in (
        (
            "status",
            "summarise a local experiment: counts and best trial",
            ("table", "json"),
            json_help,
        ),
        ("trials", "list a local experiment's trials", ("table", "json"), json_help),
        (
            "curves",
            "learning curves: every value each trial reported, step by step",
            ("table", "csv", "json"),
            "table for people (default), csv (one row per trial and step) or json "
            "(the trials -o json documents with their observations) for scripts",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("experiment", help="the Experiment manifest or the experiment's name")
        common(sub, formats, output_help)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:  # rejects NaN too
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("kubetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kubetune`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.manifest, args.dir, args.output, args.grace)
        return _inspect(args.command, args.experiment, args.dir, args.output)
    except SpecError as exc:
        return _error(f"{exc.field}: {exc.problem}", EXIT_USAGE)
    except TemplateError as exc:
        return _error(f"{exc.field}: {exc.problem}", EXIT_USAGE)
    except RunnerBusy as exc:
        return _error(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`kubetune trials | head`): stop quietly, like
        # any Unix tool, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        # Typically a read-only or missing --dir (lock file, logs, metrics files).
        where = f"{exc.filename}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc} (--dir {args.dir})", EXIT_USAGE)
    except sqlalchemy.exc.OperationalError as exc:
        # SQLite writes even to read (its WAL files), so a read-only store fails here.
        problem = str(exc.orig or exc).splitlines()[0]
        return _error(
            f"the store under --dir {args.dir}: {problem} (SQLite writes even to read: "
            "the folder and its files must be writable)",
            EXIT_USAGE,
        )


def _error(message: str, code: int) -> int:
    print(f"kubetune: error: {message}", file=sys.stderr, flush=True)
    return code


# -- run -------------------------------------------------------------------------


def _run(manifest_path: Path, root: Path, output: str, grace: float) -> int:
    manifest = load_manifest(manifest_path)
    declared = [p.name for p in manifest.spec.parameters]
    check_pod_spec(manifest.spec.template.get("spec") or {}, declared)
    trial_container(manifest)
    paths = RunPaths(root, manifest.name)
    from kubetune_suggestion.service.core import TuningService  # heavy: after validation

    with experiment_lock(paths):
        service = TuningService.open(paths.database_url)
        try:
            runner = LocalRunner(
                manifest,
                service,
                paths,
                make_display(output),
                lambda number: service.token(manifest.uid, number),
                grace=grace,
            )

            def on_signal(signum: int, frame: FrameType | None) -> None:
                runner.interrupt()

            previous = {
                sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                result = runner.run()
            except ServiceError as exc:
                where = f"{exc.field}: " if exc.field else ""
                hint = ""
                if exc.code == "conflict":
                    hint = (
                        f" (the store {paths.database} holds this experiment with another "
                        "spec; rename the experiment or delete the store to start over)"
                    )
                return _error(f"{where}{exc.message}{hint}", EXIT_USAGE)
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            service.close()
    if output == "json":
        print(json.dumps(result.to_json(), indent=2, sort_keys=False))
    else:
        _print_result(result, manifest_path, sys.stdout)
    return result.exit_code


def _print_result(result: RunResult, manifest_path: Path, out: TextIO) -> None:
    summary = result.summary
    if result.status == "interrupted":
        out.write(
            f"\nInterrupted after {result.elapsed or 0:.1f}s; {summary.done}/{summary.max_trials} "
            f"trials done. Run the same command to continue:\n"
            f"  kubetune run {_quote(manifest_path)} --dir {_quote(result.paths.root)}\n"
        )
        return
    verdict = "succeeded" if result.status == "succeeded" else "FAILED"
    out.write(
        f"\nExperiment {result.name} {verdict} after {result.elapsed or 0:.1f}s: {result.reason}\n"
        f"  {_counts_text(result)}\n"
    )
    if summary.best is None:
        out.write(f"  no trial reported {result.metric}\n")
    else:
        best = summary.best
        out.write(f"  best: trial {best.number}, {result.metric} = {best.objective:.6g}\n")
        width = max((len(name) for name in best.params), default=0)
        for name, value in best.params.items():
            out.write(f"    {name:<{width}} = {value}\n")
    out.write(
        f"  store: {result.paths.database}   logs: {result.paths.trials}/\n"
        f"  history: kubetune trials {_quote(manifest_path)} --dir {_quote(result.paths.root)}\n"
    )
    out.flush()


def _quote(path: Path) -> str:
    # The hints are commands to paste: a path with a space must stay one word.
    return shlex.quote(str(path))


def _counts_text(result: RunResult) -> str:
    counts = result.counts
    parts = [f"{counts.get(state, 0)} {state.replace('_', ' ')}" for state in _STATE_ORDER]
    shown = [p for p, state in zip(parts, _STATE_ORDER, strict=True) if counts.get(state, 0)]
    done = f"{result.summary.done}/{result.summary.max_trials} trials done: "
    return done + (", ".join(shown) or "none yet")


_STATE_ORDER: Final = (
    "succeeded",
    "pruned",
    "failed",
    "metrics_unavailable",
    "running",
    "interrupted",
    "pending",
)
# How `kubetune status` words each status.
_VERDICTS: Final = {"succeeded": "succeeded", "failed": "FAILED"}


# -- status and trials ------------------------------------------------------------


def _resolve(experiment: str, root: Path) -> tuple[str, Manifest | None]:
    path = Path(experiment)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        manifest = load_manifest(path)
        return manifest.name, manifest
    return experiment, None


def _inspect(command: str, experiment: str, root: Path, output: str) -> int:
    name, _ = _resolve(experiment, root)
    paths = RunPaths(root, name)
    if not paths.database.exists():
        return _error(f"no local experiment {name!r} under {root} ({paths.database} is missing)", 2)
    from kubetune_suggestion.service.core import TuningService  # heavy: after validation

    service = TuningService.open(paths.database_url)
    try:
        uid = experiment_uid(name)
        try:
            summary = service.summary(uid)
            trials = service.trials(uid, observations=command == "curves")
            spec = service.experiment_spec(uid)
        except ServiceError as exc:
            return _error(exc.message, EXIT_USAGE)
    finally:
        service.close()
    result = stored_result(name, summary, trials, spec, paths)
    if command == "status":
        _print_status(result, output)
    elif command == "trials":
        _print_trials(trials, result, output)
    else:
        _print_curves(trials, result, output)
    return EXIT_OK


def _print_status(result: RunResult, output: str) -> None:
    if output == "json":
        print(json.dumps(result.to_json(), indent=2))
        return
    verdict = _VERDICTS.get(result.status, result.status)
    print(f"Experiment {result.name} {verdict}: {result.reason}")
    print(f"  {_counts_text(result)}")
    if result.summary.best is not None:
        best = result.summary.best
        print(
            f"  best: trial {best.number}, {result.metric} = {best.objective:.6g}  "
            f"{format_params(best.params)}"
        )
    print(f"  store: {result.paths.database}")


def _trial_documents(trials: list[TrialView], result: RunResult) -> list[dict[str, Any]]:
    documents = [t.model_dump(mode="json") for t in trials]
    for document in documents:
        document["state"] = shown_state(document["state"], runner_alive=result.status == "running")
    return documents


def _print_trials(trials: list[TrialView], result: RunResult, output: str) -> None:
    documents = _trial_documents(trials, result)
    if output == "json":
        print(json.dumps(documents, indent=2))
        return
    summary = result.summary
    best = summary.best.number if summary.best is not None else None
    rows = [("trial", "state", result.metric, "step", "params", "note")]
    # The note's further lines (a failed trial's last log lines), under its row.
    details: list[list[str]] = [[]]
    for t, document in zip(trials, documents, strict=True):
        lines = (t.stop_reason or t.message or "").splitlines()
        mark = "*" if t.number == best else ""
        rows.append(
            (
                f"{t.number}{mark}",
                document["state"],
                format_objective(t.objective),
                "-" if t.last_step is None else str(t.last_step),
                format_params(t.params),
                lines[0] if lines else "",
            )
        )
        details.append(lines[1:])
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row, more in zip(rows, details, strict=True):
        cells = [row[i].ljust(widths[i]) if i != 2 else row[i].rjust(widths[i]) for i in range(5)]
        print("  ".join([*cells, row[5]]).rstrip())
        for line in more:
            print(f"    {line}")
    if best is not None:
        print(f"* best trial ({summary.name})")


def _print_curves(trials: list[TrialView], result: RunResult, output: str) -> None:
    if output == "json":
        # The `trials -o json` documents, each with its "observations".
        print(json.dumps(_trial_documents(trials, result), indent=2))
        return
    curves = curves_of(trials, result.metric, runner_alive=result.status == "running")
    if output == "csv":
        csv.writer(sys.stdout, lineterminator="\n").writerows(csv_rows(curves))
        return
    best = result.summary.best.number if result.summary.best is not None else None
    print("\n".join(render_curves(curves, best)))


if __name__ == "__main__":
    sys.exit(main())
