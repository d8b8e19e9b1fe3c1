"""The inference endpoints for the API-walking tests (see tests/core/endpoints.py)."""

from __future__ import annotations

import uuid
from typing import Any

from accounts.models import Role, Tenant
from core.db import db
from inference import services
from inference.models import ProviderConfig, ProviderKind
from tests.core.endpoints import ALL_ROLES, Endpoint
from tests.fleet.endpoints import FLEET_WRITERS

READ = "inference:read"
TRANSCRIPTS = "transcripts:read"
WRITE = "inference:write"
SETTINGS_WRITERS = frozenset({Role.OWNER, Role.DEVELOPER})


def _read() -> Endpoint:
    return Endpoint(READ, ALL_ROLES)


def _write(body: Any = None) -> Endpoint:
    return Endpoint(WRITE, SETTINGS_WRITERS, body)


PROVIDER = "/api/v1/providers/<provider_id>"
DEVICE = "/api/v1/devices/<device_id>"

ENDPOINTS = {
    ("/api/v1/inference/settings", "GET"): _read(),
    ("/api/v1/inference/settings", "PUT"): _write({
        "memory_ttl_hours": 2, "memory_max_turns": 10, "memory_max_tokens": 2000,
        "transcript_retention_hours": 0}),
    ("/api/v1/providers", "GET"): _read(),
    ("/api/v1/providers", "POST"): _write({
        "name": "Walker", "kind": "openai", "model": "gpt-4o-mini", "api_key": "sk-walker-1234"}),
    (PROVIDER, "GET"): _read(),
    (PROVIDER, "PATCH"): _write({"model": "gpt-4o", "enabled": False}),
    (PROVIDER, "DELETE"): _write(),
    (f"{DEVICE}/requests", "GET"): _read(),
    (f"{DEVICE}/transcripts", "GET"): Endpoint(
        TRANSCRIPTS, frozenset({Role.OWNER, Role.DEVELOPER, Role.OPERATIONS})),
    (f"{DEVICE}/inference-data", "DELETE"): Endpoint("fleet:write", FLEET_WRITERS),
}


def _provider(tenant: Tenant) -> ProviderConfig:
    """Nobody's default and nobody's secondary: safe to change or delete."""
    config = services.create_provider(tenant.id, {
        "name": f"Walker {uuid.uuid4().hex[:8]}", "kind": ProviderKind.OPENAI,
        "model": "gpt-4o-mini", "api_key": "sk-walker-secret-key"})
    db.session.commit()
    return config


CREATORS: dict[type, Any] = {
    ProviderConfig: _provider,
}
