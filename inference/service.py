"""Run an :class:`InferenceBroker` on its own thread and event loop.

The ``broker`` process runs one next to the presence tracker; the embedded ``serve`` runs one
inside the web process. The billing hook is chosen here, so the broker imports no billing.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
from typing import Any

from flask import Flask

from core.mqtt import MqttTarget
from core.redis import connect_async
from inference.broker import BrokerSettings, InferenceBroker
from inference.hook import BillingHook, LimitsHook
from inference.providers.registry import ProviderRegistry

log = logging.getLogger(__name__)


def make_hook(app: Flask, redis: Any) -> BillingHook:
    """``ENSOUL_BILLING_HOOK`` names a factory ``module:function(app, redis)``: billing's credit
    hook by default (``config/settings.py``), ``inference.hook:limits_only`` for limits alone."""
    spec = app.config.get("ENSOUL_BILLING_HOOK")
    if spec:
        module, _, func = spec.partition(":")
        return getattr(importlib.import_module(module), func)(app, redis)  # type: ignore[no-any-return]
    return LimitsHook(redis, app.config["ENSOUL_REDIS_PREFIX"],
                      dedup_window=int(app.config["ENSOUL_INFERENCE_DEDUP_HOURS"]) * 3600)


class BrokerThread:
    def __init__(self, app: Flask, target: MqttTarget, *, shared: bool) -> None:
        self.app = app
        self.target = target
        self.shared = shared
        self.broker: InferenceBroker | None = None
        self.ready = threading.Event()
        self.refused = threading.Event()
        self.failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="inference-broker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        try:
            with self.app.app_context():
                asyncio.run(self._serve())
        except BaseException as exc:
            self.failed = exc
            log.exception("the inference broker stopped on an error")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        redis = connect_async(self.app.config["REDIS_URL"])
        broker = InferenceBroker(self.target, redis, make_hook(self.app, redis),
                                 ProviderRegistry(self.app.config),
                                 BrokerSettings.from_config(self.app.config, shared=self.shared))
        self.broker = broker
        watcher = asyncio.create_task(self._watch(broker))
        try:
            await broker.run(self._stop)
        finally:
            watcher.cancel()
            await redis.aclose()

    async def _watch(self, broker: InferenceBroker) -> None:
        await broker.ready.wait()
        self.ready.set()
        assert broker.link is not None
        await broker.link.refused.wait()
        self.refused.set()

    def stop(self, timeout: float = 15.0) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
