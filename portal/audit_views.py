"""The tenant's audit log, newest first, a page at a time."""

from __future__ import annotations

from flask import render_template, request
from sqlalchemy import select

from accounts import permissions as perm
from accounts.auth import current_tenant, require
from accounts.models import AuditEntry
from core.pagination import paginate
from portal.blueprint import bp

PAGE_SIZE = 50


@bp.route("/audit")
@require(perm.AUDIT_READ)
def audit() -> str:
    cursor = request.args.get("cursor") or None
    page = paginate(
        select(AuditEntry).where(AuditEntry.tenant_id == current_tenant().id),
        AuditEntry.id, {"cursor": cursor, "limit": PAGE_SIZE}, newest_first=True,
    )
    return render_template("audit.html", entries=page["items"], next_cursor=page["next_cursor"],
                           first_page=cursor is None)
