"""Shared fixtures: tiny SD-shaped checkpoints on disk, an isolated hash cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_hash_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SDMERGE_HASH_CACHE", str(tmp_path_factory.getbasetemp() / "hashes.sqlite3"))


@pytest.fixture
def make_model(tmp_path: Path):
    """Write a tiny checkpoint into tmp_path/models and return its path."""
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)

    def make(name: str, architecture: str = "sd2", *, seed: int = 0, state: dict | None = None,
             metadata: dict | None = None, **kwargs) -> Path:
        path = folder / name
        write_checkpoint(path, state if state is not None else tiny_state_dict(architecture, seed=seed, **kwargs),
                         metadata)
        return path

    return make


@pytest.fixture
def write_recipe(tmp_path: Path):
    def write(recipe: dict, name: str = "recipe.json") -> Path:
        path = tmp_path / name
        path.write_text(json.dumps(recipe))
        return path

    return write
