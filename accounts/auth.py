"""Who is asking, for which tenant, with which permissions.

REST API: ``Authorization: Bearer <token>``; the token fixes the tenant and its scope the
permissions. Portal: a Flask-Login session; the tenant is the one picked in the tenant switcher
and the member's role gives the permissions. Both end in :func:`core.tenancy.set_current_tenant`.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask, g, request, session
from flask_login import LoginManager, UserMixin, current_user

from accounts import services
from accounts.models import Membership, Tenant, User
from accounts.permissions import ROLE_PERMISSIONS, SCOPE_PERMISSIONS
from core.api import API_PREFIX
from core.db import db
from core.errors import Forbidden, Unauthorized
from core.tenancy import set_current_tenant

login_manager = LoginManager()
PUBLIC_API_PATHS = (f"{API_PREFIX}/openapi.json", f"{API_PREFIX}/docs")


class SessionUser(UserMixin):
    """The Flask-Login wrapper: its id includes the password version to end old sessions."""

    def __init__(self, user: User) -> None:
        self.user = user

    def get_id(self) -> str:
        return f"{self.user.id}:{self.user.session_version}"


@login_manager.user_loader
def _load_user(session_id: str) -> SessionUser | None:
    try:
        raw_id, version = session_id.split(":")
        user = db.session.get(User, uuid.UUID(raw_id))
    except ValueError:
        return None
    if user is None or str(user.session_version) != version:
        return None
    if session.get("2fa_pending"):
        return None
    return SessionUser(user)


def authenticate_api_request() -> None:
    if not request.path.startswith(API_PREFIX) or request.path.startswith(PUBLIC_API_PATHS):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise Unauthorized("Send an API token as 'Authorization: Bearer <token>'.",
                           code="unauthorized")
    token = services.authenticate_token(raw.strip())
    g.actor_token = token
    g.permissions = SCOPE_PERMISSIONS[token.scope]
    set_current_tenant(token.tenant_id)


def select_portal_tenant() -> None:
    """Fix the portal session's tenant and permissions from the member's role."""
    if request.path.startswith(API_PREFIX) or not current_user.is_authenticated:
        return
    user: User = current_user.user
    g.actor_user = user
    memberships = services.memberships_of(user)
    g.memberships = memberships
    wanted = session.get("tenant_id")
    member: Membership | None = next(
        (m for m in memberships if str(m.tenant_id) == wanted), None
    ) or (memberships[0] if memberships else None)
    g.membership = member
    if member is None:
        g.permissions = frozenset()
        return
    session["tenant_id"] = str(member.tenant_id)
    g.tenant = member.tenant
    g.permissions = ROLE_PERMISSIONS[member.role]
    set_current_tenant(member.tenant_id)


def current_tenant() -> Tenant:
    tenant = g.get("tenant")
    if tenant is None:
        tenant_id = g.get("tenant_id")
        tenant = db.session.get(Tenant, tenant_id) if tenant_id else None
        if tenant is None:
            raise Unauthorized("No tenant is selected.")
        g.tenant = tenant
    return tenant


def current_actor_user() -> User | None:
    return g.get("actor_user")


def require(permission: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Refuse with 403 unless the caller's role or token scope grants ``permission``."""

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if permission not in g.get("permissions", frozenset()):
                raise Forbidden(f"This needs the '{permission}' permission.",
                                code="forbidden", details={"permission": permission})
            return view(*args, **kwargs)

        return wrapper

    return decorator


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.login_view = "portal.login"
    login_manager.session_protection = "strong"
    app.before_request(authenticate_api_request)
    app.before_request(select_portal_tenant)
