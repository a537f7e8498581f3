"""Alembic migrations of the observation store (run by :mod:`kubetune_suggestion.store.migrate`)."""
