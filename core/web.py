"""The HTTP boundary: request ids, the transaction boundary and the one error shape.

Every error, raised anywhere, is rendered here: as ``{"error": {code, message, details}}`` on
the REST API and health endpoints, as an HTML page in the portal.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from flask import Flask, Response, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import HTTPException

from core.api import API_PREFIX
from core.db import db
from core.errors import HTTP_STATUS_CODES, EnsoulError, ValidationFailed
from core.logging import request_id_var

log = logging.getLogger(__name__)
JSON_PREFIXES = (API_PREFIX, "/healthz", "/readyz", "/bootstrap", "/mqtt")


def wants_json() -> bool:
    return request.path.startswith(JSON_PREFIXES)


def _from_http_exception(exc: HTTPException) -> EnsoulError:
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    messages = data.get("messages") or data.get("errors")
    if status in (400, 422) and messages:
        # webargs: {"json": {"field": [...]}} or {"query": {...}}; malformed JSON is a 400.
        details: dict[str, Any] = {}
        for location_messages in messages.values():
            if isinstance(location_messages, dict):
                details.update(location_messages)
            else:
                details.setdefault("_body", []).extend(location_messages)
        if status == 400:
            return EnsoulError("The body is not valid JSON.", code="malformed_json",
                               details=details)
        return ValidationFailed(details=details)
    if status == 405:
        return EnsoulError(f"{request.method} is not allowed here.", code="method_not_allowed")
    cls = HTTP_STATUS_CODES.get(status, EnsoulError)
    return cls(exc.description if status not in (404, 500) else None)


def render_error(
    error: EnsoulError, status: int, headers: dict[str, str] | None = None
) -> Response:
    if wants_json():
        response = jsonify({"error": error.to_dict()})
    else:
        response = Response(
            render_template("error.html", error=error, status=status), mimetype="text/html"
        )
    response.status_code = status
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def init_app(app: Flask) -> None:
    @app.url_value_preprocessor
    def _fresh_globals(endpoint: str | None, values: dict[str, Any] | None) -> None:
        # Runs before every before_request hook: nothing from an earlier request may leak into
        # this one when an app context outlives a request (tests, CLI-driven requests).
        for key in list(g):
            g.pop(key)

    @app.before_request
    def _start_request() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        g.request_id = rid
        g.started = time.perf_counter()
        request_id_var.set(rid)

    @app.after_request
    def _finish_request(response: Response) -> Response:
        # The boundary commits what services flushed, only for answers that succeeded.
        if response.status_code < 400:
            db.session.commit()
        else:
            db.session.rollback()
        response.headers["X-Request-Id"] = g.get("request_id", "-")
        if "started" in g:
            log.info("%s %s %s %.1fms", request.method, request.path, response.status_code,
                     (time.perf_counter() - g.started) * 1000)
        return response

    @app.errorhandler(EnsoulError)
    def _ensoul_error(error: EnsoulError) -> Response:
        return render_error(error, error.http_status)

    @app.errorhandler(CSRFError)
    def _csrf_error(error: CSRFError) -> Response:
        return render_error(
            EnsoulError("The form expired or was sent from elsewhere; reload and try again.",
                        code="csrf_failed"), 400)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        error = _from_http_exception(exc)
        headers: dict[str, str] = {}
        if status == 429:
            retry = exc.get_response().headers.get("Retry-After")
            error.retry_after = int(retry) if retry and retry.isdigit() else 1
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return render_error(error, status, headers)

    @app.errorhandler(IntegrityError)
    def _integrity_error(exc: IntegrityError) -> Response:
        # Services check uniqueness first; a concurrent request can still win the race, and
        # the database's constraint then decides. The loser gets a 409, never a 500.
        db.session.rollback()
        log.info("integrity error answered 409: %s", str(exc.orig).splitlines()[0])
        return render_error(EnsoulError("This conflicts with a change made at the same time; "
                                        "reload and try again.", code="conflict"), 409)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        db.session.rollback()
        return render_error(EnsoulError(), 500)
