"""Real processes for the end-to-end tests: `sdmerge serve` and `sdmerge worker`, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

SDMERGE = [sys.executable, "-m", "app.cli"]
SERVICE_ENV = ("SDMERGE_DATABASE_URL", "SDMERGE_BROKER_URL", "SDMERGE_DATA_DIR", "SDMERGE_MODEL_ROOTS",
               "SDMERGE_API_TOKEN")
REPO = Path(__file__).resolve().parents[2]


def service_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env.update(settings)
    env["PYTHONPATH"] = str(REPO)
    return env


class Process:
    """A child process with its output in a log file; stopped (and its children) on close."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = open(log, "wb")
        self.popen = subprocess.Popen(args, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def children(self) -> list[int]:
        found = []
        for task in Path(f"/proc/{self.pid}/task").glob("*/children"):
            found += [int(p) for p in task.read_text().split()]
        return found

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def stop(self, timeout: float = 20) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        self._log_file.close()
        return self.popen.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_healthy(base_url: str, process: Process, timeout: float = 60) -> None:
    def up() -> bool:
        assert process.popen.poll() is None, f"server exited:\n{process.output()}"
        try:
            return httpx.get(f"{base_url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout, "the server to answer /health")


def wait_job(client: httpx.Client, job_id: int, statuses=("succeeded", "failed", "cancelled"),
             timeout: float = 120) -> dict:
    return wait_for(lambda: (job := client.get(f"/merges/{job_id}").json())["status"] in statuses and job,
                    timeout, f"job {job_id} to reach {statuses}", interval=0.1)
