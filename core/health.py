"""``/healthz`` (the process is alive) and ``/readyz`` (database, Redis and MQTT reachable)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from core.db import db
from core.mqtt import check_reachable, platform_target
from core.redis import get_redis

log = logging.getLogger(__name__)
bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify({"status": "ok"})


def _check(name: str, probe: Any) -> str:
    try:
        probe()
        return "ok"
    except Exception as exc:  # any failure of a dependency is "not ready", never a 500
        log.warning("readiness check %s failed: %s", name, exc)
        return "unavailable"


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    checks = {
        "database": _check("database", lambda: db.session.execute(text("SELECT 1"))),
        "redis": _check("redis", lambda: get_redis().ping()),
        "mqtt": _check(
            "mqtt", lambda: check_reachable(platform_target(current_app.config))
        ),
    }
    ready = all(v == "ok" for v in checks.values())
    status = 200 if ready else 503
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if not ready:
        body["error"] = {"code": "unavailable", "message": "A dependency is unavailable.",
                         "details": checks}
    return jsonify(body), status
