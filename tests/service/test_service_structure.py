"""Structure: import boundaries, migrations matching the models, settings, the CLI's guards."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine

from tests.service.servers import REPO, SDMERGE, service_env


def test_importing_the_app_does_not_import_torch():
    code = ("import sys, app.main, app.cli, app.serve, app.queue; "
            "app.main.create_app; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=service_env())


def test_the_api_copy_of_the_analysis_metrics_is_the_engines():
    from app.services.analyses import METRICS
    from merge_engine.analysis import METRICS as ENGINE_METRICS

    assert METRICS == ENGINE_METRICS


def test_every_leased_table_is_reaped_and_has_a_task():
    from app.models import Base, Leased
    from worker.reaper import LEASED_TASKS
    from worker.tasks import HANDLERS

    leased = {mapper.class_ for mapper in Base.registry.mappers if issubclass(mapper.class_, Leased)}
    assert set(LEASED_TASKS) == leased
    assert set(LEASED_TASKS.values()) <= set(HANDLERS)


def test_the_engine_never_imports_the_service():
    code = ("import sys, merge_engine.cli, merge_engine.plan, merge_engine.execute; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'sqlalchemy', 'celery', 'app', 'worker')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env=service_env())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrations_match_models_and_go_down_and_up(backend, tmp_path, request):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db import make_engine
    from app.migrate import downgrade, upgrade
    from app.models import Base
    from tests.service.conftest import create_database, drop_database

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
    else:
        server = request.getfixturevalue("postgres_server_url")
        url = create_database(server, "sdmerge_migrate")
    engine = make_engine(url)
    try:
        upgrade(engine)
        downgrade(engine, "base")
        upgrade(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                    Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
        if backend == "postgres":
            drop_database(server, url)


def test_db_upgrade_command_works_from_any_directory(tmp_path):
    env = service_env(SDMERGE_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run([*SDMERGE, "db", "upgrade"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tables = create_engine(f"sqlite:///{tmp_path / 'data' / 'sdmerge.db'}").connect().exec_driver_sql(
        "SELECT name FROM sqlite_master WHERE type='table'").scalars().all()
    assert {"models", "jobs", "artifacts", "analyses", "previews", "alembic_version"} <= set(tables)


def test_serve_refuses_a_public_bind_without_a_token(tmp_path):
    result = subprocess.run([*SDMERGE, "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
                            env=service_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "SDMERGE_API_TOKEN" in result.stderr


def test_settings_from_environment(tmp_path):
    from app.settings import settings_from_env

    settings = settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path), "SDMERGE_MODEL_ROOTS": "/a:/b",
                                  "SDMERGE_JOB_LEASE_SECONDS": "30", "SDMERGE_MAX_UPLOAD_BYTES": "100"})
    assert settings.embedded and settings.database_url == f"sqlite:///{tmp_path / 'sdmerge.db'}"
    assert [str(r) for r in settings.model_roots] == ["/a", "/b"]
    assert (settings.job_lease_seconds, settings.max_upload_bytes) == (30, 100)
    scaled = settings_from_env({"SDMERGE_BROKER_URL": "redis://h:6379/0", "SDMERGE_DATABASE_URL": "postgresql://x/y"})
    assert not scaled.embedded
    assert (scaled.merge_shards, scaled.shard_bytes) == (0, 8 * 1024**3)  # a merge reading 8 GiB stays one task
    sharded = settings_from_env({"SDMERGE_MERGE_SHARDS": "4", "SDMERGE_SHARD_BYTES": "1000"})
    assert (sharded.merge_shards, sharded.shard_bytes) == (4, 1000)


def test_ready_reports_an_unreachable_broker(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.migrate import upgrade
    from app.settings import settings_from_env

    settings = settings_from_env({"SDMERGE_DATA_DIR": str(tmp_path), "SDMERGE_BROKER_URL": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(settings)) as client:
        upgrade(client.app.state.runtime.engine)
        response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["broker"].startswith("error")


def test_the_vendored_web_assets_are_the_pinned_ones():
    """app/web/vendor holds what scripts/vendor-web.sh fetched, unchanged, and the wheel ships it."""
    import hashlib
    import tomllib

    from app.routes.docs import VENDOR_DIR

    sums = dict(reversed(line.split("  ", 1)) for line in (VENDOR_DIR / "SHA256SUMS").read_text().splitlines())
    files = {str(p.relative_to(VENDOR_DIR)) for p in VENDOR_DIR.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR_DIR / name).read_bytes()).hexdigest() == digest, name
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    assert "web/vendor/*/*" in package_data and all(name.count("/") == 1 for name in files)
