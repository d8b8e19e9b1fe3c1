"""A portal session ends after PERMANENT_SESSION_LIFETIME: the old cookie is refused."""

from __future__ import annotations

from typing import Any

from tests.factories import tenant_with_owner
from tests.portal.helpers import login


def test_an_expired_session_must_log_in_again(app: Any, client: Any, monkeypatch: Any) -> None:
    setup = tenant_with_owner()
    assert login(client, setup.owner.email).status_code == 302
    assert client.get("/").status_code == 200
    cookie = client.get_cookie("session")
    assert cookie is not None and cookie.expires is not None  # a permanent, expiring cookie

    monkeypatch.setitem(app.config, "PERMANENT_SESSION_LIFETIME", -1)  # signed "too long ago"
    expired = client.get("/")
    assert expired.status_code == 302
    assert "/login" in expired.headers["Location"]
