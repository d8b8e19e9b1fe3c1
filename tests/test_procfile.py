"""Every Procfile process starts on the services profile and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import PROJECT_ROOT, ManagedProcess
from tests.support.waiting import free_port, port_open

VENV_BIN = str(Path(sys.executable).parent)


def procfile() -> dict[str, str]:
    entries = {}
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


@pytest.fixture
def services_env(database_url: str, redis_url: str, redis_prefix: str,
                 mosquitto: Any) -> dict[str, str]:
    return {
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MQTT_URL": mosquitto.url,
        "SECRET_KEY": "procfile-test",
        "ENSOUL_ENCRYPTION_KEY": "procfile-test",
        "ENSOUL_REDIS_PREFIX": redis_prefix,
        "ENSOUL_LOG_JSON": "1",
    }


def test_procfile_names_every_process() -> None:
    assert set(procfile()) == {"release", "web", "broker", "usage", "worker", "scheduler"}


def test_release_applies_migrations(services_env: dict[str, str]) -> None:
    result = subprocess.run(["bash", "-c", procfile()["release"]], cwd=PROJECT_ROOT,
                            env={**os.environ, **services_env}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


@pytest.mark.parametrize("name", ["broker", "usage", "worker", "scheduler"])
def test_long_running_process_starts_and_stops_cleanly(
    name: str, services_env: dict[str, str], log_dir: Path
) -> None:
    marker = {"broker": "broker started", "scheduler": "scheduler started",
              "usage": "usage writer started", "worker": "Listening on"}[name]
    process = ManagedProcess(f"procfile-{name}", shlex.split(procfile()[name]),
                             env=services_env, log_dir=log_dir)
    process.ready = lambda: marker in process.output()
    process.start(timeout=30)
    assert process.stop() == 0, process.output()[-2000:]


def test_web_serves_and_stops_cleanly(services_env: dict[str, str], log_dir: Path) -> None:
    port = free_port()
    env = {**services_env, "PORT": str(port), "WEB_CONCURRENCY": "1"}
    command = procfile()["web"].replace("${PORT:-8000}", str(port)).replace(
        "${WEB_CONCURRENCY:-2}", "1")
    process = ManagedProcess("procfile-web", shlex.split(command), env=env, log_dir=log_dir,
                             ready=lambda: port_open("127.0.0.1", port))
    process.start(timeout=30)
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
    finally:
        process.signal(signal.SIGTERM)
    assert process.stop() == 0, process.output()[-2000:]


def test_web_refuses_to_start_without_its_database(services_env: dict[str, str],
                                                   log_dir: Path) -> None:
    env = {**os.environ, **services_env,
           "DATABASE_URL": "postgresql://ensoul:s3cret-pw@127.0.0.1:1/ensoul"}
    command = procfile()["web"].replace("${PORT:-8000}", str(free_port())).replace(
        "${WEB_CONCURRENCY:-2}", "1")
    result = subprocess.run(shlex.split(command), cwd=PROJECT_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "cannot connect to the database at postgresql://ensoul:***@127.0.0.1:1/ensoul" in (
        result.stderr)
    assert "s3cret-pw" not in result.stderr + result.stdout
