"""``flask --app app billing-rebuild`` and ``billing-reconcile [--repair]`` through the app's CLI
runner, on real Redis and Postgres: what they print and their exit codes (docs/billing.md,
"Rebuild and reconcile")."""

from __future__ import annotations

from typing import Any

import pytest
from flask import current_app

from accounts.models import Tenant
from billing import ledger
from billing.enforcement import CreditHook, billing_keys
from core.db import db
from core.redis import get_redis
from inference.units import Units
from inference.usage import UsageEvent
from tests.billing.credit import (
    Billed,
    billed_tenant,
    billing_state,
    buy_package,
    drain,
    event_for,
    live,
    open_stream,
    run,
    serve,
)

pytestmark = pytest.mark.committed


@pytest.fixture
def cli(committed_app: Any) -> Any:
    runner = committed_app.test_cli_runner()

    def invoke(*args: str) -> Any:
        result = runner.invoke(args=list(args))
        db.session.expire_all()  # the command committed; read what it wrote
        return result

    return invoke


def a_served_tenant(app: Any, credits: int = 20) -> tuple[Billed, str]:
    """A tenant with one package and a request served from it, written to the ledger."""
    billed = billed_tenant()
    account = ledger.package_account(buy_package(billed.tenant_id, credits).id)
    run(lambda hook: serve(hook, billed, 250))  # 4 credits
    drain(app)
    return billed, account


def spendable(billed: Billed) -> tuple[dict[str, int], list[Any]]:
    """The acct hash and the pkgs sorted set, less the plan's empty allowance (0 credits,
    never in the ledger; the next request grants it again, see test_balances)."""
    acct, packages, _ = billing_state(billed.tenant_id)
    return ({k.decode(): int(v) for k, v in acct.items()
             if not (k.startswith(b"allowance:") and v == b"0")}, packages)


def slug(billed: Billed) -> str:
    tenant = db.session.get(Tenant, billed.tenant_id)
    assert tenant is not None
    return tenant.slug


def acct_key(billed: Billed) -> str:
    return billing_keys(current_app.config["ENSOUL_REDIS_PREFIX"], str(billed.tenant_id))["acct"]


# --- billing-rebuild ------------------------------------------------------------------------------


def test_rebuild_writes_every_tenant_back_after_redis_lost_its_data(committed_app: Any,
                                                                   cli: Any) -> None:
    first, account = a_served_tenant(committed_app)
    second, other = a_served_tenant(committed_app, credits=9)
    before = [spendable(first), spendable(second)]
    get_redis().flushdb()

    result = cli("billing-rebuild")
    assert result.exit_code == 0, result.output
    assert "rebuilt 2 tenants; 0 busy" in result.output
    assert [spendable(first), spendable(second)] == before
    assert live(first.tenant_id)[account] == 16 and live(second.tenant_id)[other] == 5


def test_rebuild_of_one_tenant_by_slug_or_id(committed_app: Any, cli: Any) -> None:
    billed, account = a_served_tenant(committed_app)
    other, other_account = a_served_tenant(committed_app)
    get_redis().flushdb()

    result = cli("billing-rebuild", "--tenant", slug(billed))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "rebuilt"
    assert live(billed.tenant_id)[account] == 16
    assert live(other.tenant_id) == {}  # not this one

    result = cli("billing-rebuild", "--tenant", str(other.tenant_id))
    assert result.exit_code == 0, result.output
    assert live(other.tenant_id)[other_account] == 16


def test_rebuild_skips_a_tenant_with_a_stream_in_flight_and_exits_1(committed_app: Any,
                                                                   cli: Any) -> None:
    busy, account = a_served_tenant(committed_app)
    idle, idle_account = a_served_tenant(committed_app)
    admission = run(lambda hook: open_stream(hook, busy))
    get_redis().hset(acct_key(busy), account, 1000)
    get_redis().hset(acct_key(idle), idle_account, 1000)

    result = cli("billing-rebuild")
    assert result.exit_code == 1, result.output
    assert "rebuilt 1 tenants; 1 busy (run it again)" in result.output
    assert live(busy.tenant_id)[account] == 1000  # left alone
    assert live(idle.tenant_id)[idle_account] == 16

    result = cli("billing-rebuild", "--tenant", slug(busy))
    assert result.exit_code == 1, result.output
    assert "busy: a reservation is open; run it again" in result.output

    async def finish(hook: CreditHook) -> UsageEvent:
        event = event_for(admission, Units(input_tokens=10, output_tokens=20))
        assert await hook.settle(admission, event)
        return event
    assert run(finish).credits == 2
    result = cli("billing-rebuild", "--tenant", slug(busy))  # the event is not written yet
    assert result.exit_code == 0, result.output
    assert live(busy.tenant_id)[account] == 14


def test_rebuild_of_an_unknown_tenant_is_an_error(cli: Any) -> None:
    result = cli("billing-rebuild", "--tenant", "no-such-tenant")
    assert result.exit_code != 0
    assert "no tenant with slug or id 'no-such-tenant'" in result.output


# --- billing-reconcile ----------------------------------------------------------------------------


def test_reconcile_with_nothing_to_report_exits_0(committed_app: Any, cli: Any) -> None:
    a_served_tenant(committed_app)
    result = cli("billing-reconcile")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "0 differences remain"


def test_reconcile_lists_a_difference_and_exits_1_until_repaired(committed_app: Any,
                                                                 cli: Any) -> None:
    billed, account = a_served_tenant(committed_app)
    get_redis().hincrby(acct_key(billed), account, 5)

    result = cli("billing-reconcile")
    assert result.exit_code == 1, result.output
    assert f"{billed.tenant_id} {account}: redis=21 ledger=16\n" in result.output
    assert "1 differences remain" in result.output
    assert live(billed.tenant_id)[account] == 21  # only reported

    result = cli("billing-reconcile", "--repair")
    assert result.exit_code == 0, result.output
    assert f"{billed.tenant_id} {account}: redis=21 ledger=16 (repaired)" in result.output
    assert "0 differences remain" in result.output
    assert live(billed.tenant_id)[account] == 16

    result = cli("billing-reconcile")
    assert result.exit_code == 0, result.output


def test_repair_leaves_a_tenant_with_a_stream_in_flight_and_exits_1(committed_app: Any,
                                                                    cli: Any) -> None:
    billed, account = a_served_tenant(committed_app)
    get_redis().hincrby(acct_key(billed), account, 5)
    admission = run(lambda hook: open_stream(hook, billed))  # reserves 2 of the 21

    result = cli("billing-reconcile", "--repair")
    assert result.exit_code == 1, result.output
    assert f"{billed.tenant_id} {account}: redis=19 ledger=14\n" in result.output
    assert "(repaired)" not in result.output and "1 differences remain" in result.output
    assert live(billed.tenant_id)[account] == 19

    async def finish(hook: CreditHook) -> None:
        assert await hook.settle(admission, event_for(admission, Units(input_tokens=10)))
    run(finish)  # 1 credit used, 1 given back
    result = cli("billing-reconcile", "--repair")
    assert result.exit_code == 0, result.output
    assert f"{account}: redis=20 ledger=15 (repaired)" in result.output
    assert live(billed.tenant_id)[account] == 15
