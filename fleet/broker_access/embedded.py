"""The embedded adapter: amqtt plugins that apply the registry and :mod:`fleet.topics`.

``core.embedded_broker`` installs :class:`EmbeddedAuthPlugin` and :class:`EmbeddedTopicPlugin`
(with the Flask app in their config). A device logs in with its username and password, checked
against the stored ``$7$`` hash; every publish, subscribe and delivery is checked against the
topic table and against the device still having broker access. Device rows are cached in the
process and dropped by :meth:`EmbeddedAccess.sync`, which runs in the same process after every
registry change (the embedded profile runs jobs in-process). amqtt cannot disconnect a client
from a plugin, so a revoked device that is still connected is not kicked: from the next sync on
everything it publishes or subscribes is refused and nothing is delivered to it.

The platform's own clients log in with the credentials in ``MQTT_URL`` (made up per process).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from flask import Flask
from sqlalchemy import func, select

from core.db import db
from fleet.broker_access.rules import (
    DeviceLogin,
    device_ids,
    has_broker_access,
    load_device_login,
    service_account,
    service_may,
)
from fleet.credentials import verify_password
from fleet.models import Device
from fleet.topics import device_may

log = logging.getLogger(__name__)


class _LoginCache:
    """Device rows by username, shared by the plugins and dropped on every registry change."""

    def __init__(self) -> None:
        self._rows: dict[str, DeviceLogin | None] = {}
        self._lock = threading.Lock()

    def get(self, app: Flask, username: str) -> DeviceLogin | None:
        with self._lock:
            if username in self._rows:
                return self._rows[username]
        with app.app_context():
            row = load_device_login(username)
        with self._lock:
            self._rows[username] = row
        return row

    def cached(self, username: str) -> tuple[bool, DeviceLogin | None]:
        with self._lock:
            return username in self._rows, self._rows.get(username)

    def clear(self) -> None:
        with self._lock:
            self._rows.clear()


logins = _LoginCache()


class EmbeddedAccess:
    def sync(self) -> dict[str, Any]:
        logins.clear()
        devices = db.session.execute(
            select(func.count()).select_from(Device).where(has_broker_access())).scalar_one()
        return {"devices": devices, "changed": True, "reloaded": False}

    def reconcile(self) -> dict[str, Any]:
        return self.sync()


async def _login(app: Flask, username: str) -> DeviceLogin | None:
    found, row = logins.cached(username)
    if found:
        return row
    # A cache miss queries the database: off the broker's event loop.
    return await asyncio.to_thread(logins.get, app, username)


class _PlatformRules:
    """What both plugins need: the Flask app (from the plugin config) and the service login."""

    @dataclass
    class Config:
        app: Any = None

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)  # type: ignore[call-arg]
        self.app: Flask = self.config.app  # type: ignore[attr-defined]
        self.service = service_account(self.app.config)


class EmbeddedAuthPlugin(_PlatformRules, BaseAuthPlugin):

    async def authenticate(self, *, session: Session) -> bool | None:
        try:
            username, password = session.username, session.password or ""
            if self.service is not None and username == self.service.username:
                return self.service.matches(username, password)
            if device_ids(username) is None:
                return False
            assert username is not None
            login = await _login(self.app, username)
            return bool(login and login.allowed and verify_password(login.password_hash,
                                                                      password))
        except Exception:  # a broken check refuses the login, it never crashes the broker
            log.exception("embedded broker authentication failed")
            return False


class EmbeddedTopicPlugin(_PlatformRules, BaseTopicPlugin):

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        try:
            if session is None or not topic or action is None:
                return False
            username = session.username
            if self.service is not None and username == self.service.username:
                return service_may(topic)
            # Receiving is reading, like a subscription.
            verb = "publish" if action is Action.PUBLISH else "subscribe"
            if username is None or not device_may(username, topic, verb):
                return False
            login = await _login(self.app, username)
            return bool(login and login.allowed)
        except Exception:
            log.exception("embedded broker topic check failed")
            return False


ACCESS_PLUGINS = (f"{__name__}.EmbeddedAuthPlugin", f"{__name__}.EmbeddedTopicPlugin")


def broker_plugins(app: Flask) -> dict[str, Any]:
    """The amqtt ``plugins`` config that puts the platform's access rules in the broker."""
    return {path: {"app": app} for path in ACCESS_PLUGINS}
