"""The embedded profile boots in one process with no external service and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.processes import ManagedProcess, flask_command
from tests.support.waiting import free_port, port_open


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def get(port: int, path: str) -> tuple[int, Any]:
    status, body = fetch(port, path)
    return status, json.loads(body)


def test_embedded_serve_boots_serves_and_stops(tmp_path: Path, log_dir: Path) -> None:
    port, mqtt_port = free_port(), free_port()
    database = tmp_path / "embedded.db"
    process = ManagedProcess(
        f"embedded-{port}", flask_command("serve", "--port", str(port)), log_dir=log_dir,
        env={"ENSOUL_PROFILE": "embedded", "DATABASE_URL": f"sqlite:///{database}",
             "MQTT_URL": f"embedded://127.0.0.1:{mqtt_port}"},
        ready=lambda: port_open("127.0.0.1", port))
    for key in ("REDIS_URL", "SECRET_KEY", "ENSOUL_ENCRYPTION_KEY", "ENSOUL_SMTP_HOST"):
        process.env.pop(key, None)  # nothing external, no secrets: the embedded defaults
    process.start(timeout=60)
    try:
        assert get(port, "/healthz") == (200, {"status": "ok"})
        status, body = get(port, "/readyz")
        assert status == 200, (body, process.output()[-2000:])
        assert body["checks"] == {"database": "ok", "redis": "ok", "mqtt": "ok"}
        assert port_open("127.0.0.1", mqtt_port)  # the in-process broker
        assert database.exists()  # migrated on start
        status, page = fetch(port, "/login")
        assert status == 200, page[-2000:]
        assert 'type="password"' in page and 'name="csrf_token"' in page
    finally:
        process.signal(signal.SIGTERM)
        code = process.stop(timeout=20)
    assert code == 0, process.output()[-3000:]
    assert not port_open("127.0.0.1", port)
    assert os.path.getsize(database) > 0
