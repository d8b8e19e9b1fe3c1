"""Rate limits are one budget across the API, 429s carry the request id, two apps in one
process keep their own settings, and the embedded /readyz reaches its own broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.core.test_embedded import EmbeddedServer, get_json
from tests.core.test_embedded import embedded_server as embedded_server  # the fixture
from tests.factories import tenant_with_owner
from tests.support.processes import PROJECT_ROOT
from tests.support.waiting import free_port

SECOND_APP_CHILD = """
from app import create_app
settings = dict(TESTING=True, ENSOUL_PROFILE="embedded", REDIS_URL="memory://",
                SECRET_KEY="x", ENSOUL_ENCRYPTION_KEY="x", ENSOUL_API_IP_RATE_LIMIT="1000/minute")
first = create_app(dict(settings, DATABASE_URL="sqlite:///{db}/a.db", MQTT_URL="{mqtt}"))
create_app(dict(settings, DATABASE_URL="sqlite:///{db}/b.db", MQTT_URL="{mqtt}",
                ENSOUL_API_IP_RATE_LIMIT="1/minute"))
client = first.test_client()
print(" ".join(str(client.get("/api/v1/tenant").status_code) for _ in range(3)))
"""


def test_rate_limit_is_one_budget_per_token_across_the_api(app: Any, client: Any,
                                                          monkeypatch: Any) -> None:
    """Not a budget per endpoint: a token's requests count together across the API."""
    setup = tenant_with_owner()
    monkeypatch.setitem(app.config, "ENSOUL_API_RATE_LIMIT", "3/minute")
    for path in ("/api/v1/tenant", "/api/v1/members", "/api/v1/tokens"):
        assert client.get(path, headers=setup.headers).status_code == 200
    assert client.get("/api/v1/invitations", headers=setup.headers).status_code == 429


def test_rate_limited_answer_carries_the_request_id(app: Any, client: Any,
                                                    monkeypatch: Any) -> None:
    """The request id is set before the limiter can answer."""
    monkeypatch.setitem(app.config, "ENSOUL_API_IP_RATE_LIMIT", "1/minute")
    client.get("/api/v1/tenant", headers={"X-Request-Id": "first"})
    limited = client.get("/api/v1/tenant", headers={"X-Request-Id": "second"})
    assert limited.status_code == 429
    assert limited.headers["X-Request-Id"] == "second"


def test_a_second_app_leaves_the_first_apps_limits_alone(tmp_path: Path) -> None:
    """Limits read the current app's settings and each app keeps its own engine."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "MQTT_URL"}}
    child = SECOND_APP_CHILD.format(db=tmp_path, mqtt=f"embedded://127.0.0.1:{free_port()}")
    done = subprocess.run([sys.executable, "-c", child], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["401", "401", "401"]


def test_embedded_readyz_reaches_its_own_broker(embedded_server: EmbeddedServer) -> None:
    """The readiness check logs in with the embedded broker's service account."""
    status, body = get_json(embedded_server.port, "/readyz")
    assert status == 200, body
    assert body["checks"] == {"database": "ok", "redis": "ok", "mqtt": "ok"}
