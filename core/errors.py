"""The small exception hierarchy every layer raises, mapped to HTTP and MQTT in one place.

Views and handlers never build error bodies themselves: they raise one of these and the
boundary renders ``{"error": {"code", "message", "details"}}`` (REST) or an ``error`` message
(MQTT) from it.
"""

from __future__ import annotations

from typing import Any


class EnsoulError(Exception):
    """Base of every typed error. ``code`` is stable and documented; ``message`` is for people."""

    code = "internal"
    http_status = 500
    message = "Internal error."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.message
        self.code = code or self.code
        self.details = details or {}
        self.retry_after = retry_after
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class BadRequest(EnsoulError):
    code, http_status, message = "bad_request", 400, "The request is malformed."


class ValidationFailed(EnsoulError):
    code, http_status, message = "validation_failed", 422, "Some fields are invalid."


class Unauthorized(EnsoulError):
    code, http_status, message = "unauthorized", 401, "Authentication is required."


class Forbidden(EnsoulError):
    code, http_status, message = "forbidden", 403, "You are not allowed to do this."


class NotFound(EnsoulError):
    code, http_status, message = "not_found", 404, "No such resource."


class Conflict(EnsoulError):
    code, http_status, message = "conflict", 409, "The request conflicts with the current state."


class Gone(EnsoulError):
    code, http_status, message = "gone", 410, "This link is no longer valid."


class TooLarge(EnsoulError):
    code, http_status, message = "too_large", 413, "The request body is too large."


class UnsupportedMediaType(EnsoulError):
    code, http_status, message = "unsupported_media_type", 415, "Send JSON."


class RateLimited(EnsoulError):
    code, http_status, message = "rate_limited", 429, "Too many requests; retry later."


class ServiceUnavailable(EnsoulError):
    code, http_status, message = "unavailable", 503, "A dependency is unavailable."


HTTP_STATUS_CODES: dict[int, type[EnsoulError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: BadRequest,
    409: Conflict,
    410: Gone,
    413: TooLarge,
    415: UnsupportedMediaType,
    422: ValidationFailed,
    429: RateLimited,
    503: ServiceUnavailable,
}
