"""A tenant set up for credit enforcement through the real services (committed, projected to
Redis), and the credit hook on the test Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app

from billing import catalog, purchases
from billing.enforcement import CreditHook, billing_keys
from billing.models import BillingPolicy, CreditPackage, Plan
from core.db import db
from core.redis import connect_async, get_redis
from fleet import services
from fleet.models import Device, HardwareKind
from inference.directory import DeviceProfile, build_profiles
from inference.hook import Admission, Refused
from inference.service import BrokerThread
from inference.units import Units
from inference.usage import UsageEvent, UsageWriter
from tests.billing.helpers import make_offer, make_plan
from tests.factories import tenant_with_owner

T = TypeVar("T")

CREDIT_HOOK = "billing.enforcement:make_hook"  # the default, set anyway over other suites'

# 1 credit per 100 output tokens, per 1,000 input tokens, per 10 s of audio either way.
RATES = {"output_tokens": (100, 1), "input_tokens": (1000, 1), "audio_in_ms": (10_000, 1),
         "audio_out_ms": (10_000, 1)}
CHUNK = Units(output_tokens=50, audio_in_ms=1000, audio_out_ms=1000)


@dataclass
class Billed:
    tenant_id: uuid.UUID
    plan: Plan
    devices: list[Device]
    headers: dict[str, str]  # an owner's write token

    def profile(self, index: int = 0) -> DeviceProfile:
        [profile] = build_profiles(db.session, self.tenant_id, [self.devices[index].id])
        return profile


def billed_tenant(*, devices: int = 1, seats: int | None = None, allowance: int = 0,
                  rates: dict[str, tuple[int, int]] | None = None, **plan: Any) -> Billed:
    setup = tenant_with_owner()
    tenant = setup.tenant
    plan_row = make_plan(allowance_credits=allowance, requests_per_minute=100_000,
                         concurrent_streams=1000, **plan)
    catalog.publish_rate_card(plan_row, rates or RATES)
    product, _ = services.create_product(tenant.id, f"Bear {uuid.uuid4().hex[:6]}",
                                         HardwareKind.TOY)
    product.requests_per_minute = None
    if seats is None:
        seats = devices
    if seats:
        purchases.mark_paid(purchases.order_pack(tenant.id, "EUR", plan_row.id, seats))
    made = []
    for _ in range(devices):
        device = services.create_device(product, f"SN-{uuid.uuid4().hex[:12]}")
        services.issue_credentials(device)
        services.activate(device)
        made.append(device)
    db.session.commit()
    return Billed(tenant.id, plan_row, made, setup.headers)


def buy_package(tenant_id: uuid.UUID, credits: int, *, days: int = 90) -> CreditPackage:
    purchase = purchases.order_package(tenant_id, "EUR", make_offer(credits, days).id, 1)
    purchases.mark_paid(purchase)
    db.session.commit()
    return db.session.query(CreditPackage).filter_by(purchase_id=purchase.id).one()


def allow_overage(tenant_id: uuid.UUID, cap: int | None) -> None:
    db.session.add(BillingPolicy(tenant_id=tenant_id, overage_allowed=True,
                                 overage_cap_credits=cap))
    db.session.commit()


def run(scenario: Callable[[CreditHook], Coroutine[Any, Any, T]]) -> T:
    """``scenario(hook)`` with a credit hook on its own Redis client."""
    async def with_hook() -> T:
        # Few connections: 200 streams wait for one rather than 200 connects at once, which a
        # busy machine does not accept within the client's connect timeout.
        redis = connect_async(current_app.config["REDIS_URL"], max_connections=20,
                              socket_connect_timeout=10)
        try:
            return await scenario(CreditHook(redis, current_app.config["ENSOUL_REDIS_PREFIX"],
                                             chunk=CHUNK))
        finally:
            await redis.aclose()
    return asyncio.run(with_hook())


def event_for(admission: Any, units: Units, *, finish: str = "stop") -> UsageEvent:
    device = admission.device
    return UsageEvent(
        tenant_id=device.tenant_id, device_id=device.device_id, product_id=device.product_id,
        request_id=admission.request_id, admitted_at_ms=admission.admitted_at_ms,
        settled_at_ms=admission.admitted_at_ms + 100, stream_id=admission.stream_id,
        kind=admission.kind, provider="local", model="m", units=units, duration_ms=100.0,
        finish=finish, broker="test")


def open_stream(hook: CreditHook, billed: Billed, *, index: int = 0, input_tokens: int = 10
                ) -> Coroutine[Any, Any, Admission]:
    """An admitted text request (its reservation open until it is settled)."""
    return hook.admit(billed.profile(index), uuid.uuid4().hex, "text",
                      Units(input_tokens=input_tokens), stream_id=f"s-{uuid.uuid4().hex}",
                      owner="test")


async def serve(hook: CreditHook, billed: Billed, output_tokens: int, *, index: int = 0,
                input_tokens: int = 10, step: int = 10) -> UsageEvent:
    """One request as the broker runs it: admitted, its output metered ``step`` tokens at a
    time (extended whenever it passes its budget, cut when refused), then settled."""
    admission = await open_stream(hook, billed, index=index, input_tokens=input_tokens)
    used = Units(input_tokens=input_tokens)
    finish = "stop"
    try:
        while used.output_tokens < output_tokens:
            used = used + Units(output_tokens=min(step, output_tokens - used.output_tokens))
            if admission.budget is not None and not admission.budget.covers(used):
                admission.budget = await hook.extend(admission, used)
    except Refused:
        finish = "quota_exhausted"
    event = event_for(admission, used, finish=finish)
    assert await hook.settle(admission, event)
    return event


def billing_state(tenant_id: uuid.UUID) -> tuple[dict[bytes, bytes], list[Any],
                                                  dict[bytes, bytes]]:
    """What Redis holds for the tenant's balances: the acct hash, the pkgs sorted set (with
    scores) and the grants hash."""
    keys = billing_keys(current_app.config["ENSOUL_REDIS_PREFIX"], str(tenant_id))
    redis: Any = get_redis()
    return (redis.hgetall(keys["acct"]), redis.zrange(keys["pkgs"], 0, -1, withscores=True),
            redis.hgetall(keys["grants"]))


def live(tenant_id: uuid.UUID) -> dict[str, int]:
    """The acct hash: account -> credits."""
    return {k.decode(): int(v) for k, v in billing_state(tenant_id)[0].items()}


def drain(app: Any) -> None:
    """The usage writer until every stream is empty (the ledger posted)."""
    writer = UsageWriter(app, "test-writer", block_ms=10)
    while writer.drain_once():
        pass


@contextlib.contextmanager
def running_credit_broker(app: Any) -> Iterator[BrokerThread]:
    """The real inference broker in a thread, checked to run the credit hook and subscribed."""
    from core.mqtt import platform_target
    from tests.support.waiting import wait_until

    thread = BrokerThread(app, platform_target(app.config), shared=True)
    thread.start()
    try:
        assert thread.ready.wait(10), f"the broker did not start: {thread.failed}"
        assert thread.broker is not None and isinstance(thread.broker.hook, CreditHook)
        link = thread.broker.link
        assert link is not None
        wait_until(link.subscribed.is_set, 10, what="the broker's subscriptions")
        yield thread
    finally:
        thread.stop()


def mqtt_info(device: Device) -> dict[str, Any]:
    """New credentials for ``device`` (billed_tenant keeps none), synced to Mosquitto."""
    from fleet.broker_access.mosquitto import MosquittoFiles
    from fleet.topics import connection_info

    password = services.issue_credentials(device)
    db.session.commit()
    MosquittoFiles.from_config(current_app.config).sync()
    return connection_info(device, password)
