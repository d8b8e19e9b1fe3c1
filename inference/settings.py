"""A tenant's inference settings as the broker sees them: provider choice and memory policy.

Both are read while device profiles are projected (``inference.directory.build_profiles``),
in the projection's own session, never by the broker: what they return is copied into every
device profile in Redis.
"""

from __future__ import annotations

import uuid
from typing import Any

from flask import current_app
from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from inference.models import InferenceSettings, ProviderConfig, ProviderKind

OPENAI_BASE_URL = "https://api.openai.com/v1"  # an openai config without its own base URL


def provider_spec(config: ProviderConfig) -> dict[str, Any]:
    """What ``inference.providers.registry`` builds a provider from: the ``OpenAISettings``
    fields, the key still encrypted (the broker decrypts it). The provider keeps its kind as
    its name: usage events and metrics label by it, and tenants' names must not become
    unbounded metric labels."""
    if config.kind is ProviderKind.LOCAL:
        return {"kind": ProviderKind.LOCAL.value}
    spec: dict[str, Any] = {
        "kind": config.kind.value,
        "base_url": config.base_url or OPENAI_BASE_URL,
        "model": config.model,
        "first_token_timeout": config.first_token_timeout_s,
        "total_timeout": config.total_timeout_s,
    }
    for key in ("transcription_model", "speech_model", "voice"):
        value = getattr(config, key)
        if value:
            spec[key] = value
    if config.api_key_encrypted:
        spec["api_key_encrypted"] = config.api_key_encrypted
    return spec


def provider_profile(session: Session, tenant_id: uuid.UUID,
                     product_id: uuid.UUID | None) -> dict[str, Any]:
    """The provider a device of this product uses: the product's own config, else the
    tenant's default, else the platform's (``ENSOUL_INFERENCE_PROVIDER``). Disabled configs
    are skipped, a disabled secondary is left out."""
    wanted: ColumnElement[bool] = ProviderConfig.is_default.is_(True)
    if product_id is not None:
        wanted = or_(wanted, ProviderConfig.product_id == product_id)
    configs = session.execute(select(ProviderConfig).where(
        ProviderConfig.tenant_id == tenant_id, ProviderConfig.enabled.is_(True), wanted)
    ).scalars().all()
    chosen = (next((c for c in configs if product_id is not None and c.product_id == product_id),
                   None)
              or next((c for c in configs if c.is_default), None))
    if chosen is None:
        return {"kind": current_app.config["ENSOUL_INFERENCE_PROVIDER"]}
    spec = provider_spec(chosen)
    if chosen.secondary_id is not None:
        secondary = session.get(ProviderConfig, chosen.secondary_id)
        if secondary is not None and secondary.enabled and secondary.tenant_id == tenant_id:
            spec["secondary"] = provider_spec(secondary)
    return spec


def default_memory_settings() -> dict[str, int]:
    """The platform's memory policy, in the API's units (hours, rounded up)."""
    config = current_app.config
    ttl_hours = -(-int(config["ENSOUL_MEMORY_TTL_SECONDS"]) // 3600)
    return {"memory_ttl_hours": ttl_hours,
            "memory_max_turns": int(config["ENSOUL_MEMORY_MAX_TURNS"]),
            "memory_max_tokens": int(config["ENSOUL_MEMORY_MAX_TOKENS"]),
            # Transcripts live as long as memory unless a tenant says otherwise.
            "transcript_retention_hours": ttl_hours}


def tenant_memory_settings(session: Session, tenant_id: uuid.UUID) -> dict[str, Any]:
    """The memory part of a device profile (``inference.sessions`` reads it), in seconds."""
    row = session.get(InferenceSettings, tenant_id)
    if row is None:
        config = current_app.config
        ttl = int(config["ENSOUL_MEMORY_TTL_SECONDS"])
        return {"ttl_seconds": ttl, "max_turns": int(config["ENSOUL_MEMORY_MAX_TURNS"]),
                "max_tokens": int(config["ENSOUL_MEMORY_MAX_TOKENS"]),
                "transcript_ttl_seconds": ttl}
    return {"ttl_seconds": row.memory_ttl_hours * 3600, "max_turns": row.memory_max_turns,
            "max_tokens": row.memory_max_tokens,
            "transcript_ttl_seconds": row.transcript_retention_hours * 3600}
