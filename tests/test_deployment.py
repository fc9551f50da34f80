"""The deployment files, checked without a Docker engine: docker-compose.yml parsed (services,
health checks, volumes, the GPU worker's reservation and queues, profiles, Redis persistence),
every variable it uses and every setting the code reads documented in .env.example with a
default that means what the code does, the Dockerfile's two targets; and `docker compose config`
where the Compose plugin is installed."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.settings import Settings, settings_from_env

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("app", "worker", "merge_engine")
ENTRY = re.compile(r"^# ([A-Z][A-Z0-9_]+) \(default ([^)]*)\): (\S.*)$")
INTERPOLATED = re.compile(r"\$\{([A-Z][A-Z0-9_]*)(?::?-[^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def documented() -> dict[str, tuple[str, str]]:
    """NAME -> (default, meaning) of every entry of .env.example, each followed by its line."""
    lines = (REPO / ".env.example").read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        if match := ENTRY.match(line):
            name, default, meaning = match.groups()
            rest = lines[i + 1:]
            setting = next((x for x in rest if not x.startswith("# ") and x.strip()), "")
            assert re.match(rf"^#?{name}=", setting), f"{name}: its entry is not followed by a {name}= line"
            found[name] = (default, meaning)
    return found


def test_services_health_checks_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"api", "worker", "worker-gpu", "redis", "postgres", "flower"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"], f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert set(compose["volumes"]) == {"data", "redis", "postgres"}
    for name in ("api", "worker", "worker-gpu"):
        mounts = services[name]["volumes"]
        assert "${SDMERGE_DATA_VOLUME:-data}:/data" in mounts and any(m.endswith(":/models:ro") for m in mounts)
        assert services[name]["environment"]["SDMERGE_DATA_DIR"] == "/data"
        assert set(services[name]["depends_on"]) == {"postgres", "redis"}
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "sdmerge", "worker", "--check"]
    assert services["redis"]["volumes"] == ["redis:/data"]
    assert services["postgres"]["volumes"] == ["postgres:/var/lib/postgresql/data"]
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_workers_queues_gpu_and_profiles(compose):
    from app.queue import QUEUES

    services = compose["services"]
    queues = {name: services[name]["command"][services[name]["command"].index("--queues") + 1].split(",")
              for name in ("worker", "worker-gpu")}
    assert set(queues["worker"]) == set(QUEUES)
    assert queues["worker-gpu"] == ["merge", "preview"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda" and services["worker"]["build"]["target"] == "cpu"
    assert "TORCH_INDEX_URL" in gpu["build"]["args"]
    assert gpu["environment"]["SDMERGE_MERGE_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    assert services["flower"]["profiles"] == ["flower"]
    assert not {"profiles"} & (services["api"].keys() | services["worker"].keys())  # started by a plain `up`


def test_every_compose_variable_is_documented(compose, documented):
    text = (REPO / "docker-compose.yml").read_text()
    used = set(INTERPOLATED.findall(text))
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        used |= {name for name in environment if name.startswith("SDMERGE_")}
    assert used - documented.keys() == set(), "document these in .env.example"


def test_every_setting_is_documented_with_its_default(documented):
    """Each Settings field is read from SDMERGE_<FIELD>, documented, and its documented default,
    fed back, is the default (`unset` and `<...>` placeholders aside)."""
    source = (REPO / "app" / "settings.py").read_text()
    defaults = settings_from_env({})
    for field in dataclasses.fields(Settings):
        name = f"SDMERGE_{field.name.upper()}"
        assert f'"{name}"' in source, f"Settings.{field.name} is not read from {name}"
        assert name in documented, f"{name} (Settings.{field.name}) is not documented in .env.example"
        default, _meaning = documented[name]
        if default == "unset" or "<" in default:
            continue
        assert getattr(settings_from_env({name: default}), field.name) == getattr(defaults, field.name), name


def test_every_variable_the_code_reads_is_documented(documented):
    read = set()
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            read |= set(re.findall(r"[\"'](SDMERGE_[A-Z][A-Z0-9_]*)[\"']", path.read_text()))
    assert read, "found no settings: the pattern no longer matches the code"
    assert read - documented.keys() == set(), "document these in .env.example"


def test_dockerfile_targets():
    text = (REPO / "Dockerfile").read_text()
    stages = {name: parent for parent, name in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)}
    assert {"cpu", "cuda"} <= stages.keys()
    assert stages["cuda"] == "torch-cuda" and stages["cpu"] == "torch-cpu"
    cuda_stage = text.split("FROM base AS torch-cuda", 1)[1].split("FROM", 1)[0]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in cuda_stage
    assert '--index-url "$TORCH_INDEX_URL"' in cuda_stage
    assert text.rstrip().splitlines()[-1].startswith('CMD ["sdmerge", "serve"')  # the default target is cpu


def compose_command() -> list[str] | None:
    """Docker's compose plugin, else the standalone docker-compose (Debian's package, which
    scripts/test.sh installs): either parses and checks the file without a Docker engine."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config():
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is on this machine")
    env_file = REPO / ".env.example"
    for profiles in ([], ["--profile", "gpu", "--profile", "flower"]):
        result = subprocess.run([*command, "--env-file", str(env_file), *profiles, "config", "--quiet"],
                                cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    services = subprocess.run([*command, "--env-file", str(env_file), "--profile", "gpu", "--profile", "flower",
                               "config", "--services"], cwd=REPO, capture_output=True, text=True, check=True)
    assert set(services.stdout.split()) == {"api", "worker", "worker-gpu", "redis", "postgres", "flower"}
