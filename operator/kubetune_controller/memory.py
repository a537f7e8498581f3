"""What the operator process remembers about an experiment between reconciles.

Only an optimisation or a hint: all of it is rebuilt from the cluster and the
service after a restart, so the process may be killed at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kubetune_suggestion.spec import ExperimentSpec


@dataclass
class ExperimentMemory:
    """What this process remembers about one experiment between reconciles."""

    uid: str
    # The spec generation last registered with the service.
    registered: int = -1
    # The service said no trial will ever be allocated again (reset on edits).
    exhausted: bool = False
    # Stop orders received and not yet recorded on their Trials: number -> reason.
    stops: dict[int, str] = field(default_factory=dict)
    # Why the experiment ended (its live trials are stopped), once it has.
    ending: str | None = None
    # Trials with a task of their own running (creating, finishing, stopping):
    # a later reconcile leaves them alone until it is done.
    in_flight: set[int] = field(default_factory=set)
    # When running trials' last steps were last copied from the service.
    steps_copied: float = 0.0
    # The spec of the generation last registered (what a Pod's end is
    # settled with between reconciles).
    spec: ExperimentSpec | None = None
    # A template that cannot be rendered: the experiment fails until edited.
    template_error: str | None = None
    template_error_generation: int = -1
    # When the Experiment's status was last written (monotonic seconds).
    status_written: float = -1e9
