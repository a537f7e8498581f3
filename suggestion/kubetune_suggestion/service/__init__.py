"""The suggestion service: the engine and the store behind an HTTP API.

See ``CONTRACT.md`` beside this file for the names other components use.
"""
