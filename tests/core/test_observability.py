"""Request ids on every answer and every log line; JSON log lines with ``ENSOUL_LOG_JSON=1``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import PROJECT_ROOT
from tests.support.waiting import free_port

LOGGING_CHILD = """
from app import create_app
app = create_app()
client = app.test_client()
client.get("/healthz", headers={"X-Request-Id": "req-from-the-edge"})
client.get("/api/v1/tenant", headers={"X-Request-Id": "req-unauthorised"})
"""


def test_request_id_is_echoed(client: Any) -> None:
    response = client.get("/healthz", headers={"X-Request-Id": "edge-1234"})
    assert response.headers["X-Request-Id"] == "edge-1234"


@pytest.mark.parametrize("incoming", [None, "", "x" * 65, "bad\x01id"],
                         ids=["absent", "empty", "too-long", "unprintable"])
def test_request_id_is_generated_when_missing_or_unusable(client: Any,
                                                          incoming: str | None) -> None:
    headers = {} if incoming is None else {"X-Request-Id": incoming}
    first = client.get("/healthz", headers=headers).headers["X-Request-Id"]
    second = client.get("/healthz", headers=headers).headers["X-Request-Id"]
    assert len(first) == 32 and int(first, 16) >= 0
    assert first != second


@pytest.mark.parametrize("path", ["/api/v1/tenant", "/api/v1/nope", "/nowhere"])
def test_errors_carry_the_request_id(client: Any, path: str) -> None:
    response = client.get(path, headers={"X-Request-Id": "err-77"})
    assert response.status_code in (401, 404)
    assert response.headers["X-Request-Id"] == "err-77"


def run_logging_child(tmp_path: Path, **env: str) -> list[str]:
    child_env = {k: v for k, v in os.environ.items()
                 if k not in {"DATABASE_URL", "REDIS_URL", "MQTT_URL", "ENSOUL_LOG_JSON"}}
    child_env.update({
        "ENSOUL_PROFILE": "embedded",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'log.db'}",
        "MQTT_URL": f"embedded://127.0.0.1:{free_port()}",
        "SECRET_KEY": "log-test", "ENSOUL_ENCRYPTION_KEY": "log-test",
        **env,
    })
    done = subprocess.run([sys.executable, "-c", LOGGING_CHILD], cwd=PROJECT_ROOT, env=child_env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stderr.splitlines() if line.strip()]


def test_json_log_lines_carry_the_request_id(tmp_path: Path) -> None:
    lines = run_logging_child(tmp_path, ENSOUL_LOG_JSON="1")
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    by_id = {r["request_id"]: r for r in records}
    served = by_id["req-from-the-edge"]
    assert served["message"].startswith("GET /healthz 200")
    assert {"time", "level", "logger"} <= set(served)
    assert served["level"] == "INFO"
    assert by_id["req-unauthorised"]["message"].startswith("GET /api/v1/tenant 401")


def test_plain_log_lines_carry_the_request_id(tmp_path: Path) -> None:
    lines = run_logging_child(tmp_path, ENSOUL_LOG_JSON="0")
    served = [line for line in lines if "GET /healthz 200" in line]
    assert len(served) == 1 and "[req-from-the-edge]" in served[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(served[0])
