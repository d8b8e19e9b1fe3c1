"""Inference fixtures: a Mosquitto of this suite, active devices with credentials, broker
threads of the real broker on it, and reference device clients driven by one event loop.

Tests are plain functions; ``run(coro)`` drives a coroutine on the test's loop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from flask import current_app

from core.db import db
from core.mqtt import platform_target
from fleet import services
from fleet.broker_access.mosquitto import MosquittoFiles
from fleet.models import Device, HardwareKind, Product
from fleet.topics import connection_info
from inference.client import DeviceClient
from inference.service import BrokerThread
from tests.conftest import MosquittoInstance, running_mosquitto
from tests.factories import TenantFactory
from tests.support.waiting import wait_until

T = TypeVar("T")


@pytest.fixture(scope="session")
def inference_mosquitto(log_dir: Path) -> Iterator[MosquittoInstance]:
    with running_mosquitto(log_dir, "inference-mosquitto") as instance:
        yield instance


@dataclass
class Fleet:
    product: Product
    devices: list[tuple[Device, str]]  # device, MQTT password

    def info(self, index: int = 0) -> dict[str, Any]:
        device, password = self.devices[index]
        return connection_info(device, password)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Callable[[Coroutine[Any, Any, T]], T]:
    def _run(coroutine: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coroutine)
    return _run


@pytest.fixture
def platform(committed_app: Any, inference_mosquitto: MosquittoInstance,
             monkeypatch: pytest.MonkeyPatch) -> Any:
    """The app on this suite's Mosquitto, a fast local provider, generous limits, and the
    broker's limits-only hook (billing's tests run the credit hook: tests/billing)."""
    for key, value in inference_mosquitto.platform_config().items():
        monkeypatch.setitem(committed_app.config, key, value)
    for key, value in {"ENSOUL_LOCAL_TTFT_MS": 0.0, "ENSOUL_LOCAL_TOKENS_PER_SECOND": 0.0,
                       "ENSOUL_LOCAL_ANSWER_TOKENS": 12,
                       "ENSOUL_INFERENCE_REQUESTS_PER_MINUTE": 1000,
                       "ENSOUL_INFERENCE_CONCURRENT_STREAMS": 4,
                       "ENSOUL_INFERENCE_CHECKPOINT_MS": 100,
                       "ENSOUL_BILLING_HOOK": "inference.hook:limits_only"}.items():
        monkeypatch.setitem(committed_app.config, key, value)
    return committed_app


def make_fleet(count: int = 1, *, status: str = "active", **product_limits: Any) -> Fleet:
    tenant = TenantFactory()
    product, _ = services.create_product(tenant.id, f"Bear {uuid.uuid4().hex[:6]}",
                                         HardwareKind.TOY)
    for key, value in product_limits.items():
        setattr(product, key, value)
    devices = []
    for _ in range(count):
        device = services.create_device(product, f"SN-{uuid.uuid4().hex[:12]}")
        password = services.issue_credentials(device)
        if status == "active":
            services.activate(device)
        devices.append((device, password))
    db.session.commit()  # after commit: profiles projected to Redis
    MosquittoFiles.from_config(current_app.config).sync()
    return Fleet(product, devices)


@pytest.fixture
def fleet(platform: Any) -> Fleet:
    return make_fleet(2)


@pytest.fixture
def start_broker(platform: Any) -> Iterator[Callable[..., BrokerThread]]:
    started: list[BrokerThread] = []

    def _start(*, shared: bool = True) -> BrokerThread:
        thread = BrokerThread(platform, platform_target(platform.config), shared=shared)
        thread.start()
        assert thread.ready.wait(10), f"the broker did not start: {thread.failed}"
        assert thread.broker is not None and thread.broker.link is not None
        started.append(thread)
        return thread

    yield _start
    for thread in started:
        thread.stop()


@pytest.fixture
def broker(start_broker: Callable[..., BrokerThread]) -> BrokerThread:
    thread = start_broker()
    link = thread.broker.link  # type: ignore[union-attr]
    wait_until(link.subscribed.is_set, 10,  # type: ignore[union-attr]
               what="the broker's subscriptions")
    return thread


@pytest.fixture
def device(fleet: Fleet, broker: BrokerThread, run: Callable[..., Any]) -> Iterator[DeviceClient]:
    client = DeviceClient.from_mqtt_info(fleet.info(0))
    run(connect_with_retry(client))
    yield client
    run(client.close())


async def connect_with_retry(client: DeviceClient, timeout: float = 10.0) -> None:
    """Mosquitto applies a reload of its password file a moment after the signal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await client.connect(timeout=2)
            return
        except ConnectionError:
            if client.link is not None:
                await client.link.stop()
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
