"""Per-token and per-IP rate limits on the REST API, kept in Redis; 429 with Retry-After.

The limits are read from the app's config on every request, so each test lowers them on the
shared app (``monkeypatch`` restores them). A second ``create_app`` in this process would not
do: it re-registers the limits on the module-level blueprint and limiter, which then apply to
every app of the process (see tests/core/test_known_core_bugs.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from accounts.models import TokenScope
from tests.factories import auth, make_token, tenant_with_owner


@pytest.fixture
def setup(app: Any) -> Any:
    return tenant_with_owner()


def get_tenant(client: Any, token: str, ip: str = "198.51.100.1") -> Any:
    return client.get("/api/v1/tenant", headers=auth(token), environ_base={"REMOTE_ADDR": ip})


def assert_limited(response: Any) -> None:
    assert response.status_code == 429
    error = response.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert set(error) == {"code", "message", "details"}
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60


def test_per_token_limit(app: Any, client: Any, setup: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_API_RATE_LIMIT", "3/minute")
    for _ in range(3):
        assert get_tenant(client, setup.token).status_code == 200
    assert_limited(get_tenant(client, setup.token))
    # Another token from the same address has its own budget.
    _, other = make_token(setup.tenant, TokenScope.READ)
    assert get_tenant(client, other).status_code == 200


def test_per_ip_limit(app: Any, client: Any, setup: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_API_IP_RATE_LIMIT", "3/minute")
    tokens = [make_token(setup.tenant, TokenScope.READ)[1] for _ in range(4)]
    for token in tokens[:3]:
        assert get_tenant(client, token, "198.51.100.7").status_code == 200
    assert_limited(get_tenant(client, tokens[3], "198.51.100.7"))
    assert get_tenant(client, tokens[3], "198.51.100.8").status_code == 200


def test_requests_without_a_token_are_limited_per_ip(app: Any, client: Any,
                                                      monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_API_IP_RATE_LIMIT", "2/minute")
    for _ in range(2):
        assert client.get("/api/v1/tenant").status_code == 401
    assert_limited(client.get("/api/v1/tenant"))


def test_health_checks_are_not_limited(app: Any, client: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(app.config, "ENSOUL_API_RATE_LIMIT", "1/minute")
    monkeypatch.setitem(app.config, "ENSOUL_API_IP_RATE_LIMIT", "1/minute")
    for _ in range(3):
        assert client.get("/healthz").status_code == 200


def test_limits_are_kept_in_redis_under_the_prefix(app: Any, client: Any, setup: Any,
                                                   redis_client: Any, redis_prefix: str) -> None:
    assert get_tenant(client, setup.token).status_code == 200
    keys = [k.decode() for k in redis_client.keys("*")]
    assert keys and all(f"/{redis_prefix}:rl/" in k for k in keys), keys
