"""The EMQX 5 adapter: HTTP authentication and authorization endpoints in EMQX's format.

EMQX posts every connect to ``POST /mqtt/auth`` and every publish/subscribe it has not cached to
``POST /mqtt/acl``, with the header ``X-Ensoul-Hook-Secret: <ENSOUL_MQTT_HOOK_SECRET>`` (the
embedded profile needs none). Answers apply :mod:`fleet.topics` and the stored ``$7$`` hashes and
are cached in Redis for a minute under a generation number; :meth:`HttpAuthCache.sync` (run after
every registry change, debounced) bumps the generation, which drops every cached answer at once.

Rotation grace (``ENSOUL_MQTT_ROTATION_GRACE_MINUTES``, 0 = none): the adapter remembers the hash
a device last logged in with. For N minutes after the device's credentials were reissued, that
previous secret is still accepted, until the device logs in once with the new one. Revoked,
suspended and retired devices get no grace. Mosquitto has no grace: one hash per username.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import MutableMapping
from typing import Any

import marshmallow as ma
from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select

from core.db import db
from core.errors import BadRequest, Unauthorized
from core.redis import get_redis, name
from fleet.broker_access.rules import (
    device_ids,
    has_broker_access,
    load_device_login,
    service_account,
    service_may,
)
from fleet.credentials import verify_password
from fleet.models import Device
from fleet.topics import device_may

SECRET_HEADER = "X-Ensoul-Hook-Secret"  # noqa: S105 - a header name
CACHE_SECONDS = 60
REMEMBERED_HASH_SECONDS = 30 * 24 * 3600
GENERATION_KEY = "mqtt-auth:generation"

bp = Blueprint("mqtt_hooks", __name__, url_prefix="/mqtt")


class HttpAuthCache:
    """Decisions for EMQX, cached in Redis until the registry changes."""

    def __init__(self, config: MutableMapping[str, Any] | None = None) -> None:
        self.config = config if config is not None else current_app.config
        self.redis = get_redis()
        self.service = service_account(self.config)
        self.grace = dt.timedelta(minutes=int(
            self.config.get("ENSOUL_MQTT_ROTATION_GRACE_MINUTES") or 0))

    def sync(self) -> dict[str, Any]:
        generation = self.redis.incr(name(GENERATION_KEY))
        devices = db.session.execute(
            select(func.count()).select_from(Device).where(has_broker_access())).scalar_one()
        return {"devices": devices, "changed": True, "reloaded": False,
                "generation": generation}

    def reconcile(self) -> dict[str, Any]:
        return self.sync()

    # --- authentication --------------------------------------------------------------------

    def authenticate(self, username: str | None, password: str | None) -> tuple[str, bool]:
        """``(result, is_superuser)``; ``ignore`` for usernames that are not the platform's."""
        if self.service is not None and username == self.service.username:
            allowed = self.service.matches(username, password)
            return ("allow", True) if allowed else ("deny", False)
        if username is None or device_ids(username) is None:
            return "ignore", False
        key = self._key("authn", self._secret_digest(username, password or ""))
        cached = self.redis.get(key)
        if cached is not None:
            return _text(cached), False
        result, ttl = self._authenticate_device(username, password or "")
        self.redis.set(key, result, ex=ttl)
        return result, False

    def _authenticate_device(self, username: str, password: str) -> tuple[str, int]:
        login = load_device_login(username)
        if login is None or not login.allowed:
            return "deny", CACHE_SECONDS
        remembered = name("mqtt-auth:verified", username)
        if verify_password(login.password_hash, password):
            if self.grace:
                before = self.redis.set(remembered, login.password_hash or "",
                                        ex=REMEMBERED_HASH_SECONDS, get=True)
                if isinstance(before, bytes) and before.decode() != login.password_hash:
                    # The new secret is in use: drop cached grace answers for the old one.
                    self.redis.incr(name(GENERATION_KEY))
            return "allow", CACHE_SECONDS
        if self.grace and login.credentials_issued_at is not None:
            left = login.credentials_issued_at + self.grace - dt.datetime.now(dt.UTC)
            previous = self.redis.get(remembered) if left.total_seconds() >= 1 else None
            if (previous is not None and _text(previous) != login.password_hash
                    and verify_password(_text(previous), password)):
                return "allow", min(CACHE_SECONDS, int(left.total_seconds()))
        return "deny", CACHE_SECONDS

    # --- authorization ---------------------------------------------------------------------

    def authorize(self, username: str | None, topic: str, action: str) -> bool:
        if self.service is not None and username == self.service.username:
            return service_may(topic)
        if username is None or device_ids(username) is None:
            return False
        if not device_may(username, topic, action):
            return False
        key = self._key("device", username)
        cached = self.redis.get(key)
        if cached is not None:
            return cached == b"1"
        login = load_device_login(username)
        allowed = login is not None and login.allowed
        self.redis.set(key, "1" if allowed else "0", ex=CACHE_SECONDS)
        return allowed

    # --- keys ------------------------------------------------------------------------------

    def _key(self, kind: str, value: str) -> str:
        generation = self.redis.get(name(GENERATION_KEY)) or b"0"
        return name("mqtt-auth", _text(generation), kind, value)

    def _secret_digest(self, username: str, password: str) -> str:
        # Keyed, so the cache never holds anything a password could be guessed from offline.
        return hmac.new(str(self.config["SECRET_KEY"]).encode(),
                        f"{username}\0{password}".encode(), hashlib.sha256).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- the endpoints -------------------------------------------------------------------------


class AuthnIn(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE

    clientid = ma.fields.String(load_default="", validate=ma.validate.Length(max=1024))
    username = ma.fields.String(required=True, allow_none=True,
                                validate=ma.validate.Length(max=1024))
    password = ma.fields.String(load_default=None, allow_none=True,
                                validate=ma.validate.Length(max=1024))


class AuthzIn(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE

    clientid = ma.fields.String(load_default="", validate=ma.validate.Length(max=1024))
    username = ma.fields.String(required=True, allow_none=True,
                                validate=ma.validate.Length(max=1024))
    topic = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=65535))
    action = ma.fields.String(required=True,
                              validate=ma.validate.OneOf(["publish", "subscribe"]))


def _load(schema: ma.Schema) -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("Send a JSON object.", code="malformed_json")
    try:
        return dict(schema.load(body))
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_body": exc.messages}
        raise BadRequest("Some fields are missing or invalid.", details=messages) from None


@bp.before_request
def _check_hook_secret() -> None:
    if current_app.config["EMBEDDED"]:
        return
    secret = current_app.config.get("ENSOUL_MQTT_HOOK_SECRET")
    if not secret:
        raise Unauthorized("ENSOUL_MQTT_HOOK_SECRET is not set; the MQTT hooks are closed.",
                           code="hook_secret_not_set")
    presented = request.headers.get(SECRET_HEADER, "")
    if not hmac.compare_digest(presented.encode(), str(secret).encode()):
        raise Unauthorized(f"Wrong or missing {SECRET_HEADER} header.")


@bp.post("/auth")
def authenticate() -> ResponseReturnValue:
    body = _load(AuthnIn())
    result, superuser = HttpAuthCache().authenticate(body["username"], body["password"])
    return jsonify({"result": result, "is_superuser": superuser})


@bp.post("/acl")
def authorize() -> ResponseReturnValue:
    body = _load(AuthzIn())
    allowed = HttpAuthCache().authorize(body["username"], body["topic"], body["action"])
    return jsonify({"result": "allow" if allowed else "deny"})
