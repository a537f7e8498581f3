"""Builders of the views and specs the pure controller code takes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_controller.model import (
    ContainerEnd,
    ExperimentResource,
    PodResource,
    TrialPhase,
    TrialResource,
)
from kubetune_controller.reconcile import Progress

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def spec_dict(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "objective": {"metric": "val_loss", "direction": "minimize"},
        "parameters": [
            {"name": "lr", "type": "float", "min": 1e-5, "max": 1e-1, "log": True},
            {"name": "layers", "type": "int", "min": 1, "max": 6},
            {"name": "optimizer", "type": "categorical", "values": ["adam", "sgd"]},
            {
                "name": "momentum",
                "type": "float",
                "min": 0.5,
                "max": 0.99,
                "when": {"optimizer": "sgd"},
            },
        ],
        "maxTrials": 10,
        "parallelism": 3,
        "template": {
            "metadata": {"labels": {"team": "ml"}},
            "spec": {
                "containers": [
                    {
                        "name": "train",
                        "image": "registry.example/trial:1",
                        "command": ["python", "-m", "kubetune_trials.synthetic"],
                        "args": [
                            "--lr=${params.lr}",
                            "--layers=${params.layers}",
                            "--momentum=${params.momentum}",
                        ],
                        "env": [{"name": "OPT", "value": "${params.optimizer}"}],
                        "resources": {"limits": {"nvidia.com/gpu": 1}},
                    }
                ]
            },
        },
    }
    spec.update(overrides)
    return spec


def experiment(
    status: dict[str, Any] | None = None, generation: int = 1, **spec: Any
) -> ExperimentResource:
    return ExperimentResource(
        namespace="ns",
        name="exp",
        uid="uid-1",
        generation=generation,
        spec=spec_dict(**spec),
        status=status or {},
    )


def trial(
    number: int,
    phase: TrialPhase | None = TrialPhase.RUNNING,
    age: float = 60.0,
    stop_reason: str | None = None,
    message: str | None = None,
) -> TrialResource:
    return TrialResource(
        namespace="ns",
        name=f"exp-{number}",
        uid=f"t-{number}",
        experiment="exp",
        number=number,
        pod_name=f"exp-{number}",
        phase=phase,
        created=NOW - timedelta(seconds=age),
        stop_reason=stop_reason,
        message=message,
    )


def pod(
    number: int,
    phase: str = "Running",
    deleting: bool = False,
    exit_code: int | None = None,
    waiting: str | None = None,
) -> PodResource:
    ends = ()
    if exit_code is not None:
        ends = (ContainerEnd("train", exit_code, "Error" if exit_code else "Completed", None),)
    return PodResource(
        namespace="ns",
        name=f"exp-{number}",
        uid=f"p-{number}",
        phase=phase,
        deleting=deleting,
        waiting_message=waiting,
        ended_containers=ends,
    )


def progress(**kw: Any) -> Progress:
    base: dict[str, Any] = {
        "done": 0,
        "started": 0,
        "pending": 0,
        "succeeded": 0,
        "failed": 0,
        "pruned": 0,
        "metrics_unavailable": 0,
        "best_number": None,
        "best_objective": None,
    }
    base.update(kw)
    return Progress(**base)
