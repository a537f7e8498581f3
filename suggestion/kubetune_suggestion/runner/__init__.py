"""``kubetune run``: an Experiment manifest run on one machine, trials as local processes.

- :mod:`.manifest` reads and validates the manifest (errors name the field);
- :mod:`.launch` checks the template's container and renders a trial's command and environment;
- :mod:`.process` starts, watches and stops one trial process;
- :mod:`.outcome` decides, purely, how a trial and the experiment ended;
- :mod:`.progress` renders the live table and the plain progress lines;
- :mod:`.reporter` delivers each trial's reports to the in-process service;
- :mod:`.files` names the experiment's files and holds its lock (one run at a time);
- :mod:`.resume` takes over the trials an interrupted run left;
- :mod:`.result` says how a run ended, or where a stored experiment stands;
- :mod:`.curves` lays out every trial's reports for ``kubetune curves``;
- :mod:`.run` drives it all through the in-process ``TuningService``.
"""

from kubetune_suggestion.runner.files import RunnerBusy, RunPaths
from kubetune_suggestion.runner.manifest import Manifest, experiment_uid, load_manifest
from kubetune_suggestion.runner.result import RunResult
from kubetune_suggestion.runner.run import LocalRunner

__all__ = [
    "LocalRunner",
    "Manifest",
    "RunPaths",
    "RunResult",
    "RunnerBusy",
    "experiment_uid",
    "load_manifest",
]
