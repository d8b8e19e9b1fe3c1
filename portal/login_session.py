"""Starting a portal session and the only redirects a ``next`` parameter may ask for."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from flask import session
from flask_login import login_user

from accounts.auth import SessionUser
from accounts.models import User

# Survives logging in and out: the language someone picked before they had a session.
KEPT_KEYS = ("locale",)


def safe_next(target: str | None, default: str) -> str:
    """``target`` if it is a path on this site, else ``default`` (no open redirects)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.isprintable():
        return default
    return target


def reset_session() -> None:
    """Drop everything a previous session held (a fixed session cookie gains nothing)."""
    kept = {key: session[key] for key in KEPT_KEYS if key in session}
    session.clear()
    session.update(kept)


def log_in(user: User, tenant_id: uuid.UUID | None = None) -> None:
    reset_session()
    # A permanent session expires: its signed cookie is refused after
    # PERMANENT_SESSION_LIFETIME (12 hours) and the user logs in again.
    session.permanent = True
    if tenant_id is not None:
        session["tenant_id"] = str(tenant_id)
    login_user(SessionUser(user))
