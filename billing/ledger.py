"""The credit ledger: append-only entries, balances as sums.

Every movement names its account and its cause; the unique key (tenant, account, kind, cause)
makes posting idempotent, so a writer that is retried after a crash (the usage writer, a
purchase marked paid twice) cannot count a movement twice. Services post and flush; the caller
commits.
"""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from billing.models import EntryKind, LedgerEntry
from core.db import db, insert_ignoring_duplicates, utcnow
from core.ids import uuid7


def allowance_account(device_id: uuid.UUID | str, month: str) -> str:
    return f"allowance:{device_id}:{month}"


def package_account(package_id: uuid.UUID | str) -> str:
    return f"package:{package_id}"


def overage_account(month: str) -> str:
    return f"overage:{month}"


def month_of(moment: dt.datetime, timezone: Any) -> str:
    """``YYYY-MM`` of ``moment`` in the tenant's time zone (allowances follow its calendar)."""
    return moment.astimezone(timezone).strftime("%Y-%m")


@dataclass(frozen=True, slots=True)
class Movement:
    account: str
    kind: EntryKind
    credits: int
    cause_type: str
    cause_id: str
    reason: str | None = None
    actor_user_id: uuid.UUID | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.credits == 0:
            raise ValueError("a ledger movement moves at least one credit")
        if self.kind is EntryKind.GRANT and self.credits < 0:
            raise ValueError("a grant adds credits")
        if self.kind in (EntryKind.CONSUMPTION, EntryKind.EXPIRY) and self.credits > 0:
            raise ValueError(f"{self.kind.value} removes credits")


def post(tenant_id: uuid.UUID, movements: Iterable[Movement], *, count_new: bool = True
         ) -> int:
    """Append the movements not yet in the ledger; returns how many were new (or, with
    ``count_new=False``, how many were sent: a plain executemany, the usage writer's path)."""
    rows: list[dict[str, Any]] = [
        {"id": uuid7(), "tenant_id": tenant_id, "account": m.account, "kind": m.kind,
         "credits": m.credits, "cause_type": m.cause_type, "cause_id": m.cause_id,
         "reason": m.reason, "actor_user_id": m.actor_user_id, "details": m.details,
         "created_at": utcnow()} for m in movements]
    if not rows:
        return 0
    # One statement compiled once per dialect, run as an executemany: the usage writer posts a
    # batch of hundreds of rows per transaction, and a statement built from the rows' values
    # would be compiled anew every time (most of the writer's time).
    if not count_new:
        for row in rows:
            row["kind"] = row["kind"].value  # by value, as the driver stores it
        insert_ignoring_duplicates(LedgerEntry.__table__, rows, UNIQUE_KEY)
        return len(rows)
    statement = _insert_ignoring_duplicates(db.session.get_bind().dialect.name)
    return len(db.session.execute(statement, rows).all())


UNIQUE_KEY = ["tenant_id", "account", "kind", "cause_type", "cause_id"]


@functools.lru_cache(maxsize=2)
def _insert_ignoring_duplicates(dialect: str) -> Any:
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = cast(Table, LedgerEntry.__table__)
    return insert(table).on_conflict_do_nothing(index_elements=UNIQUE_KEY).returning(table.c.id)


def balance(tenant_id: uuid.UUID, account: str) -> int:
    total = db.session.scalar(select(func.coalesce(func.sum(LedgerEntry.credits), 0)).where(
        LedgerEntry.tenant_id == tenant_id, LedgerEntry.account == account))
    return int(total or 0)


def balances(tenant_id: uuid.UUID, prefix: str = "") -> dict[str, int]:
    """Every account of the tenant (those starting with ``prefix``) and its balance."""
    query = select(LedgerEntry.account, func.sum(LedgerEntry.credits)).where(
        LedgerEntry.tenant_id == tenant_id).group_by(LedgerEntry.account)
    if prefix:
        query = query.where(LedgerEntry.account.startswith(prefix, autoescape=True))
    return {account: int(total) for account, total in db.session.execute(query)}


def entries(tenant_id: uuid.UUID, account: str) -> list[LedgerEntry]:
    return list(db.session.scalars(select(LedgerEntry).where(
        LedgerEntry.tenant_id == tenant_id, LedgerEntry.account == account)
        .order_by(LedgerEntry.created_at, LedgerEntry.id)))
