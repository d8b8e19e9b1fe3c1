"""A tenant's inference settings as the broker sees them: provider choice and memory policy."""

from __future__ import annotations

import uuid
from typing import Any

from flask import current_app


def provider_profile(tenant_id: uuid.UUID, product_id: uuid.UUID | None) -> dict[str, Any]:
    """The provider a device of this product uses (no secrets; the broker resolves them)."""
    return {"kind": current_app.config["ENSOUL_INFERENCE_PROVIDER"]}


def tenant_memory_settings(tenant_id: uuid.UUID) -> dict[str, Any]:
    config = current_app.config
    return {"ttl_seconds": int(config["ENSOUL_MEMORY_TTL_SECONDS"]),
            "max_turns": int(config["ENSOUL_MEMORY_MAX_TURNS"]),
            "max_tokens": int(config["ENSOUL_MEMORY_MAX_TOKENS"])}
