"""Service fixtures: settings in a temp data dir, a database migrated by Alembic (SQLite or a
real PostgreSQL), the API in-process, and a drain that runs queued tasks with the real worker
code straight from the real (filesystem) broker.

PostgreSQL comes from SDMERGE_TEST_POSTGRES_URL (scripts/services.sh sets it for `make test`).
Without it the Postgres variants fail, unless SDMERGE_TEST_ALLOW_SKIP=1 makes them skip.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app.db import normalize_url
from app.settings import settings_from_env

SERVICE_TABLES = ("merge_shards", "jobs", "artifacts", "models", "analyses", "previews", "studies", "study_rounds")
SEEDS = (1, 2, 3, 4)
# Eight tiny SDXL inputs averaged in fp64 take a few tenths of a second: long enough to cancel
# or kill a merge midway (the engine checks for a cancel every 0.1 s).
SLOW_SEEDS = tuple(range(1, 9))


def _require(var: str) -> str:
    value = os.environ.get(var)
    if value:
        return value
    if os.environ.get("SDMERGE_TEST_ALLOW_SKIP") == "1":
        pytest.skip(f"{var} is not set (SDMERGE_TEST_ALLOW_SKIP=1)")
    pytest.fail(f"{var} is not set: run the suite with `make test` (scripts/services.sh starts "
                "PostgreSQL and Redis), or set SDMERGE_TEST_ALLOW_SKIP=1 to skip these tests")


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    return _require("SDMERGE_TEST_POSTGRES_URL")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _require("SDMERGE_TEST_REDIS_URL")


def create_database(server_url: str, prefix: str = "sdmerge_test") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


def drop_database(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_database(postgres_server_url):
    """One migrated database for the session; each test starts from empty tables."""
    from app.db import make_engine
    from app.migrate import upgrade

    url = create_database(postgres_server_url)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    drop_database(postgres_server_url, url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        from app.db import make_engine
        from app.migrate import upgrade

        url = f"sqlite:///{tmp_path / 'data' / 'sdmerge.db'}"
        (tmp_path / "data").mkdir(exist_ok=True)
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        return url
    url = request.getfixturevalue("postgres_database")
    engine = create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(SERVICE_TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def checkpoint_store(tmp_path_factory) -> Path:
    """Tiny SD2 and SDXL checkpoints (one per seed) and one SD1, written once per session."""
    from merge_engine.synthetic import tiny_state_dict, write_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    for seed in SEEDS:
        write_checkpoint(folder / f"sd2-{seed}.safetensors", tiny_state_dict("sd2", seed=seed))
    for seed in SLOW_SEEDS:
        write_checkpoint(folder / f"sdxl-{seed}.safetensors", tiny_state_dict("sdxl", seed=seed))
    write_checkpoint(folder / "sd1-1.safetensors", tiny_state_dict("sd1", seed=1))
    return folder


SLOW_RECIPE = {"merge": {"method": "uniform", "models": [f"sdxl-{seed}.safetensors" for seed in SLOW_SEEDS]},
               "output": {"dtype": "fp32", "accumulate": "fp64"}}


@pytest.fixture
def model_root(tmp_path, checkpoint_store) -> Path:
    """A model root holding hard links to the session's checkpoints (same bytes, no copying)."""
    root = tmp_path / "models"
    root.mkdir()
    for path in checkpoint_store.iterdir():
        os.link(path, root / path.name)
    return root


@pytest.fixture
def settings(tmp_path, database_url, model_root):
    return settings_from_env({
        "SDMERGE_DATA_DIR": str(tmp_path / "data"),
        "SDMERGE_DATABASE_URL": database_url,
        "SDMERGE_MODEL_ROOTS": str(model_root),
        "SDMERGE_MAX_UPLOAD_BYTES": str(64 * 1024 * 1024),
        "SDMERGE_JOB_LEASE_SECONDS": "5",
        "SDMERGE_MERGE_THREADS": "1",
    })


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def runtime(client):
    return client.app.state.runtime


@pytest.fixture
def run_tasks(runtime):
    """Play the worker: take every message off the broker's queues and run it with the real
    task code, until the queues are empty. Returns the task names run, in order."""
    from app.queue import QUEUES
    from worker.tasks import HANDLERS

    def drain() -> list[str]:
        ran = []
        with runtime.celery.connection_for_read() as connection:
            progress = True
            while progress:
                progress = False
                for name in QUEUES:
                    queue = connection.SimpleQueue(name)
                    try:
                        message = queue.get(block=False)
                    except queue.Empty:
                        continue
                    finally:
                        queue.close()
                    args, _kwargs, _embed = message.payload
                    task = message.headers["task"]
                    HANDLERS[task](runtime, *args)
                    message.ack()
                    ran.append(task)
                    progress = True
        return ran

    return drain


@pytest.fixture
def ready_model(client, run_tasks):
    """Register a file of the model root and hash it; returns the model as the API shows it."""

    def register(filename: str, name: str | None = None) -> dict:
        body = {"path": filename, **({"name": name} if name else {})}
        response = client.post("/models", json=body)
        assert response.status_code in (200, 201), response.text
        run_tasks()
        model = client.get(f"/models/{response.json()['id']}").json()
        assert model["status"] == "ready", model
        return model

    return register


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_files(settings) -> list[str]:
    """Every file the service wrote into its artifact store, uploads and tmp folders."""
    found = []
    for folder in (settings.artifact_dir, settings.upload_dir, settings.tmp_dir):
        found += [str(p.relative_to(settings.data_dir)) for p in folder.rglob("*") if p.is_file()]
    return sorted(found)
