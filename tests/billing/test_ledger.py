"""The ledger: idempotent posting, balances as sums, rows that can never change."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing import ledger
from billing.ledger import Movement
from billing.models import EntryKind
from core.db import db
from tests.fleet.fixtures import Vendor


def test_posting_the_same_cause_twice_counts_once(vendor: Vendor) -> None:
    tenant_id = vendor.setup.tenant.id
    account = ledger.package_account(uuid.uuid4())
    grant = Movement(account, EntryKind.GRANT, 1000, "purchase", "p-1")
    use = Movement(account, EntryKind.CONSUMPTION, -30, "usage_event", "dev:req:1")
    assert ledger.post(tenant_id, [grant, use]) == 2
    assert ledger.post(tenant_id, [grant, use]) == 0
    assert ledger.balance(tenant_id, account) == 970
    assert ledger.balances(tenant_id, "package:") == {account: 970}


@pytest.mark.parametrize(("kind", "credits"), [(EntryKind.GRANT, -1),
                                               (EntryKind.CONSUMPTION, 5),
                                               (EntryKind.EXPIRY, 1),
                                               (EntryKind.ADJUSTMENT, 0)])
def test_a_movement_signed_against_its_kind_is_refused(kind: EntryKind, credits: int) -> None:
    with pytest.raises(ValueError):
        Movement("package:x", kind, credits, "admin", "a-1")


def test_ledger_rows_cannot_be_updated_or_deleted(vendor: Vendor) -> None:
    tenant_id = vendor.setup.tenant.id
    account = ledger.package_account(uuid.uuid4())
    ledger.post(tenant_id, [Movement(account, EntryKind.GRANT, 10, "purchase", "p-2")])
    for statement in ("UPDATE ledger_entries SET credits = 1000000 WHERE account = :a",
                      "DELETE FROM ledger_entries WHERE account = :a"):
        with pytest.raises(DBAPIError, match="append-only"):
            with db.session.begin_nested():
                db.session.execute(text(statement), {"a": account})
    assert ledger.balance(tenant_id, account) == 10


movements = st.lists(st.tuples(st.sampled_from(["grant", "use", "expire"]),
                               st.integers(1, 10_000)), max_size=30)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=movements)
def test_the_balance_is_grants_minus_consumption_minus_expiry(vendor: Vendor,
                                                               steps: list[tuple[str, int]]
                                                               ) -> None:
    tenant_id = vendor.setup.tenant.id
    account = ledger.package_account(uuid.uuid4())
    kinds = {"grant": (EntryKind.GRANT, 1), "use": (EntryKind.CONSUMPTION, -1),
             "expire": (EntryKind.EXPIRY, -1)}
    posted = [Movement(account, kinds[k][0], kinds[k][1] * n, "test", f"{i}")
              for i, (k, n) in enumerate(steps)]
    ledger.post(tenant_id, posted)
    expected = sum(n for k, n in steps if k == "grant") - sum(n for k, n in steps if k != "grant")
    assert ledger.balance(tenant_id, account) == expected
