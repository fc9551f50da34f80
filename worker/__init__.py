"""Celery side of the service: thin tasks that load a row, call the engine, record the outcome."""
