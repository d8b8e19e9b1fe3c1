"""The usage ledger: one immutable row per settled inference request.

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
import uuid
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from core.db import Base, UUIDPrimaryKey, utcnow
from core.tenancy import TenantOwned


class UsageEventRecord(UUIDPrimaryKey, TenantOwned, Base):
    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("device_id", "request_id", "admitted_at",
                         name="uq_usage_events_device_request_admitted"),
        Index("ix_usage_events_tenant_admitted", "tenant_id", "admitted_at"),
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
