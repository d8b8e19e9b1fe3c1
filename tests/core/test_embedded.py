"""The embedded profile boots in one process with no external service and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import PROJECT_ROOT, ManagedProcess, flask_command
from tests.support.waiting import free_port, port_open, wait_until


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body = fetch(port, path)
    return status, json.loads(body)


@dataclass
class EmbeddedServer:
    process: ManagedProcess
    port: int
    mqtt_port: int
    database: Path


@pytest.fixture
def embedded_server(tmp_path: Path, log_dir: Path) -> Iterator[EmbeddedServer]:
    """``flask serve`` with no service URL, secret or SMTP server: the embedded defaults."""
    database = tmp_path / "embedded.db"
    for attempt in range(3):
        port, mqtt_port = free_port(), free_port()
        process = ManagedProcess(
            f"embedded-{port}", flask_command("serve", "--port", str(port)), log_dir=log_dir,
            env={"ENSOUL_PROFILE": "embedded", "DATABASE_URL": f"sqlite:///{database}",
                 "MQTT_URL": f"embedded://127.0.0.1:{mqtt_port}"},
            ready=lambda port=port: port_open("127.0.0.1", port))
        for key in ("REDIS_URL", "SECRET_KEY", "ENSOUL_ENCRYPTION_KEY", "ENSOUL_SMTP_HOST"):
            process.env.pop(key, None)
        try:
            process.start(timeout=60)
            break
        except RuntimeError:
            # A free port can be taken by another process before the server binds it.
            if attempt == 2 or "Address already in use" not in process.output():
                raise
    try:
        yield EmbeddedServer(process, port, mqtt_port, database)
    finally:
        process.kill9()  # only if a test left it running


def test_embedded_serve_boots_serves_and_stops(embedded_server: EmbeddedServer) -> None:
    server = embedded_server
    assert get_json(server.port, "/healthz") == (200, {"status": "ok"})
    status, page = fetch(server.port, "/login")
    assert status == 200, page[-2000:]
    assert 'type="password"' in page and 'name="csrf_token"' in page
    assert port_open("127.0.0.1", server.mqtt_port)  # the in-process broker
    assert os.path.getsize(server.database) > 0  # migrated on start

    server.process.signal(signal.SIGTERM)
    code = server.process.stop(timeout=20)
    assert code == 0, server.process.output()[-3000:]
    assert not port_open("127.0.0.1", server.port)
    assert not port_open("127.0.0.1", server.mqtt_port)


def test_the_quickstart_demo_devices_come_online_and_stream_answers(tmp_path: Path,
                                                                     log_dir: Path) -> None:
    """``serve --demo-devices`` (what scripts/demo.sh runs): the demo tenant's simulated
    devices connect to the in-process broker with their own credentials, show online, and
    ask the inference broker questions whose usage reaches the database."""
    port, mqtt_port = free_port(), free_port()
    database = tmp_path / "demo.db"
    env = {"ENSOUL_PROFILE": "embedded", "DATABASE_URL": f"sqlite:///{database}",
           "MQTT_URL": f"embedded://127.0.0.1:{mqtt_port}", "ENSOUL_DEMO_CHAT_SECONDS": "1",
           "ENSOUL_LOCAL_TTFT_MS": "0", "ENSOUL_LOCAL_TOKENS_PER_SECOND": "0"}
    seed_env = {k: v for k, v in os.environ.items()
                if k not in ("REDIS_URL", "SECRET_KEY", "ENSOUL_ENCRYPTION_KEY")}
    seed = subprocess.run(flask_command("seed-demo"), env={**seed_env, **env}, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert seed.returncode == 0, seed.stderr
    token = next(line.rsplit(" ", 1)[1] for line in seed.stdout.splitlines()
                 if line.startswith("demo API token"))
    server = ManagedProcess(f"demo-{port}", flask_command(
        "serve", "--port", str(port), "--demo-devices", "3"), log_dir=log_dir, env=env,
        ready=lambda: port_open("127.0.0.1", port))
    server.start(timeout=90)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/fleet/summary",
                                         headers={"Authorization": f"Bearer {token}"})

        def three_online() -> bool:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return json.loads(answer.read())["online"] == 3

        wait_until(three_online, 30, what="3 demo devices online")
        assert "3 simulated demo devices are online" in server.output()

        def answered() -> list[tuple[str, int]]:
            with sqlite3.connect(database) as connection:
                return connection.execute(
                    "SELECT DISTINCT device_id, output_tokens FROM usage_events"
                    " WHERE finish = 'stop'").fetchall()

        rows = wait_until(lambda: len({r[0] for r in answered()}) == 3 and answered(), 60,
                          what="every demo device's answered request in usage_events")
        assert all(tokens > 0 for _, tokens in rows)
    finally:
        server.signal(signal.SIGTERM)
        assert server.stop(timeout=30) == 0, server.output()[-3000:]
