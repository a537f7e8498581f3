"""A synthetic training run: a learning curve shaped by its hyperparameters.

``python -m kubetune_trials.synthetic --lr=0.003 --layers=4 --epochs=9``
"trains" for ``--epochs`` steps, sleeping ``--sleep`` seconds per step, and
reports ``val_loss`` and ``accuracy`` after every step through the metrics
file protocol. It needs nothing but the standard library, so e2e tests and
benchmarks run real Pods without a dataset, a GPU or a framework.

The landscape has a known optimum, so tests can check that a search found it:
``lr = 10**-2.5`` (about 0.00316), ``layers = 4``, ``dropout = 0.2``,
``optimizer = adam``; there the loss tends to :data:`BEST_LOSS`. Each step
brings the loss closer to the configuration's floor, faster with a larger
learning rate, as in real training, so early steps rank configurations
roughly the way the final ones do (the premise of ASHA and the median rule).

Noise is deterministic (seeded by the parameters and the step), so a rerun of
the same configuration reports the same numbers.

SIGTERM (a pruned trial's Pod being deleted) ends the run at once with exit
status 143, also as a container's PID 1, where a signal without a handler is
ignored and the deletion would wait out the Pod's grace period.

Flags for testing the operator's failure paths: ``--fail-at=N`` exits 1 after
step N, ``--no-objective`` reports only ``accuracy`` (the trial ends
MetricsUnavailable when the objective is val_loss), ``--format=kv`` writes
``name=value`` lines instead of JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

# The loss at the optimum after infinitely many steps.
BEST_LOSS = 0.05
BEST_LOG_LR = -2.5
BEST_LAYERS = 4
BEST_DROPOUT = 0.2
# The value every configuration starts from at step 0.
START_LOSS = 1.0
# The exit status after SIGTERM: 128 + the signal, as a shell reports it.
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(Exception):
    """SIGTERM arrived: the trial is being stopped."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextmanager
def stops_at_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def floor_loss(lr: float, layers: int, dropout: float, optimizer: str, momentum: float) -> float:
    """The loss a configuration converges to: a bowl around the optimum."""
    loss = BEST_LOSS
    loss += 0.08 * (math.log10(lr) - BEST_LOG_LR) ** 2
    loss += 0.02 * (layers - BEST_LAYERS) ** 2
    loss += 0.5 * (dropout - BEST_DROPOUT) ** 2
    if optimizer != "adam":
        # sgd is close to adam only with a high momentum.
        loss += 0.03 + 0.4 * (0.9 - momentum) ** 2
    return loss


def convergence_rate(lr: float, layers: int) -> float:
    """How fast the curve approaches its floor: faster with a larger step size, slower when deep."""
    speed = min(3.0, max(0.05, lr / 10.0**BEST_LOG_LR))
    return 0.35 * math.sqrt(speed) / (1 + 0.1 * layers)


def loss_at(step: int, floor: float, rate: float, noise: float, seed: str) -> float:
    """The validation loss after ``step`` steps (1-based), with deterministic noise."""
    digest = hashlib.sha256(f"{seed}/{step}".encode()).digest()
    jitter = (int.from_bytes(digest[:8], "big") / 2**64 - 0.5) * 2 * noise
    return max(0.0, floor + (START_LOSS - floor) * math.exp(-rate * step) + jitter)


def _report_json(step: int, **metrics: float) -> None:
    """The SDK's report(): one JSON line appended to $KUBETUNE_METRICS_FILE."""
    line = json.dumps({"step": step, **metrics}, separators=(",", ":")) + "\n"
    _append(line)


def _report_kv(step: int, **metrics: float) -> None:
    """The other form of the protocol: ``step=3 val_loss=0.21``."""
    line = " ".join([f"step={step}", *(f"{k}={v:.6g}" for k, v in metrics.items())]) + "\n"
    _append(line)


def _append(line: str) -> None:
    path = os.environ.get("KUBETUNE_METRICS_FILE")
    if not path:
        sys.stderr.write("report: " + line)
        return
    # One write per line in append mode: the collector never reads half a line.
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)


try:  # The SDK when installed (the repository's environment); else the copy above.
    from kubetune import report as _sdk_report
except ImportError:  # pragma: no cover - the stdlib-only image
    _sdk_report = _report_json


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (every hyperparameter has a default, so any subset can be tuned)."""
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trials.synthetic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate (> 0)")
    parser.add_argument("--layers", type=int, default=2, help="number of layers (>= 1)")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout in [0, 1)")
    parser.add_argument("--optimizer", default="adam", help="adam or sgd")
    parser.add_argument("--momentum", type=float, default=0.0, help="sgd momentum")
    parser.add_argument("--epochs", type=int, default=9, help="steps to run and report")
    parser.add_argument("--sleep", type=float, default=0.2, help="seconds per step")
    parser.add_argument("--noise", type=float, default=0.005, help="amplitude of the noise")
    parser.add_argument("--format", choices=["json", "kv"], default="json", help="line format")
    parser.add_argument("--fail-at", type=int, default=None, help="exit 1 after this step")
    parser.add_argument("--no-objective", action="store_true", help="never report val_loss")
    args = parser.parse_args(argv)
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.layers < 1 or args.epochs < 1:
        parser.error("--layers and --epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulated training; the exit status is the trial's outcome."""
    with stops_at_sigterm():
        try:
            return _train(parse_args(argv))
        except Terminated:
            print("synthetic trial: stopped by SIGTERM", file=sys.stderr, flush=True)
            return EXIT_TERMINATED


def _train(args: argparse.Namespace) -> int:
    floor = floor_loss(args.lr, args.layers, args.dropout, args.optimizer, args.momentum)
    rate = convergence_rate(args.lr, args.layers)
    seed = f"{args.lr!r}/{args.layers}/{args.dropout!r}/{args.optimizer}/{args.momentum!r}"
    report = _report_kv if args.format == "kv" else _sdk_report
    print(
        f"synthetic trial: lr={args.lr:g} layers={args.layers} dropout={args.dropout:g} "
        f"optimizer={args.optimizer} momentum={args.momentum:g} epochs={args.epochs}",
        flush=True,
    )
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # logs appear live
    for step in range(1, args.epochs + 1):
        time.sleep(args.sleep)
        val_loss = loss_at(step, floor, rate, args.noise, seed)
        accuracy = max(0.0, min(1.0, 1.0 - val_loss))
        if args.no_objective:
            report(step, accuracy=accuracy)
        else:
            report(step, val_loss=val_loss, accuracy=accuracy)
        print(f"epoch {step}/{args.epochs} val_loss={val_loss:.4f} accuracy={accuracy:.4f}")
        if args.fail_at is not None and step >= args.fail_at:
            print(f"simulated failure after epoch {step}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
