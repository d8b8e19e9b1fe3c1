"""Billing's rows: plans and their prices, versioned rate cards, purchases, licence packs and
the seats devices hold, prepaid credit packages, the tenants' billing policy and the
append-only credit ledger.

Money is integer minor units (BIGINT: a million seats at 9,000 fen is past 32 bits), or
``Numeric`` where a price per credit is a fraction of a minor unit; credits are integers.
Balances are never stored here: they are sums over the ledger.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Numeric,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, Timestamped, UUIDPrimaryKey, str_enum
from core.tenancy import TenantOwned

METRICS = ("input_tokens", "output_tokens", "audio_in_ms", "audio_out_ms", "images",
           "tool_calls")
MODALITIES = ("text", "voice", "vision")
PRICE_PER_CREDIT = Numeric(20, 6)  # minor units per credit: 0.001 cent is 0.001000


class PlanBilling(enum.StrEnum):
    PREPAID = "prepaid"  # seats bought in licence packs, each for the plan's term
    POSTPAID = "postpaid"  # billed monthly in arrears by licensed device-days


class PurchaseKind(enum.StrEnum):
    LICENCE_PACK = "licence_pack"
    PACKAGE = "package"


class PurchaseStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    CANCELLED = "cancelled"


class EntryKind(enum.StrEnum):
    GRANT = "grant"
    CONSUMPTION = "consumption"
    EXPIRY = "expiry"
    ADJUSTMENT = "adjustment"
    REFUND = "refund"


class Plan(UUIDPrimaryKey, Timestamped, Base):
    """A licence plan: what a device's seat gives it (platform-wide, run by platform admins)."""

    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("term_months > 0", name="term_months_positive"),
        CheckConstraint("grace_days >= 0", name="grace_days_not_negative"),
        CheckConstraint("allowance_credits >= 0", name="allowance_not_negative"),
        CheckConstraint("requests_per_minute > 0", name="requests_per_minute_positive"),
        CheckConstraint("concurrent_streams > 0", name="concurrent_streams_positive"),
        CheckConstraint("daily_request_cap > 0", name="daily_request_cap_positive"),
    )

    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    billing: Mapped[PlanBilling] = mapped_column(str_enum(PlanBilling, "plan_billing"))
    term_months: Mapped[int] = mapped_column()
    grace_days: Mapped[int] = mapped_column(default=0)
    # Credits per device per calendar month (tenant's time zone), prorated in the first month.
    allowance_credits: Mapped[int] = mapped_column(default=0)
    requests_per_minute: Mapped[int] = mapped_column()
    concurrent_streams: Mapped[int] = mapped_column()
    daily_request_cap: Mapped[int | None] = mapped_column()
    modalities: Mapped[list[str]] = mapped_column(JSON, default=lambda: list(MODALITIES))
    active: Mapped[bool] = mapped_column(default=True)

    prices: Mapped[list[PlanPrice]] = relationship(back_populates="plan",
                                                   order_by="PlanPrice.currency")


class PlanPrice(UUIDPrimaryKey, Base):
    """A plan as sold in one currency."""

    __tablename__ = "plan_prices"
    __table_args__ = (
        UniqueConstraint("plan_id", "currency"),
        CheckConstraint("seat_price_minor >= 0", name="seat_price_not_negative"),
        CheckConstraint("credit_value_minor >= 0", name="credit_value_not_negative"),
    )

    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"))
    currency: Mapped[str] = mapped_column(String(3))
    # Prepaid: one seat for the term. Postpaid: one licensed device for a whole month.
    seat_price_minor: Mapped[int] = mapped_column(BigInteger)
    # What one credit is worth (a device's cost this month, refunds).
    credit_value_minor: Mapped[decimal.Decimal] = mapped_column(PRICE_PER_CREDIT)

    plan: Mapped[Plan] = relationship(back_populates="prices")


class RateCard(UUIDPrimaryKey, Timestamped, Base):
    """Credits per block of metered units, per metric; a new version takes effect at
    ``effective_from`` and a request is priced by the version in effect when it was admitted."""

    __tablename__ = "rate_cards"
    __table_args__ = (
        UniqueConstraint("plan_id", "version"),
        CheckConstraint("version > 0", name="version_positive"),
    )

    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column()
    effective_from: Mapped[dt.datetime] = mapped_column()

    rates: Mapped[list[RateCardRate]] = relationship(
        back_populates="rate_card", order_by="RateCardRate.metric", cascade="all, delete-orphan")
    overage_prices: Mapped[list[OveragePrice]] = relationship(
        back_populates="rate_card", order_by="OveragePrice.currency",
        cascade="all, delete-orphan")


class RateCardRate(Base):
    __tablename__ = "rate_card_rates"
    __table_args__ = (
        CheckConstraint("block_units > 0", name="block_units_positive"),
        CheckConstraint("credits_per_block >= 0", name="credits_not_negative"),
        CheckConstraint(f"metric IN {METRICS!r}", name="metric_known"),
    )

    rate_card_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("rate_cards.id", ondelete="CASCADE"), primary_key=True)
    metric: Mapped[str] = mapped_column(String(32), primary_key=True)
    block_units: Mapped[int] = mapped_column()
    credits_per_block: Mapped[int] = mapped_column()

    rate_card: Mapped[RateCard] = relationship(back_populates="rates")


class OveragePrice(Base):
    """What one credit past the allowance and packages costs, billed in arrears."""

    __tablename__ = "overage_prices"
    __table_args__ = (CheckConstraint("credit_price_minor >= 0", name="price_not_negative"),)

    rate_card_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("rate_cards.id", ondelete="CASCADE"), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    credit_price_minor: Mapped[decimal.Decimal] = mapped_column(PRICE_PER_CREDIT)

    rate_card: Mapped[RateCard] = relationship(back_populates="overage_prices")


class PackageOffer(UUIDPrimaryKey, Timestamped, Base):
    """A prepaid credit package as the platform sells it."""

    __tablename__ = "package_offers"
    __table_args__ = (
        CheckConstraint("credits > 0", name="credits_positive"),
        CheckConstraint("validity_days > 0", name="validity_days_positive"),
    )

    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    credits: Mapped[int] = mapped_column()
    validity_days: Mapped[int] = mapped_column()
    active: Mapped[bool] = mapped_column(default=True)

    prices: Mapped[list[PackageOfferPrice]] = relationship(
        back_populates="offer", order_by="PackageOfferPrice.currency",
        cascade="all, delete-orphan")


class PackageOfferPrice(Base):
    __tablename__ = "package_offer_prices"
    __table_args__ = (CheckConstraint("price_minor >= 0", name="price_not_negative"),)

    offer_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("package_offers.id", ondelete="CASCADE"), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    price_minor: Mapped[int] = mapped_column(BigInteger)

    offer: Mapped[PackageOffer] = relationship(back_populates="prices")


class Purchase(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """A licence pack or package ordered by a tenant; it takes effect once paid."""

    __tablename__ = "purchases"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        CheckConstraint("unit_price_minor >= 0", name="unit_price_not_negative"),
        CheckConstraint("amount_minor = unit_price_minor * quantity", name="amount_is_total"),
        CheckConstraint("(kind = 'licence_pack') = (plan_id IS NOT NULL)", name="pack_has_plan"),
        CheckConstraint("(kind = 'package') = (offer_id IS NOT NULL)", name="package_has_offer"),
        Index("ix_purchases_tenant_id_id", "tenant_id", "id"),
    )

    kind: Mapped[PurchaseKind] = mapped_column(str_enum(PurchaseKind, "purchase_kind"))
    status: Mapped[PurchaseStatus] = mapped_column(str_enum(PurchaseStatus, "purchase_status"),
                                                   default=PurchaseStatus.PENDING)
    plan_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plans.id"))
    offer_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("package_offers.id"))
    quantity: Mapped[int] = mapped_column()  # seats, or packages
    currency: Mapped[str] = mapped_column(String(3))
    unit_price_minor: Mapped[int] = mapped_column(BigInteger)
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    created_by_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"))
    paid_at: Mapped[dt.datetime | None] = mapped_column()
    paid_by_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"))
    cancelled_at: Mapped[dt.datetime | None] = mapped_column()


class LicencePack(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """N seats of a plan. ``seats_used`` only grows (a retired device's seat is consumed); the
    check constraint is what keeps two concurrent activations from taking the last seat twice."""

    __tablename__ = "licence_packs"
    __table_args__ = (
        CheckConstraint("seats > 0", name="seats_positive"),
        CheckConstraint("seats_used >= 0 AND seats_used <= seats", name="seats_used_in_range"),
    )

    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"))
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("purchases.id"),
                                                          unique=True)
    seats: Mapped[int] = mapped_column()
    seats_used: Mapped[int] = mapped_column(default=0)
    activation_deadline: Mapped[dt.datetime] = mapped_column()

    plan: Mapped[Plan] = relationship()


class DeviceLicence(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """One seat held by one device: its service period runs from the device's activation for
    the plan's term, then its grace period. A renewal is a new row pointing at the one it
    renews."""

    __tablename__ = "device_licences"
    __table_args__ = (
        CheckConstraint("ends_at > starts_at", name="period_not_empty"),
        CheckConstraint("grace_ends_at >= ends_at", name="grace_after_end"),
        Index("ix_device_licences_device_ends", "device_id", "ends_at"),
        Index("ix_device_licences_tenant_ends", "tenant_id", "ends_at"),
    )

    device_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"))
    pack_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("licence_packs.id"))
    renews_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("device_licences.id"))
    starts_at: Mapped[dt.datetime] = mapped_column()
    ends_at: Mapped[dt.datetime] = mapped_column()
    grace_ends_at: Mapped[dt.datetime] = mapped_column()

    plan: Mapped[Plan] = relationship()


class CreditPackage(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """Prepaid credits pooled across the tenant's devices until ``expires_at``."""

    __tablename__ = "credit_packages"
    __table_args__ = (
        CheckConstraint("credits > 0", name="credits_positive"),
        CheckConstraint("expires_at > starts_at", name="period_not_empty"),
        Index("ix_credit_packages_tenant_expires", "tenant_id", "expires_at"),
    )

    offer_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("package_offers.id"))
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("purchases.id"))
    name: Mapped[str] = mapped_column(String(200))
    credits: Mapped[int] = mapped_column()  # as bought; the balance is the ledger's
    starts_at: Mapped[dt.datetime] = mapped_column()
    expires_at: Mapped[dt.datetime] = mapped_column()


class BillingPolicy(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """A tenant's choices: overage, automatic renewal, the postpaid plan if it uses one."""

    __tablename__ = "billing_policies"
    __table_args__ = (
        UniqueConstraint("tenant_id"),
        CheckConstraint("overage_cap_credits >= 0", name="overage_cap_not_negative"),
    )

    overage_allowed: Mapped[bool] = mapped_column(default=False)
    overage_cap_credits: Mapped[int | None] = mapped_column()  # per month; NULL: no cap
    auto_renew: Mapped[bool] = mapped_column(default=False)
    postpaid_plan_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("plans.id"))


class LedgerEntry(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """One credit movement on one account, pointing at its cause. Append-only: on Postgres a
    trigger refuses UPDATE and DELETE. The unique cause key makes every writer idempotent.

    Accounts: ``allowance:<device id>:<YYYY-MM>``, ``package:<package id>``,
    ``overage:<YYYY-MM>``. Grants are positive, consumption and expiry negative."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        UniqueConstraint("tenant_id", "account", "kind", "cause_type", "cause_id",
                         name="uq_ledger_entries_cause"),
        Index("ix_ledger_entries_tenant_account", "tenant_id", "account"),
        CheckConstraint(
            "(kind = 'grant' AND credits > 0) OR (kind IN ('consumption', 'expiry') AND "
            "credits < 0) OR (kind IN ('adjustment', 'refund') AND credits <> 0)",
            name="sign_follows_kind"),
    )

    account: Mapped[str] = mapped_column(String(100))
    kind: Mapped[EntryKind] = mapped_column(str_enum(EntryKind, "entry_kind"))
    credits: Mapped[int] = mapped_column()
    cause_type: Mapped[str] = mapped_column(String(32))  # usage_event, purchase, licence, admin
    cause_id: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(String(500))
    actor_user_id: Mapped[uuid.UUID | None] = mapped_column()
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Notification(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """Something a tenant should act on (packages running low, no free seat, a licence ending).

    ``key`` names the condition; ``open_key`` holds it while the condition lasts and is cleared
    (NULL) when it stops, so the unique pair lets one notification exist per crossing: the next
    one comes only once the condition has cleared and recurs. A licence's notification is
    never cleared: one per licence."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("tenant_id", "open_key", name="uq_notifications_open_key"),
        Index("ix_notifications_tenant_read_at", "tenant_id", "read_at"),
    )

    type: Mapped[str] = mapped_column(String(64))  # packages.low, seats.exhausted, ...
    key: Mapped[str] = mapped_column(String(200))
    open_key: Mapped[str | None] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cleared_at: Mapped[dt.datetime | None] = mapped_column()
    read_at: Mapped[dt.datetime | None] = mapped_column()


class WebhookEndpoint(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """Where a tenant's notifications are POSTed. The signing secret is needed in clear to
    compute each HMAC, so it is stored encrypted (``core.crypto``), never hashed."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (UniqueConstraint("tenant_id"),)

    url: Mapped[str] = mapped_column(String(2000))
    secret_encrypted: Mapped[str] = mapped_column(String(500))
    secret_hint: Mapped[str] = mapped_column(String(32))  # the secret's last characters
    enabled: Mapped[bool] = mapped_column(default=True)
    secret_rotated_at: Mapped[dt.datetime] = mapped_column()


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # every attempt failed


class WebhookDelivery(UUIDPrimaryKey, TenantOwned, Timestamped, Base):
    """One event sent to one endpoint, attempted until it succeeds or its attempts run out.
    ``body`` is the exact JSON sent each time (the signature covers it)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_id_id", "tenant_id", "id"),
    )

    endpoint_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    notification_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("notifications.id", ondelete="SET NULL"))
    event_id: Mapped[uuid.UUID] = mapped_column()
    event_type: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(String())
    status: Mapped[DeliveryStatus] = mapped_column(str_enum(DeliveryStatus, "delivery_status"),
                                                   default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column()
    completed_at: Mapped[dt.datetime | None] = mapped_column()

    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        order_by="WebhookAttempt.attempted_at", cascade="all, delete-orphan",
        passive_deletes=True)


class WebhookAttempt(UUIDPrimaryKey, TenantOwned, Base):
    """One try of a delivery: when, what the receiver answered (or the error), how long it
    took, and when the next try is due (NULL after the last)."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    attempted_at: Mapped[dt.datetime] = mapped_column()
    status_code: Mapped[int | None] = mapped_column()
    duration_ms: Mapped[int] = mapped_column()
    error: Mapped[str | None] = mapped_column(String(500))
    next_retry_at: Mapped[dt.datetime | None] = mapped_column()
