"""Helpers for portal tests: CSRF tokens from rendered forms, logging in, TOTP codes."""

from __future__ import annotations

import re
import time
from typing import Any

import pyotp

from accounts import two_factor
from accounts.models import User
from tests.factories import PASSWORD

CSRF_RE = re.compile(r'name="csrf_token"[^>]*?value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_RE.search(html)
    assert match, "no csrf_token input on the page"
    return match.group(1)


def csrf(client: Any, page: str = "/login") -> str:
    """The session's CSRF token, read from a form on ``page``."""
    response = client.get(page)
    assert response.status_code == 200, (page, response.status_code)
    return csrf_from(response.get_data(as_text=True))


def post(client: Any, action: str, data: dict[str, Any] | None = None, *,
         page: str | None = None, **kwargs: Any) -> Any:
    """POST ``data`` with the CSRF token of the form page (``page``, default: ``action``)."""
    token = csrf(client, page or action)
    return client.post(action, data={"csrf_token": token, **(data or {})}, **kwargs)


def login(client: Any, email: str, password: str = PASSWORD, **extra: Any) -> Any:
    return post(client, "/login", {"email": email, "password": password, **extra})


def text(response: Any) -> str:
    return response.get_data(as_text=True)


def totp_code(user: User, *, step_offset: int = 0) -> str:
    """The code the user's authenticator shows now (or ``step_offset`` steps away)."""
    secret = two_factor.pending_secret(user)
    assert secret is not None
    totp = pyotp.TOTP(secret)
    return totp.at(int(time.time()) + step_offset * totp.interval)
