"""The device page's "Try it", end to end: the live server, this suite's Mosquitto and the real
inference broker. The answer streams into the page while the device itself stays connected and
hears the same answer; the settled request and its transcript then appear on the page."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import select

from accounts import services as accounts
from accounts.models import AuditEntry, Role, Tenant
from core.db import db
from inference.client import DeviceClient
from inference.service import BrokerThread
from inference.usage import UsageWriter
from tests.browser.test_fleet_browser import PASSWORD, log_in
from tests.inference.conftest import (  # noqa: F401 - fixtures
    Fleet,
    broker,
    connect_with_retry,
    inference_mosquitto,
    make_fleet,
    platform,
    start_broker,
)

pytestmark = pytest.mark.browser
T = TypeVar("T")


@pytest.fixture
def fleet(platform: Any) -> Fleet:  # noqa: F811
    return make_fleet(1)


@pytest.fixture
def device_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The device's event loop on a thread of its own (Playwright's sync API runs one here)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="device-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)


@pytest.fixture
def member(fleet: Fleet) -> str:
    user = accounts.create_user("try@vendor.example", PASSWORD, "Tara Try")
    accounts.add_member(db.session.get(Tenant, fleet.product.tenant_id), user, Role.DEVELOPER)
    db.session.commit()
    return user.email


@pytest.fixture
def online_device(fleet: Fleet, broker: BrokerThread,  # noqa: F811
                  device_loop: asyncio.AbstractEventLoop) -> Iterator[DeviceClient]:
    client = DeviceClient.from_mqtt_info(fleet.info(0))
    on(device_loop, connect_with_retry(client))
    yield client
    on(device_loop, client.close())


def test_try_it_streams_the_answer_into_the_page(
        page: Page, live_server: str, platform: Any, fleet: Fleet, member: str,  # noqa: F811
        online_device: DeviceClient, device_loop: asyncio.AbstractEventLoop) -> None:
    device = fleet.devices[0][0]
    log_in(page, live_server, member)
    page.goto(f"{live_server}/fleet/devices/{device.id}")
    expect(page.get_by_test_id("try-it")).to_contain_text("it receives the answer too")

    page.get_by_test_id("try-text").fill("Hello there, bear!")
    page.get_by_test_id("try-submit").click()
    expect(page.get_by_test_id("try-answer")).to_contain_text("You asked: Hello there, bear!")
    expect(page.get_by_test_id("try-finish")).to_have_text("stop")
    expect(page.get_by_test_id("try-state")).to_have_text("Done.")
    expect(page.get_by_test_id("try-usage")).to_contain_text("12 output tokens")
    expect(page.get_by_test_id("try-first-delta")).to_contain_text(
        re.compile(r"\d+ ms on the platform, \d+ ms to this page"))
    expect(page.get_by_test_id("try-error")).to_be_hidden()
    expect(page.get_by_test_id("try-submit")).to_be_enabled()
    page.screenshot(path="/tmp/try_it.png", full_page=True)

    db.session.expire_all()
    [entry] = db.session.execute(select(AuditEntry).where(AuditEntry.action == "device.try")
                                 ).scalars()
    request_id = entry.details["request_id"]
    assert entry.target_id == str(device.id) and entry.actor_label == member

    # The device was not disturbed: still connected, and it heard the same answer.
    async def heard() -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1].get("type") != "end":
            message = await asyncio.wait_for(online_device.unsolicited.get(), 10)
            if message.get("id") == request_id:
                seen.append(message)
        return seen

    messages = on(device_loop, heard())
    assert online_device.link is not None and online_device.link.connected.is_set()
    assert messages[0]["type"] == "start" and messages[-1]["finish"] == "stop"
    assert "".join(m["text"] for m in messages if m["type"] == "delta").startswith(
        "You asked: Hello there, bear!")

    # Once the usage writer has the settled request, the page lists it, and the transcript.
    while UsageWriter(platform, "try-test", block_ms=10).drain_once():
        pass
    page.reload()
    row = page.locator(f'[data-testid=device-request][data-request-id="{request_id}"]')
    expect(row).to_have_attribute("data-finish", "stop")
    expect(page.get_by_test_id("transcript-asked").first).to_have_text("Hello there, bear!")
