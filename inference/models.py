"""The usage ledger (one immutable row per settled inference request) and a tenant's
inference settings (provider configurations, memory and transcript retention).

Rows are written only by :class:`inference.usage.UsageWriter`, in bulk, from the tenants' Redis
usage streams; ``(device_id, request_id, admitted_at)`` makes a replayed event a no-op.

Usage must outlive anything it refers to, and the writer must never be refused a settled
request: ``device_id`` and ``product_id`` are plain indexed columns, not foreign keys (devices
are retired, not deleted, and an FK would turn a registry mistake into a stuck or lost event);
``tenant_id`` is a foreign key *without* cascade, so deleting a tenant that has usage fails
instead of silently erasing what it consumed. ``kind`` and ``finish`` are strings without a
CHECK constraint: a newer broker's new value must land, not be refused.

Partitioning by time later needs ``admitted_at`` in every unique key: the de-duplication key
has it already; the primary key would become ``(id, admitted_at)``.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, Timestamped, UUIDPrimaryKey, utcnow
from core.tenancy import TenantOwned


class UsageEventRecord(UUIDPrimaryKey, TenantOwned, Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("device_id", "request_id", "admitted_at",
                         name="uq_usage_events_device_request_admitted"),
        Index("ix_usage_events_tenant_admitted", "tenant_id", "admitted_at"),
        Index("ix_usage_events_device_admitted", "device_id", "admitted_at", "id"),
    )

    # Overrides TenantOwned's cascading FK (see the module docstring); still tenant-scoped.
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    device_id: Mapped[uuid.UUID]  # indexed as the first column of the unique key
    product_id: Mapped[uuid.UUID | None]
    request_id: Mapped[str] = mapped_column(String(64))
    admitted_at: Mapped[dt.datetime]
    settled_at: Mapped[dt.datetime]
    stream_id: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(16))
    conversation_id: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    audio_in_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    audio_out_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    tool_calls: Mapped[int] = mapped_column(BigInteger, default=0)
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    credit_split: Mapped[dict[str, Any]] = mapped_column(JSON)
    rate_card_version: Mapped[str | None] = mapped_column(String(64))
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    first_delta_ms: Mapped[float | None] = mapped_column(Float)
    duration_ms: Mapped[float] = mapped_column(Float)
    finish: Mapped[str] = mapped_column(String(32))
    error_code: Mapped[str | None] = mapped_column(String(64))
    broker: Mapped[str] = mapped_column(String(128))
    settled_by: Mapped[str] = mapped_column(String(16))
    written_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# --- settings (the web side writes them; the broker sees them through device profiles) --------


FIRST_TOKEN_TIMEOUT_S = 20.0  # the OpenAI-compatible provider's own defaults
TOTAL_TIMEOUT_S = 120.0


class ProviderKind(enum.StrEnum):
    LOCAL = "local"  # the built-in provider (embedded profile, tests, benchmarks)
    OPENAI = "openai"  # any OpenAI-compatible endpoint


class ProviderConfig(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """One way to reach a model, and which devices use it.

    A config serves the devices of its ``product`` and, when it ``is_default``, those of every
    product without a config of its own; a config that is neither stands by as another's
    ``secondary`` (it answers when the primary fails before its first token). The API key is
    stored encrypted and never shown again; ``api_key_hint`` keeps its last four characters
    (of a key long enough to spare them) so people can tell keys apart.
    """

    __tablename__ = "provider_configs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_provider_configs_tenant_name"),
        UniqueConstraint("product_id", name="uq_provider_configs_product_id"),
        Index("uq_provider_configs_tenant_default", "tenant_id", unique=True,
              postgresql_where=text("is_default"), sqlite_where=text("is_default")),
        CheckConstraint("secondary_id IS NULL OR secondary_id <> id", name="not_own_secondary"),
    )

    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[ProviderKind] = mapped_column(Enum(
        ProviderKind, name="provider_kind", native_enum=False, length=16,
        values_callable=lambda e: [m.value for m in e], validate_strings=True))
    base_url: Mapped[str | None] = mapped_column(String(500))
    model: Mapped[str] = mapped_column(String(128))  # for ``local``, a label only
    transcription_model: Mapped[str | None] = mapped_column(String(128))
    speech_model: Mapped[str | None] = mapped_column(String(128))
    voice: Mapped[str | None] = mapped_column(String(64))
    api_key_encrypted: Mapped[str | None] = mapped_column(String(2000))
    api_key_hint: Mapped[str | None] = mapped_column(String(4))
    product_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"))
    is_default: Mapped[bool] = mapped_column(default=False)
    # RESTRICT: deleting a config another one fails over to is refused, never silent.
    secondary_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("provider_configs.id", ondelete="RESTRICT"))
    first_token_timeout_s: Mapped[float] = mapped_column(Float, default=FIRST_TOKEN_TIMEOUT_S)
    total_timeout_s: Mapped[float] = mapped_column(Float, default=TOTAL_TIMEOUT_S)
    enabled: Mapped[bool] = mapped_column(default=True)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class InferenceSettings(TenantOwned, Base):
    """A tenant's conversation memory and transcript retention (no row: platform defaults).

    A children's device may need transcripts kept briefly or not at all:
    ``transcript_retention_hours = 0`` keeps none.
    """

    __tablename__ = "inference_settings"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    memory_ttl_hours: Mapped[int]
    memory_max_turns: Mapped[int]
    memory_max_tokens: Mapped[int]
    transcript_retention_hours: Mapped[int]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
