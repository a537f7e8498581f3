"""The suggestion engine: search spaces, samplers and early-stopping rules.

Pure: no HTTP, no database, no Kubernetes. Every sampler and rule is a
function of its inputs (history, seed, JSON state), so the service can persist
the state and resume after a restart with the same behaviour.

What is reproducible. A sampler's suggestion depends on its seed, its JSON
state (which counts the calls before it) and the history's content, not on
the history's order, the record objects, the process or the instance (see
tests/suggestion/engine/test_reproducibility.py); a rule's decision depends on
the history's curves alone. So a seeded experiment repeats exactly at
parallelism 1 when every trial gives the same results: the same values, and a
stopped trial recorded with the value of the report its stop was decided on.
In parallel it does not: which trials have finished, and with which curves so
far, when a suggestion or a stop is decided depends on timing, and so do the
suggestions after it.
"""
