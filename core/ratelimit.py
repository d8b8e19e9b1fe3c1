"""Per-token and per-IP rate limits on the REST API (Flask-Limiter on the platform's Redis).

The token key is a hash of the presented bearer secret, so limiting needs no database lookup
and works before authentication has run.
"""

from __future__ import annotations

import hashlib

from flask import Blueprint, Flask, current_app, request
from flask_limiter import Limiter


def client_ip() -> str:
    return request.remote_addr or "unknown"


def token_or_ip() -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and len(header) > 7:
        return "token:" + hashlib.sha256(header[7:].encode()).hexdigest()[:24]
    return "ip:" + client_ip()


limiter = Limiter(key_func=token_or_ip, headers_enabled=True, strategy="moving-window")
_limited_blueprints: set[str] = set()


def limit_api(blueprint: Blueprint) -> None:
    """One budget per token and one per client IP across every REST endpoint.

    The limits are read from the current app's config on each request, so the blueprint is
    decorated once per process even when several apps are created (tests, tools).
    """
    if blueprint.name in _limited_blueprints:
        return
    _limited_blueprints.add(blueprint.name)
    limiter.shared_limit(lambda: current_app.config["ENSOUL_API_RATE_LIMIT"],
                         scope="api-token")(blueprint)
    limiter.shared_limit(lambda: current_app.config["ENSOUL_API_IP_RATE_LIMIT"],
                         scope="api-ip", key_func=lambda: "ip:" + client_ip())(blueprint)


def init_app(app: Flask) -> None:
    url = app.config["REDIS_URL"]
    app.config.setdefault(
        "RATELIMIT_STORAGE_URI", url if url.startswith(("redis://", "rediss://")) else "memory://"
    )
    app.config.setdefault("RATELIMIT_KEY_PREFIX", app.config["ENSOUL_REDIS_PREFIX"] + ":rl")
    limiter.init_app(app)
