"""``kubetune run``: an Experiment manifest run on one machine, trials as local processes.

- :mod:`.manifest` reads and validates the manifest (errors name the field);
- :mod:`.process` starts, watches and stops one trial process;
- :mod:`.outcome` decides, purely, how a trial and the experiment ended;
- :mod:`.progress` renders the live table and the plain progress lines;
- :mod:`.reporter` delivers each trial's reports to the in-process service;
- :mod:`.curves` lays out every trial's reports for ``kubetune curves``;
- :mod:`.run` drives it all through the in-process ``TuningService``.
"""

from kubetune_suggestion.runner.manifest import Manifest, experiment_uid, load_manifest
from kubetune_suggestion.runner.run import LocalRunner, RunnerBusy, RunPaths, RunResult

__all__ = [
    "LocalRunner",
    "Manifest",
    "RunPaths",
    "RunResult",
    "RunnerBusy",
    "experiment_uid",
    "load_manifest",
]
