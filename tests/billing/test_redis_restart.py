"""A Redis restart mid-stream under the credit hook (docs/billing.md, "Bad input and failure"):
``flask --app app broker`` processes on a Redis of the test's own (the project's config, with
its AOF), devices speaking protocol v1 through the reference client. Every stream ends with one
terminal message, and its usage and credits reach the usage table and the ledger once.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from billing import balances, ledger
from billing.models import EntryKind, LedgerEntry
from core.db import db
from inference.client import DeviceClient, Reply
from inference.models import UsageEventRecord
from tests.billing.credit import (
    CREDIT_HOOK,
    billed_tenant,
    buy_package,
    drain,
    live,
    mqtt_info,
)
from tests.conftest import MosquittoInstance
from tests.inference.conftest import connect_with_retry
from tests.inference.processes import (
    BrokerProcess,
    begin_on,
    broker_env,
    eventually,
    first_delta,
    in_flight,
    terminals,
    until_served,
)
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.committed

# Ten words a second of ~2.3 metered tokens: the first budget (100 output tokens, 2 credits with
# the input's) lasts ~4 s, so a stream of SHORT words ends within it and a longer one needs
# more credit while Redis is down.
PACED = {"ENSOUL_LOCAL_TTFT_MS": 0, "ENSOUL_LOCAL_TOKENS_PER_SECOND": 10,
         "ENSOUL_LOCAL_ANSWER_TOKENS": 150}
SHORT = 20


@pytest.fixture
def redis_server(tmp_path: Path, log_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, log_dir, "redis-billing")
    server.process.start()
    try:
        yield server
    finally:
        server.process.stop()


@pytest.fixture
def credit_platform(committed_app: Any, mosquitto: MosquittoInstance, redis_server: RedisServer,
                    monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app on the suite's Mosquitto and on ``redis_server``: profiles, packages and the
    usage writer all use it."""
    for key, value in mosquitto.platform_config().items():
        monkeypatch.setitem(committed_app.config, key, value)
    monkeypatch.setitem(committed_app.config, "ENSOUL_BILLING_HOOK", CREDIT_HOOK)
    monkeypatch.setattr(committed_app.extensions["ensoul_redis"], "client", redis_server.client)
    return committed_app


@pytest.fixture
def brokers(credit_platform: Any, mosquitto: MosquittoInstance, redis_server: RedisServer,
            log_dir: Path) -> Iterator[Callable[[str], BrokerProcess]]:
    """Broker processes with the credit hook on ``redis_server``; each stopped after the test."""
    started: list[BrokerProcess] = []

    def _start(name: str) -> BrokerProcess:
        env = broker_env(credit_platform, mosquitto.url, redis_url=redis_server.url,
                         ENSOUL_BILLING_HOOK=CREDIT_HOOK, **PACED)
        process = BrokerProcess(f"{name}-{uuid.uuid4().hex[:6]}", env, log_dir)
        started.append(process)
        return process.start()

    yield _start
    for process in started:
        process.stop()


def test_a_redis_restart_mid_stream_ends_every_stream_and_bills_it_once(
        credit_platform: Any, brokers: Callable[[str], BrokerProcess],
        redis_server: RedisServer) -> None:
    billed = billed_tenant(devices=2)
    package = buy_package(billed.tenant_id, 100)
    account = ledger.package_account(package.id)
    infos = [mqtt_info(device) for device in billed.devices]
    a, b = brokers("credit-redis-a"), brokers("credit-redis-b")
    by_id = {a.process_id: a, b.process_id: b}
    prefix = credit_platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(billed.tenant_id)
    redis = redis_server.client

    async def answered(device: DeviceClient, route: str, tries: list[Reply]) -> bool:
        reply = begin_on(device, route, "Still there?", max_output_tokens=3)
        tries.append(reply)
        await asyncio.wait_for(reply.done.wait(), 15)
        return reply.start is not None

    async def scenario() -> tuple[list[Reply], list[Reply]]:
        devices: list[DeviceClient] = []
        try:
            for info in infos:
                devices.append(DeviceClient.from_mqtt_info(info))
                await connect_with_retry(devices[-1])
                for broker in (a, b):
                    await until_served(devices[-1], broker.route)
            # On each broker, from each device: a stream that ends within its first budget
            # while Redis is down, and one that needs more credit meanwhile.
            replies = [begin_on(device, broker.route, "Tell me a long story",
                                max_output_tokens=words)
                       for device in devices for broker in (a, b) for words in (SHORT, None)]
            for reply in replies:
                await first_delta(reply)
            streams = {reply.request_id: reply.start["stream"]  # type: ignore[index]
                       for reply in replies}
            assert {s.split("-", 1)[0] for s in streams.values()} == set(by_id)
            assert not [r.messages for r in replies if r.terminal], "ended before the restart"

            assert redis_server.process.stop() == 0  # SIGTERM: a clean shutdown, AOF written

            def settling_failed(stream_id: str) -> bool:
                owner = by_id[stream_id.split("-", 1)[0]]
                return f"settling {stream_id} failed" in owner.output()

            await eventually(lambda: all(settling_failed(s) for s in streams.values()), 30,
                             what="every stream to try settling while Redis is down")
            # Each end waits for its usage record.
            assert not [r.messages for r in replies if r.terminal]
            redis_server.process.start()

            await asyncio.wait_for(asyncio.gather(*(r.done.wait() for r in replies)), 30)
            await eventually(lambda: not in_flight(redis, prefix, tenant_id), 15,
                             what="no stream in flight")
            # Both keep serving (a request that meets a connection Redis closed is told to
            # retry: docs/protocol.md, "internal"); a second terminal of any stream would
            # have arrived by now.
            after: list[Reply] = []
            for device in devices:
                for broker in (a, b):
                    await eventually(functools.partial(answered, device, broker.route, after),
                                     15, what="the broker to serve again")
            return replies, after
        finally:
            for device in devices:
                await device.close()

    replies, after = asyncio.run(scenario())

    # The short streams ended while Redis was down, the long ones when they could not extend
    # their reservation; a sweeper may have settled either kind once Redis was back (before
    # its broker's next try), and told the device the stream was lost.
    for reply, words in zip(replies, itertools.cycle((SHORT, None)), strict=False):
        [terminal] = terminals(reply)
        outcome = (terminal["type"], terminal.get("finish") or terminal.get("code"))
        assert outcome in ([("end", "length")] if words else []) + [("error", "internal")], \
            reply.messages
        assert terminal["usage"]["credits"] >= 1, terminal
    served = [r for r in after if r.start is not None]
    assert len(served) == 4
    for reply in served:
        assert [(m["type"], m.get("finish")) for m in terminals(reply)] == [
            ("end", "length")], reply.messages
    for reply in after:
        if reply.start is None:
            [error] = terminals(reply)
            assert (error["type"], error["code"], error["retry_after"]) == (
                "error", "internal", 1.0), reply.messages
            assert "usage" not in error

    drain(credit_platform)
    rows = db.session.scalars(select(UsageEventRecord).where(
        UsageEventRecord.tenant_id == billed.tenant_id)).all()
    admitted = replies + served
    assert Counter(r.request_id for r in rows) == Counter(r.request_id for r in admitted)
    told = {r.request_id: terminals(r)[0]["usage"] for r in admitted}
    for row in rows:
        assert (row.credits, row.credit_split) == (
            told[row.request_id]["credits"], told[row.request_id]["credit_split"]), row.finish
        assert sum(row.credit_split.values()) == row.credits

    consumed = db.session.scalars(select(LedgerEntry).where(
        LedgerEntry.tenant_id == billed.tenant_id,
        LedgerEntry.kind == EntryKind.CONSUMPTION)).all()
    assert len(consumed) == len(rows)  # one account (the package) per request
    by_account: Counter[str] = Counter()
    for row in rows:
        by_account.update(row.credit_split)
    assert {e.account for e in consumed} == {account} == set(by_account)
    assert -sum(e.credits for e in consumed) == sum(r.credits for r in rows) == \
        by_account[account]
    assert ledger.balance(billed.tenant_id, account) == 100 - by_account[account]
    assert live(billed.tenant_id)[account] == 100 - by_account[account]
    assert balances.reconcile(billed.tenant_id) == ([], False)
