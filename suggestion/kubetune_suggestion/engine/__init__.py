"""The suggestion engine: search spaces, samplers and early-stopping rules.

Pure: no HTTP, no database, no Kubernetes. Every sampler and rule is a
function of its inputs (history, seed, JSON state), so the service can persist
the state and resume after a restart with the same behaviour.
"""
