"""A tenant's usage as the billing pages and the usage CSV show it: requests, credits and raw
metered units per calendar day (the tenant's), per product and per device, summed from the
``usage_events`` table by the database.

A request counts on the day it was admitted: ``admitted_at`` fixes its rate card version and is
the column the table is indexed (and will be partitioned) by; a request the sweeper settles
late stays on the day it started.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, and_, func, select

from billing.models import METRICS
from billing.reports import DayWindow
from core.db import db
from fleet.models import Device, Product
from inference.models import UsageEventRecord as Usage

CSV_CHUNK_ROWS = 1000


@dataclass(frozen=True, slots=True)
class Totals:
    requests: int = 0
    credits: int = 0
    units: dict[str, int] = field(default_factory=lambda: dict.fromkeys(METRICS, 0))


@dataclass(frozen=True, slots=True)
class Filters:
    """Narrow a report to one product and/or one device (ids the caller checked are the
    tenant's own)."""

    product_id: uuid.UUID | None = None
    device_id: uuid.UUID | None = None


def _events(tenant_id: uuid.UUID, filters: Filters, *conditions: Any) -> Select[Any]:
    stmt = select(Usage).where(Usage.tenant_id == tenant_id, *conditions)
    if filters.product_id is not None:
        stmt = stmt.where(Usage.product_id == filters.product_id)
    if filters.device_id is not None:
        stmt = stmt.where(Usage.device_id == filters.device_id)
    return stmt


def _sums(source: Any) -> list[Any]:
    return [func.count().label("requests"),
            func.coalesce(func.sum(source.credits), 0).label("credits"),
            *(func.coalesce(func.sum(getattr(source, m)), 0).label(m) for m in METRICS)]


def _totals(row: Any) -> Totals:
    return Totals(int(row.requests), int(row.credits), {m: int(getattr(row, m)) for m in METRICS})


def _by_day(tenant_id: uuid.UUID, window: DayWindow, filters: Filters, *keys: Any) -> Any:
    """The window's events as a subquery: ``day`` (the window's index), the ``keys`` columns,
    credits and units."""
    return _events(tenant_id, filters, window.contains(Usage.admitted_at)).with_only_columns(
        window.day_of(Usage.admitted_at).label("day"), *keys, Usage.credits,
        *(getattr(Usage, m) for m in METRICS)).subquery("usage")


def per_day(tenant_id: uuid.UUID, window: DayWindow,
            filters: Filters = Filters()) -> list[tuple[dt.date, Totals]]:
    """Every day of the window with its totals, days without usage included."""
    events = _by_day(tenant_id, window, filters)
    found = {row.day: _totals(row) for row in db.session.execute(
        select(events.c.day, *_sums(events.c)).group_by(events.c.day))}
    return [(day, found.get(index, Totals())) for index, day in enumerate(window.days)]


@dataclass(frozen=True, slots=True)
class ProductUsage:
    product_id: uuid.UUID | None
    name: str | None
    totals: Totals


def per_product(tenant_id: uuid.UUID, window: DayWindow,
                filters: Filters = Filters()) -> list[ProductUsage]:
    """The window's totals per product, the most credits first."""
    events = _by_day(tenant_id, window, filters, Usage.product_id)
    grouped = select(events.c.product_id, *_sums(events.c)).group_by(
        events.c.product_id).subquery("grouped")
    rows = db.session.execute(
        select(grouped, Product.name).outerjoin(Product, and_(
            Product.id == grouped.c.product_id, Product.tenant_id == tenant_id))
        .order_by(grouped.c.credits.desc(), grouped.c.requests.desc(), Product.name))
    return [ProductUsage(row.product_id, row.name, _totals(row)) for row in rows]


@dataclass(frozen=True, slots=True)
class DeviceCost:
    device_id: uuid.UUID
    device: Device | None
    requests: int
    credits: int


def device_costs(tenant_id: uuid.UUID, since: dt.datetime, *, filters: Filters = Filters(),
                 limit: int = 100) -> tuple[list[DeviceCost], int]:
    """Credits per device admitted since ``since`` (the month's start), the costliest first,
    and how many devices used any."""
    requests = func.count().label("requests")
    credits = func.coalesce(func.sum(Usage.credits), 0).label("credits")
    grouped = _events(tenant_id, filters, Usage.admitted_at >= since).with_only_columns(
        Usage.device_id, requests, credits).group_by(Usage.device_id)
    total = db.session.scalar(select(func.count()).select_from(grouped.subquery())) or 0
    rows = list(db.session.execute(grouped.order_by(credits.desc(), requests.desc(),
                                                    Usage.device_id).limit(limit)))
    devices = {d.id: d for d in db.session.scalars(select(Device).where(
        Device.tenant_id == tenant_id, Device.id.in_([r.device_id for r in rows])))}
    return [DeviceCost(r.device_id, devices.get(r.device_id), int(r.requests), int(r.credits))
            for r in rows], total


CSV_COLUMNS = ("day", "product_id", "product", "device_id", "serial", "requests", "credits",
               *METRICS)


def csv_rows(tenant_id: uuid.UUID, window: DayWindow,
             filters: Filters = Filters()) -> Iterator[tuple[Any, ...]]:
    """One row per day, product and device with usage (:data:`CSV_COLUMNS`), by day, product
    name and serial, fetched from the database a chunk at a time.

    A generator: the query runs when the first row is asked for. A streamed response asks after
    the request's transaction has committed, so the rows come from a read of their own."""
    events = _by_day(tenant_id, window, filters, Usage.product_id, Usage.device_id)
    grouped = select(events.c.day, events.c.product_id, events.c.device_id,
                     *_sums(events.c)).group_by(events.c.day, events.c.product_id,
                                                events.c.device_id).subquery("grouped")
    stmt = (select(grouped, Product.name, Device.serial)
            .outerjoin(Product, and_(Product.id == grouped.c.product_id,
                                     Product.tenant_id == tenant_id))
            .outerjoin(Device, and_(Device.id == grouped.c.device_id,
                                    Device.tenant_id == tenant_id))
            .order_by(grouped.c.day, func.coalesce(Product.name, ""),
                      func.coalesce(Device.serial, ""), grouped.c.device_id)
            .execution_options(yield_per=CSV_CHUNK_ROWS))
    for row in db.session.execute(stmt):
        yield (window.days[row.day], row.product_id, row.name, row.device_id, row.serial,
               int(row.requests), int(row.credits), *(int(getattr(row, m)) for m in METRICS))
