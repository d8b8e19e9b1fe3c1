"""The ``portal`` blueprint and the checks every portal page passes before its view runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Blueprint, current_app, flash, g, redirect, request, url_for
from flask_babel import get_locale
from flask_babel import gettext as _
from flask_login import current_user
from werkzeug.wrappers import Response

from accounts import permissions, two_factor
from accounts.models import TenantStatus
from accounts.permissions import READ_ONLY
from portal.labels import LANGUAGE_NAMES, ROLE_LABELS, SCOPE_LABELS, error_text

bp = Blueprint("portal", __name__)
F = TypeVar("F", bound=Callable[..., Any])


def public(view: F) -> F:
    """Mark a page anyone may see without logging in (login, invitations, reset links)."""
    view.portal_public = True  # type: ignore[attr-defined]
    return view


def before_two_factor(view: F) -> F:
    """Mark a page a member may use before enrolling in a two-factor requirement."""
    view.portal_before_two_factor = True  # type: ignore[attr-defined]
    return view


def local_path() -> str:
    """The current request's path and query, to come back to after logging in."""
    return request.full_path.rstrip("?")


@bp.before_request
def _guard() -> Response | None:
    tenant = g.get("tenant")
    if tenant is not None and tenant.status is TenantStatus.SUSPENDED:
        # A suspended tenant's members may still look, but not change anything.
        g.permissions = g.get("permissions", frozenset()) & READ_ONLY
    view = current_app.view_functions.get(request.endpoint or "")
    if getattr(view, "portal_public", False):
        return None
    if not current_user.is_authenticated:
        if request.path != "/":
            flash(_("Please log in to continue."), "info")
        wanted = local_path() if request.method == "GET" else None
        return redirect(url_for("portal.login", next=wanted))
    member = g.get("membership")
    if (
        member is not None
        and not current_user.user.totp_enabled
        and two_factor.required_for(member)
        and not getattr(view, "portal_before_two_factor", False)
    ):
        flash(_("%(tenant)s requires two-factor authentication for your role. Set it up to "
                "continue.", tenant=member.tenant.name), "warning")
        return redirect(url_for("portal.two_factor"))
    return None


@bp.app_context_processor
def _template_helpers() -> dict[str, Any]:
    """Helpers for every template, the error page included (it renders outside the blueprint)."""
    def can(permission: str) -> bool:
        return permission in g.get("permissions", frozenset())

    return {
        "can": can,
        "perm": permissions,
        "role_label": ROLE_LABELS.get,
        "scope_label": SCOPE_LABELS.get,
        "error_text": error_text,
        "languages": LANGUAGE_NAMES,
        "current_locale": str(get_locale() or "en"),
        "here": local_path() if request.method == "GET" else "",
    }


# Last, once ``bp`` exists: the inference sections of the device page add their routes and
# template globals (the other page modules are imported by portal.views).
from portal import inference_views  # noqa: E402, F401
