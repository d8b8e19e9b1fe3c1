"""A worker process of the simulated fleet: one asyncio loop holding a share of the devices.

It talks to the parent over a pipe. Parent -> worker: ``("connect",)``, ``("publish", device_id,
suffix, payload, qos, retain)``, ``("stats",)``, ``("stop", announce_offline)``. Worker ->
parent: ``("ready", pid)``, ``("connected", stats)``, ``("stats", stats)``, ``("stopped",
stats)`` and, when messages are forwarded, ``("message", device_id, topic, payload)``.

A *behaviour* (``"package.module:function"``) is an ``async def f(device: AsyncDevice) ->
dict | None`` started for each device once it is connected; it runs inside the worker, next to
the socket, so a later benchmark (inference requests) measures without a process hop. Its
return values come back in the stats under ``behaviour_results``.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
import traceback
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from bench.simulator.device import AsyncDevice
from bench.simulator.identity import DeviceIdentity


def load_behaviour(spec: str | None) -> Any:
    if not spec:
        return None
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


class Worker:
    def __init__(self, conn: Connection, identities: list[dict[str, Any]],
                 options: dict[str, Any]) -> None:
        self.conn = conn
        self.options = options
        self.identities = [DeviceIdentity(**i) for i in identities]
        self.devices: dict[str, AsyncDevice] = {}
        self.behaviour = load_behaviour(options.get("behaviour"))
        self.behaviour_tasks: list[asyncio.Task[Any]] = []
        self.behaviour_errors: list[str] = []
        self.commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.connect_started = 0.0
        self.connect_finished = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        forward = self.options.get("forward_messages", False)
        for identity in self.identities:
            self.devices[identity.device_id] = AsyncDevice(
                identity, loop, keepalive=self.options.get("keepalive", 60),
                on_message=self._forward if forward else None)
        loop.add_reader(self.conn.fileno(), self._read_commands)
        ticker = asyncio.create_task(self._tick())
        self.conn.send(("ready", os.getpid()))
        try:
            while True:
                command = await self.commands.get()
                if not await self._handle(command):
                    break
        finally:
            ticker.cancel()
            loop.remove_reader(self.conn.fileno())

    def _read_commands(self) -> None:
        try:
            while self.conn.poll():
                self.commands.put_nowait(self.conn.recv())
        except (EOFError, OSError):  # the parent went away: stop quietly
            self.commands.put_nowait(("stop", False))

    def _forward(self, device: AsyncDevice, topic: str, payload: bytes) -> None:
        self.conn.send(("message", device.identity.device_id, topic, payload))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for device in self.devices.values():
                device.tick()

    async def _handle(self, command: tuple[Any, ...]) -> bool:
        kind = command[0]
        if kind == "connect":
            await self._connect_all()
            self.conn.send(("connected", self.stats()))
        elif kind == "publish":
            _, device_id, suffix, payload, qos, retain = command
            self.devices[device_id].publish(suffix, payload, qos=qos, retain=retain)
        elif kind == "stats":
            self.conn.send(("stats", self.stats()))
        elif kind == "stop":
            await self._stop(bool(command[1]) if len(command) > 1 else True)
            self.conn.send(("stopped", self.stats()))
            return False
        return True

    async def _connect_all(self) -> None:
        limit = asyncio.Semaphore(self.options.get("connect_concurrency", 8))
        timeout = self.options.get("connect_timeout", 30.0)

        async def one(device: AsyncDevice) -> None:
            async with limit:
                ok = await device.connect(timeout)
            if ok and self.behaviour is not None:
                self.behaviour_tasks.append(asyncio.create_task(self.behaviour(device)))

        self.connect_started = time.monotonic()
        await asyncio.gather(*(one(d) for d in self.devices.values()))
        self.connect_finished = time.monotonic()

    async def _stop(self, announce_offline: bool) -> None:
        for task in self.behaviour_tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*self.behaviour_tasks, return_exceptions=True)
        for device in self.devices.values():
            device.disconnect(announce_offline=announce_offline)
        deadline = time.monotonic() + 5.0
        while any(d.connected for d in self.devices.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stats(self) -> dict[str, Any]:
        devices = list(self.devices.values())
        results, errors = [], list(self.behaviour_errors)
        for task in self.behaviour_tasks:
            if not task.done() or task.cancelled():
                continue
            if task.exception() is not None:
                exc = task.exception()
                errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
            elif task.result() is not None:
                results.append(task.result())
        return {
            "pid": os.getpid(),
            "devices": len(devices),
            "connected_now": sum(d.connected for d in devices),
            "connected_once": sum(d.connect_seconds is not None for d in devices),
            "failures": dict(Counter(d.failure for d in devices if d.failure)),
            "connect_seconds": [d.connect_seconds for d in devices if d.connect_seconds],
            "connect_started": self.connect_started,
            "connect_finished": self.connect_finished,
            "disconnects": sum(d.disconnects for d in devices),
            "published": sum(d.published for d in devices),
            "received": sum(d.received for d in devices),
            "behaviour_results": results,
            "behaviour_errors": errors[:20],
        }


def main(fd: int) -> None:
    from bench.common import raise_nofile_limit

    raise_nofile_limit()
    conn = Connection(fd)
    identities, options = conn.recv()
    asyncio.run(Worker(conn, identities, options).run())
    conn.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
