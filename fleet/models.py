"""The device registry: products, devices, their tags and history, activation challenges,
import batches with their one-time credentials file."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, Timestamped, UUIDPrimaryKey, str_enum
from core.tenancy import TenantOwned


class HardwareKind(enum.StrEnum):
    GLASSES = "glasses"
    TOY = "toy"
    CAPSULE = "capsule"
    OTHER = "other"


class DeviceStatus(enum.StrEnum):
    PROVISIONED = "provisioned"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    RETIRED = "retired"


class Product(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """A device model line; its enrolment key lets its devices bootstrap themselves."""

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="uq_products_tenant_name"),
        CheckConstraint("requests_per_minute > 0", name="requests_per_minute_positive"),
        CheckConstraint("concurrent_streams > 0", name="concurrent_streams_positive"),
        CheckConstraint("daily_request_cap > 0", name="daily_request_cap_positive"),
    )

    name: Mapped[str] = mapped_column(String(200))
    hardware_kind: Mapped[HardwareKind] = mapped_column(str_enum(HardwareKind, "hardware_kind"))
    description: Mapped[str] = mapped_column(String(2000), default="")
    enrolment_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    enrolment_key_prefix: Mapped[str] = mapped_column(String(16))
    requires_hardware_binding: Mapped[bool] = mapped_column(default=False)
    allow_self_registration: Mapped[bool] = mapped_column(default=True)
    # Per-device inference limits of this product's devices; NULL: the platform default. They
    # only ever tighten the platform's defaults (inference.directory applies the smaller).
    requests_per_minute: Mapped[int | None] = mapped_column()
    concurrent_streams: Mapped[int | None] = mapped_column()
    daily_request_cap: Mapped[int | None] = mapped_column()


class Device(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("tenant_id", "serial", name="uq_devices_tenant_serial"),
        UniqueConstraint("tenant_id", "mac", name="uq_devices_tenant_mac"),
        Index("ix_devices_tenant_status_id", "tenant_id", "status", "id"),
        Index("ix_devices_tenant_group_id", "tenant_id", "group_name", "id"),
        Index("ix_devices_tenant_product_id", "tenant_id", "product_id", "id"),
        Index("ix_devices_tenant_firmware_id", "tenant_id", "firmware_version", "id"),
        Index("ix_devices_tenant_name", "tenant_id", "name"),
        # Prefix search (``q``): under a non-C collation Postgres needs pattern operators.
        Index("ix_devices_tenant_serial_prefix", "tenant_id", "serial",
              postgresql_ops={"serial": "text_pattern_ops"}),
        Index("ix_devices_tenant_name_prefix", "tenant_id", "name",
              postgresql_ops={"name": "text_pattern_ops"}),
    )

    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id", ondelete="RESTRICT"))
    serial: Mapped[str] = mapped_column(String(64))
    mac: Mapped[str | None] = mapped_column(String(17))
    name: Mapped[str] = mapped_column(String(200), default="")
    group_name: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[DeviceStatus] = mapped_column(
        str_enum(DeviceStatus, "device_status"), default=DeviceStatus.PROVISIONED
    )
    firmware_version: Mapped[str | None] = mapped_column(String(64))
    config_version: Mapped[str | None] = mapped_column(String(64))
    board: Mapped[str | None] = mapped_column(String(100))
    client_uuid: Mapped[str | None] = mapped_column(String(64))
    end_user_ref: Mapped[str | None] = mapped_column(String(200))
    activated_at: Mapped[dt.datetime | None] = mapped_column()
    last_seen_at: Mapped[dt.datetime | None] = mapped_column()
    # Mosquitto-format PBKDF2-SHA512 ($7$...) of the MQTT password; NULL = no credentials.
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(200))
    credentials_issued_at: Mapped[dt.datetime | None] = mapped_column()
    # The per-device hardware key (HMAC activation), encrypted with ENSOUL_ENCRYPTION_KEY.
    hardware_key_encrypted: Mapped[str | None] = mapped_column(String(500))

    product: Mapped[Product] = relationship()
    tags: Mapped[list[DeviceTag]] = relationship(
        back_populates="device", cascade="all, delete-orphan", order_by="DeviceTag.tag"
    )

    @property
    def mqtt_username(self) -> str:
        """The username encodes the topic prefix: ``t/<username>/...`` is the device's tree."""
        return f"{self.tenant_id}/d/{self.id}"

    @property
    def topic_prefix(self) -> str:
        return f"t/{self.mqtt_username}"

    @property
    def tag_names(self) -> list[str]:
        return [t.tag for t in self.tags]


class DeviceTag(TenantOwned, Base):
    __tablename__ = "device_tags"
    __table_args__ = (Index("ix_device_tags_tenant_tag_device", "tenant_id", "tag", "device_id"),)

    device_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    device: Mapped[Device] = relationship(back_populates="tags")


class DeviceEvent(UUIDPrimaryKey, TenantOwned, Base):
    """A device's history (activations, resets, transfers, credentials, status changes).

    Activation hooks read it, e.g. so a reset and re-activation within a licence term does not
    take a second seat.
    """

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device_id_id", "device_id", "id"),)

    device_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(40))
    actor: Mapped[str] = mapped_column(String(320))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column()


class ActivationChallenge(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """A 6-digit code shown by a bootstrapping device and the challenge it polls with."""

    __tablename__ = "activation_challenges"
    __table_args__ = (
        Index("ix_activation_challenges_tenant_code", "tenant_id", "code"),
        UniqueConstraint("challenge"),
    )

    device_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"),
                                                 index=True)
    code: Mapped[str] = mapped_column(String(6))
    challenge: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[dt.datetime] = mapped_column()
    claimed_at: Mapped[dt.datetime | None] = mapped_column()
    claimed_by: Mapped[str | None] = mapped_column(String(320))
    released_at: Mapped[dt.datetime | None] = mapped_column()


class DeviceImport(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """One CSV import; with credentials issued, it holds the one-time credentials file."""

    __tablename__ = "device_imports"

    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id", ondelete="RESTRICT"))
    filename: Mapped[str] = mapped_column(String(255), default="")
    row_count: Mapped[int] = mapped_column()
    issued_credentials: Mapped[bool] = mapped_column(default=False)
    activated: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[str] = mapped_column(String(320))
    # Encrypted CSV of the new secrets, erased at its first download.
    credentials_file_encrypted: Mapped[str | None] = mapped_column(Text, deferred=True)
    credentials_downloaded_at: Mapped[dt.datetime | None] = mapped_column()

    @property
    def credentials_file_available(self) -> bool:
        """Whether the one-time file can still be downloaded (without loading it)."""
        return self.issued_credentials and self.credentials_downloaded_at is None
