"""Schemathesis over every operation of the running service (`sdmerge serve`, a real process, a
token set), with the token and without: no answer is a 5xx, and every answer — status, content
type, body, headers — is one the OpenAPI document describes.

The API runs against SQLite and PostgreSQL and a real Redis broker; a worker process hashes the registered models
first and is stopped, so submitted work queues instead of loading the machine while it is fuzzed.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from merge_engine.synthetic import tiny_state_dict, write_checkpoint
from tests.service.conftest import create_database, drop_database, free_port
from tests.service.servers import SDMERGE, Process, service_env, wait_for, wait_healthy

TOKEN = "fuzz-token"
REDIS_DB = 9
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def service(request, tmp_path_factory, redis_url):
    folder = tmp_path_factory.mktemp("fuzz")
    if request.param == "postgres":
        server_url = request.getfixturevalue("postgres_server_url")
        database = create_database(server_url, "sdmerge_fuzz")
        request.addfinalizer(lambda: drop_database(server_url, database))
    else:
        database = f"sqlite:///{folder / 'sdmerge.db'}"
    roots = folder / "models"
    roots.mkdir()
    for seed in (1, 2):
        write_checkpoint(roots / f"sd2-{seed}.safetensors", tiny_state_dict("sd2", seed=seed))
    broker = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(broker).flushdb()
    env = service_env(SDMERGE_DATABASE_URL=database, SDMERGE_BROKER_URL=broker,
                      SDMERGE_DATA_DIR=str(folder / "data"), SDMERGE_MODEL_ROOTS=str(roots),
                      SDMERGE_API_TOKEN=TOKEN, SDMERGE_MAX_JSON_BYTES=str(1 << 20),
                      SDMERGE_MIN_FREE_BYTES="0", SDMERGE_HASH_CACHE=str(folder / "hashes.sqlite3"))
    subprocess.run([*SDMERGE, "db", "upgrade"], env=env, check=True, capture_output=True)
    port = free_port()
    server = Process([*SDMERGE, "serve", "--port", str(port)], env, folder / "serve.log")
    worker = Process([*SDMERGE, "worker"], env, folder / "worker.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, server)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
            for name in ("sd2-1.safetensors", "sd2-2.safetensors"):
                model = client.post("/models", json={"path": name}).json()
                wait_for(lambda m=model: client.get(f"/models/{m['id']}").json()["status"] == "ready", 60,
                         f"{name} to be hashed")
        worker.stop()
        yield base, server
    finally:
        worker.stop()
        code = server.stop()
        redis.Redis.from_url(broker).flushdb()
        log = server.output()
        assert "Traceback" not in log, log[-4000:]
        assert code in (0, -15), log[-4000:]


FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate])


def fuzz(base: str, headers: dict[str, str], examples: int, expect=None) -> list[str]:
    """Every operation of the live document, positive and negative cases; the failures found.
    (Schemathesis's own pytest plugin predates pytest 9, so the loop is ours.)"""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    failures: list[str] = []
    seen: dict[int, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(FUZZ, max_examples=examples)
            def run(case) -> None:
                response = case.call_and_validate(base_url=base, headers=headers, checks=CHECKS)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                if expect is not None:
                    assert expect(case, response), (case.method, case.path, response.status_code, response.text[:200])

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                continue
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - schemathesis' FailureGroup included
                failures.append(f"{operation.label} [{mode.value}]: {str(exc)[:1500]}")
    print("statuses:", dict(sorted(seen.items())))
    return failures


def test_every_operation_with_the_token(service):
    base, _ = service
    failures = fuzz(base, {"Authorization": f"Bearer {TOKEN}"}, examples=50)
    assert not failures, "\n\n".join(failures)


def test_every_operation_without_a_token_is_a_documented_401(service):
    base, _ = service
    failures = fuzz(base, {}, examples=2, expect=lambda case, response: case.path == "/health"
                    or response.status_code == 401)
    assert not failures, "\n\n".join(failures)
