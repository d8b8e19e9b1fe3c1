"""The credit hook seen from a real device: an inference broker (in process, and as killed
``flask --app app broker`` processes) on the project's Mosquitto, with devices speaking protocol
v1 through the reference client, Redis balances and the ledger fed by the usage writer.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from flask import current_app

from billing import balances, ledger
from billing.enforcement import CreditHook, billing_keys, default_chunk
from core.mqtt import platform_target
from core.redis import connect_async, get_redis
from inference.broker import BrokerSettings, InferenceBroker
from inference.client import DeviceClient, Reply
from inference.providers.base import ProviderRequest
from inference.providers.local import LocalProvider, LocalSettings, estimate_tokens
from inference.providers.registry import ProviderRegistry
from inference.service import BrokerThread
from inference.sweeper import Sweeper, orphan_event
from tests.billing.credit import (
    CREDIT_HOOK,
    billed_tenant,
    buy_package,
    drain,
    mqtt_info,
    running_credit_broker,
)
from tests.billing.helpers import buy_seats
from tests.conftest import MosquittoInstance
from tests.inference.conftest import connect_with_retry
from tests.inference.processes import (
    BrokerProcess,
    begin_on,
    broker_env,
    eventually,
    in_flight,
    terminals,
    until_served,
    usage_events,
)

pytestmark = pytest.mark.committed



@pytest.fixture
def credit_platform(committed_app: Any, mosquitto: MosquittoInstance,
                    monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app on the suite's Mosquitto with the default credit hook and a local provider that
    answers at once with far more tokens than the small packages below pay for."""
    for key, value in mosquitto.platform_config().items():
        monkeypatch.setitem(committed_app.config, key, value)
    for key, value in {"ENSOUL_LOCAL_TTFT_MS": 0.0, "ENSOUL_LOCAL_TOKENS_PER_SECOND": 0.0,
                       "ENSOUL_LOCAL_ANSWER_TOKENS": 400,
                       "ENSOUL_INFERENCE_CHECKPOINT_MS": 100,
                       "ENSOUL_BILLING_HOOK": CREDIT_HOOK}.items():
        monkeypatch.setitem(committed_app.config, key, value)
    return committed_app


@pytest.fixture
def credit_broker(credit_platform: Any) -> Iterator[BrokerThread]:
    with running_credit_broker(credit_platform) as thread:
        yield thread


def metered(question: str) -> list[tuple[str, int]]:
    """The local provider's answer to ``question`` as the broker meters it: one delta per word
    (the first without its space), each counted with ``estimate_tokens``; cumulative."""
    words = LocalProvider(LocalSettings(answer_tokens=400)).answer_words(
        ProviderRequest(request_id="x", messages=[], text=question), None)
    deltas = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return list(zip(itertools.accumulate(deltas), itertools.accumulate(
        estimate_tokens(d) for d in deltas), strict=True))


def package_balance(tenant_id: uuid.UUID, account: str) -> int:
    prefix = current_app.config["ENSOUL_REDIS_PREFIX"]
    return int(get_redis().hget(billing_keys(prefix, str(tenant_id))["acct"], account) or 0)


# --- a cut mid-stream, as the device sees it ---------------------------------------------------


def test_a_stream_is_cut_where_its_credits_end_and_the_next_request_is_refused(
        credit_platform: Any, credit_broker: BrokerThread) -> None:
    # 1 credit per 1,000 input tokens and per 100 output tokens; chunks of 50 output tokens.
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 3)
    account = ledger.package_account(package.id)
    info = mqtt_info(billed.devices[0])
    question = "Tell me the longest story you know"

    async def scenario() -> tuple[Reply, Reply]:
        device = DeviceClient.from_mqtt_info(info)
        await connect_with_retry(device)
        try:
            reply = await device.ask(question, timeout=15)
            refused = await device.ask("And another one", timeout=15)
            return reply, refused
        finally:
            await device.close()

    reply, refused = asyncio.run(scenario())

    # Admission reserved 1 credit for the input and 1 for a chunk: a budget of 100 output
    # tokens (the whole block the chunk's credit pays for), or one more block of input.
    start = reply.start
    assert start is not None, reply.messages
    assert start["budget"]["output_tokens"] == 100
    assert start["budget"]["input_tokens"] == 2000
    [end] = terminals(reply)
    assert (end["type"], end["finish"]) == ("end", "quota_exhausted"), reply.messages
    assert reply.messages[-1] is end  # nothing after the cut
    # The stream extended once (the package's third credit: 200 tokens), then was cut: the
    # device got every delta its budget covered and not the one that crossed it, which the
    # stream was still metered (and priced) for.
    answer = metered(question)
    covered = [tokens for text, tokens in answer if tokens <= 200]
    assert reply.text == answer[len(covered) - 1][0], reply.text
    assert covered[-1] > 100  # past the first budget
    used = end["usage"]["output_tokens"]
    assert used == answer[len(covered)][1] > 200
    # Priced: 1 (input) + ceil(used / 100) = 4; the package's 3 and one credit of overdraft.
    assert end["usage"]["credits"] == 1 + -(-used // 100) == 4
    assert end["usage"]["credit_split"] == {account: 3, "overdraft": 1}
    assert [m["seq"] for m in reply.of_type("delta")] == list(
        range(len(reply.of_type("delta"))))

    [error] = terminals(refused)
    assert (error["type"], error["code"]) == ("error", "quota_exhausted"), refused.messages
    assert refused.start is None and not refused.of_type("delta")

    prefix = credit_platform.config["ENSOUL_REDIS_PREFIX"]
    [event] = usage_events(get_redis(), prefix, str(billed.tenant_id))
    assert event["request_id"] == reply.request_id and event["finish"] == "quota_exhausted"
    assert event["credits"] == 4 and event["credit_split"] == end["usage"]["credit_split"]
    assert package_balance(billed.tenant_id, account) == 0
    drain(credit_platform)
    assert ledger.balance(billed.tenant_id, account) == 0
    assert ledger.balance(billed.tenant_id, "overdraft") == -1
    assert balances.reconcile(billed.tenant_id) == ([], False)


def test_every_request_refused_for_want_of_credit_is_answered(
        credit_platform: Any, credit_broker: BrokerThread) -> None:
    billed = billed_tenant()  # no allowance, no package, no overage
    info = mqtt_info(billed.devices[0])

    async def scenario() -> list[Reply]:
        device = DeviceClient.from_mqtt_info(info)
        await connect_with_retry(device)
        try:
            # Every refusal for want of credit is answered (only rate_limited repeats drop).
            return [await device.ask(text, timeout=10) for text in ("One?", "Two?")]
        finally:
            await device.close()

    for reply in asyncio.run(scenario()):
        [error] = terminals(reply)
        assert (error["type"], error["code"]) == ("error", "quota_exhausted"), reply.messages


def test_an_unlicensed_device_is_served_once_seats_are_paid_for(
        credit_platform: Any, credit_broker: BrokerThread) -> None:
    billed = billed_tenant(seats=0)
    buy_package(billed.tenant_id, 100)
    info = mqtt_info(billed.devices[0])

    async def scenario() -> tuple[Reply, Reply]:
        device = DeviceClient.from_mqtt_info(info)
        await connect_with_retry(device)
        try:
            unlicensed = await device.ask("Hello?", timeout=15)
            # Paying for a seat licenses the waiting device; its profile is projected again
            # after the commit and the broker's cached copy is dropped (the registry channel).
            _, licensed = buy_seats(billed.tenant_id, billed.plan, 1)
            assert licensed == [billed.devices[0].id]
            answers: list[Reply] = []

            async def served() -> bool:
                answer = await device.ask("Hello again?", max_output_tokens=3, timeout=15)
                answers.append(answer)
                return answer.terminal is not None and answer.terminal["type"] == "end"

            # Well within the broker's profile cache age (60 s): the cache was invalidated.
            await eventually(served, 10, what="the licensed device to be served")
            return unlicensed, answers[-1]
        finally:
            await device.close()

    unlicensed, served = asyncio.run(scenario())
    [error] = terminals(unlicensed)
    assert (error["type"], error["code"]) == ("error", "license_required"), unlicensed.messages
    assert unlicensed.start is None
    [end] = terminals(served)
    assert end["finish"] == "length" and end["usage"]["credits"] >= 1, served.messages
    assert served.start is not None and "budget" in served.start


# --- a broker process killed mid-stream --------------------------------------------------------


@pytest.fixture
def broker_processes(credit_platform: Any, mosquitto: MosquittoInstance, log_dir: Path
                     ) -> Iterator[Callable[..., BrokerProcess]]:
    """``flask --app app broker`` processes with the credit hook; each stopped after the test."""
    started: list[BrokerProcess] = []

    def _start(name: str, **settings: Any) -> BrokerProcess:
        env = broker_env(credit_platform, mosquitto.url, ENSOUL_BILLING_HOOK=CREDIT_HOOK,
                         **settings)
        process = BrokerProcess(f"{name}-{uuid.uuid4().hex[:6]}", env, log_dir)
        started.append(process)
        return process.start()

    yield _start
    for process in started:
        process.stop()


def sweeping_broker(app: Any, redis: Any) -> InferenceBroker:
    """A broker object that is never run, with the credit hook: what a :class:`Sweeper`
    needs of one."""
    prefix = app.config["ENSOUL_REDIS_PREFIX"]
    hook = CreditHook(redis, prefix, chunk=default_chunk(app.config))
    return InferenceBroker(platform_target(app.config), redis, hook,
                           ProviderRegistry(app.config), BrokerSettings(prefix=prefix),
                           process_id="test-sweeper")


# 50 words a second of ~2.3 tokens: past the first chunks within seconds, 8 s in all.
PACED = {"ENSOUL_LOCAL_TOKENS_PER_SECOND": 50, "ENSOUL_LOCAL_ANSWER_TOKENS": 400}


def test_a_killed_brokers_stream_is_settled_once_from_its_reservation(
        credit_platform: Any, broker_processes: Any, redis_client: Any) -> None:
    billed = billed_tenant()
    package = buy_package(billed.tenant_id, 100)
    account = ledger.package_account(package.id)
    info = mqtt_info(billed.devices[0])
    a, b = broker_processes("credit-sweep-a", **PACED), broker_processes("credit-sweep-b", **PACED)
    prefix = credit_platform.config["ENSOUL_REDIS_PREFIX"]
    tenant_id = str(billed.tenant_id)
    resv = billing_keys(prefix, tenant_id)["resv"]
    killed_id = a.process_id
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        device = DeviceClient.from_mqtt_info(info)
        await connect_with_retry(device)
        redis = connect_async(credit_platform.config["REDIS_URL"])
        try:
            for broker in (a, b):
                await until_served(device, broker.route)
            reply = begin_on(device, a.route, "Tell me a very long story")
            start = await device.started(reply)
            assert start.get("type") == "start" and start["budget"]["output_tokens"] == 100
            stream_id = start["stream"]
            assert stream_id.split("-", 1)[0] == a.process_id
            # Past the first budget: the reservation was extended at least once.
            await eventually(
                lambda: in_flight(redis_client, prefix, tenant_id).get(stream_id, {}).get(
                    "units", {}).get("output_tokens", 0) > 150,
                10, what="a checkpoint past the first chunks")

            a.kill9()
            record = in_flight(redis_client, prefix, tenant_id)[stream_id]  # the last one
            reservation = orjson.loads(redis_client.hget(resv, stream_id))
            reserved = sum(n for _, n in reservation["a"])
            assert record["owner"] == killed_id and reserved >= 3
            assert {acc for acc, _ in reservation["a"]} == {account}
            assert package_balance(billed.tenant_id, account) == 100 - reserved

            await asyncio.wait_for(reply.done.wait(), 20)  # heartbeat TTL 5 s, sweeps ~2 s
            [terminal] = terminals(reply)
            assert terminal["type"] == "error" and terminal["code"] == "internal", terminal
            units = record["units"]
            price = -(-units["input_tokens"] // 1000) + -(-units["output_tokens"] // 100)
            assert terminal["usage"] == {**units, "credits": price,
                                         "credit_split": {account: price}}
            [event] = [e for e in usage_events(redis_client, prefix, tenant_id)
                       if e["request_id"] == reply.request_id]
            assert event["settled_by"] == "sweeper" and event["broker"] == b.process_id
            assert event["units"] == units and event["credits"] == price
            assert event["credit_split"] == {account: price}
            assert event["rate_card_version"] == reservation["v"]
            assert stream_id not in in_flight(redis_client, prefix, tenant_id)
            assert not redis_client.hexists(resv, stream_id)
            # What was reserved and not used went back to the package.
            assert package_balance(billed.tenant_id, account) == 100 - price

            # Settling it again (a racing sweeper, the broker coming back) changes nothing.
            hook = CreditHook(redis, prefix, chunk=default_chunk(credit_platform.config))
            assert not await hook.settle(None, orphan_event(record, event["settled_at_ms"], "x"))
            assert await Sweeper(sweeping_broker(credit_platform, redis)).sweep() == 0
            events = [e for e in usage_events(redis_client, prefix, tenant_id)
                      if e["request_id"] == reply.request_id]
            assert len(events) == 1 and len(terminals(reply)) == 1, (events, reply.messages)
            assert package_balance(billed.tenant_id, account) == 100 - price
            seen.update(price=price)
        finally:
            await redis.aclose()
            await device.close()

    asyncio.run(scenario())

    drain(credit_platform)
    assert ledger.balance(billed.tenant_id, account) == 100 - seen["price"]
    assert package_balance(billed.tenant_id, account) == 100 - seen["price"]
    assert balances.reconcile(billed.tenant_id) == ([], False)
