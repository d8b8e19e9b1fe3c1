"""``Idempotency-Key`` on POSTs that create something a customer pays for or cannot create twice.

The first successful answer for a (tenant, key) is stored with a hash of the request and replayed
verbatim (with ``Idempotent-Replayed: true``) for the same request within the retention window.
The same key with a different request is refused with ``idempotency_key_reused``. Errors are
not stored: a request that failed can be retried with the same key. Fields that carry a secret
shown once are stored as ``null`` and replayed so.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import re
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, make_response, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core.db import db, utcnow
from core.errors import Conflict, ValidationFailed
from core.models import IdempotencyRecord
from core.tenancy import current_tenant_id

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"[!-~]{1,255}")
HEADER_DOC = {
    "in": "header",
    "name": HEADER,
    "required": False,
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
    "description": "Retries with the same key return the first answer instead of acting twice.",
}


def _request_hash() -> str:
    digest = hashlib.sha256()
    digest.update(request.method.encode())
    digest.update(request.path.encode())
    digest.update(request.get_data(cache=True))
    return digest.hexdigest()


def _replay(record: IdempotencyRecord) -> Response:
    response = current_app.response_class(
        json.dumps(record.response_body), status=record.status_code, mimetype="application/json"
    )
    response.headers["Idempotent-Replayed"] = "true"
    return response


def idempotent(redact: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = request.headers.get(HEADER)
            if key is None:
                return view(*args, **kwargs)
            if not KEY_PATTERN.fullmatch(key):
                raise ValidationFailed(
                    details={HEADER: ["Must be 1 to 255 visible ASCII characters."]}
                )
            tenant_id = current_tenant_id()
            request_hash = _request_hash()
            record = db.session.execute(
                select(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key
                )
            ).scalar_one_or_none()
            if record is not None and record.expires_at <= utcnow():
                db.session.delete(record)
                db.session.flush()
                record = None
            if record is not None:
                if record.request_hash != request_hash:
                    raise Conflict(
                        "This Idempotency-Key was used for a different request.",
                        code="idempotency_key_reused",
                    )
                return _replay(record)

            response = make_response(view(*args, **kwargs))
            if response.status_code < 300:
                body = response.get_json(silent=True)
                if isinstance(body, dict):
                    body = {k: (None if k in redact else v) for k, v in body.items()}
                ttl = dt.timedelta(hours=current_app.config["ENSOUL_IDEMPOTENCY_TTL_HOURS"])
                db.session.add(
                    IdempotencyRecord(
                        tenant_id=tenant_id,
                        key=key,
                        method=request.method,
                        path=request.path,
                        request_hash=request_hash,
                        status_code=response.status_code,
                        response_body=body,
                        expires_at=utcnow() + ttl,
                    )
                )
                try:
                    with db.session.begin_nested():
                        db.session.flush()
                except IntegrityError as exc:
                    raise Conflict(
                        "A request with this Idempotency-Key is in progress.",
                        code="idempotency_in_progress",
                        retry_after=1,
                    ) from exc
            return response

        params = wrapper.__dict__.setdefault("_apidoc", {}).setdefault("manual_doc", {})
        params.setdefault("parameters", []).append(HEADER_DOC)
        return wrapper

    return decorator
