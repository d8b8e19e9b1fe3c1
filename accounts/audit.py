"""The append-only audit log: who did what to which target, when and from where."""

from __future__ import annotations

import uuid
from typing import Any

from flask import g, has_request_context, request

from accounts.models import AuditEntry
from core.db import db, utcnow


def _actor() -> tuple[uuid.UUID | None, uuid.UUID | None, str]:
    if not has_request_context():
        return None, None, "cli"
    user = g.get("actor_user")
    token = g.get("actor_token")
    if token is not None:
        return None, token.id, f"token:{token.prefix}"
    if user is not None:
        return user.id, None, user.email
    return None, None, "anonymous"


def current_actor_label() -> str:
    return _actor()[2]


def record(
    action: str,
    *,
    tenant_id: uuid.UUID | None,
    target: Any = None,
    details: dict[str, Any] | None = None,
    actor_label: str | None = None,
) -> AuditEntry:
    user_id, token_id, label = _actor()
    entry = AuditEntry(
        tenant_id=tenant_id,
        actor_user_id=user_id,
        actor_token_id=token_id,
        actor_label=actor_label or label,
        action=action,
        target_type=type(target).__name__.lower() if target is not None else None,
        target_id=str(target.id) if target is not None else None,
        details=details or {},
        source_ip=request.remote_addr if has_request_context() else None,
        created_at=utcnow(),
    )
    db.session.add(entry)
    return entry
