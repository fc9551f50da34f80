"""Alembic migrations; run by `sdmerge db upgrade` and at the start of `serve` and `worker`."""
