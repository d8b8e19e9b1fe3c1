"""Helpers for tests that run the inference broker as real ``flask --app app broker``
processes: their environment and process id, an MQTT monitor on the route topics,
asynchronous waits, and the TCP options of another process's sockets.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import json
import os
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.mqtt import MqttTarget
from inference.client import DeviceClient, Reply, new_request_id
from inference.hook import keys
from inference.link import MqttLink
from inference.usage import entry_data
from tests.support.processes import ManagedProcess, flask_command

SERVING = re.compile(r"inference broker (b[0-9a-f]{8}) serving on")


def broker_env(app: Any, mqtt_url: str, *, redis_url: str | None = None,
               **settings: Any) -> dict[str, str]:
    """What a ``broker`` process needs to join the test's platform (database, Redis, Mosquitto
    with the service account), plus ``ENSOUL_*`` settings such as the local provider's pace.
    A device's limits are not among them: they come with its profile, projected by the test
    process (the ``platform`` fixture's settings)."""
    config = app.config
    env = {"DATABASE_URL": config["DATABASE_URL"], "REDIS_URL": redis_url or config["REDIS_URL"],
           "MQTT_URL": mqtt_url, "SECRET_KEY": "test-secret-key",
           "ENSOUL_ENCRYPTION_KEY": "test-encryption-key",
           "ENSOUL_REDIS_PREFIX": config["ENSOUL_REDIS_PREFIX"], "ENSOUL_LOG_JSON": "1",
           "ENSOUL_INFERENCE_CHECKPOINT_MS": "100",
           "ENSOUL_LOCAL_TTFT_MS": "0", "ENSOUL_LOCAL_TOKENS_PER_SECOND": "0",
           "ENSOUL_LOCAL_ANSWER_TOKENS": "12",
           "ENSOUL_BILLING_HOOK": "inference.hook:limits_only"}  # as in the in-process tests
    env.update({key: str(value) for key, value in settings.items()})
    return env


class BrokerProcess:
    """One ``flask --app app broker`` process; its inference broker's process id (and so its
    route ``up/r/{id}``) is read from its log and changes on every start."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.process = ManagedProcess(name, flask_command("broker"), env=env, log_dir=log_dir)
        self.process_id = ""
        self._mark = 0

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        self._mark = len(self.process.output())  # the log file is appended across restarts
        self.process.ready = lambda: SERVING.search(self.output()) is not None
        self.process.start(timeout)
        found = SERVING.search(self.output())
        assert found is not None
        self.process_id = found.group(1)
        return self

    def output(self) -> str:
        """The log of the current run only."""
        return self.process.output()[self._mark:]

    @property
    def route(self) -> str:
        return f"up/r/{self.process_id}"

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def kill9(self) -> None:
        self.process.kill9()

    def stop(self) -> int:
        return self.process.stop()


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0,
                     what: str = "condition", interval: float = 0.02) -> Any:
    """``wait_until`` for the test's event loop: the device clients keep running meanwhile.
    ``predicate`` may be a coroutine function."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)  # polling interval, not synchronisation


async def until_served(device: DeviceClient, route: str, timeout: float = 15.0
                       ) -> list[dict[str, Any]]:
    """A ``hello`` sent on ``route`` is answered: that broker process is subscribed (its
    shared subscriptions came in the same SUBSCRIBE), and has handled what reached it before.
    Repeated, since one sent before the SUBACK is dropped by Mosquitto. Returns the other
    unsolicited messages that arrived meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    others: list[dict[str, Any]] = []
    while True:
        device.send({"type": "hello", "version": 1, "features": {}}, route=route)
        answer_by = loop.time() + 0.5
        while loop.time() < answer_by:
            try:
                answer = await asyncio.wait_for(device.unsolicited.get(),
                                                answer_by - loop.time())
            except TimeoutError:
                break
            if answer.get("type") == "hello":
                return others
            others.append(answer)
        if loop.time() > deadline:
            raise TimeoutError(f"no broker answered a hello on {route} within {timeout}s; "
                               f"other messages: {others[-3:]}")


def begin_on(device: DeviceClient, route: str, text: str, *,
             max_output_tokens: int | None = None) -> Reply:
    """``DeviceClient.begin`` with the request sent on a broker's route, so that process (and
    not the shared subscription's choice) admits it."""
    request_id = new_request_id()
    options: dict[str, Any] = {"speak": False}
    if max_output_tokens is not None:
        options["max_output_tokens"] = max_output_tokens
    reply = device.replies.setdefault(request_id, Reply(request_id))
    device.send({"type": "request", "id": request_id, "input": {"text": text},
                 "options": options}, route=route)
    return reply


async def first_delta(reply: Reply, timeout: float = 10.0) -> None:
    """The stream is running: its first delta arrived."""
    await eventually(lambda: reply.of_type("delta") or reply.terminal, timeout,
                     what=f"the first delta of {reply.request_id}")
    assert reply.of_type("delta"), reply.messages


def terminals(reply: Any) -> list[dict[str, Any]]:
    return [m for m in reply.messages if m.get("type") in ("end", "error")]


def usage_events(client: Any, prefix: str, tenant_id: str) -> list[dict[str, Any]]:
    stream = keys(prefix, tenant_id)["usage"]
    return [entry_data(fields) for _, fields in client.xrange(stream)]


def in_flight(client: Any, prefix: str, tenant_id: str) -> dict[str, dict[str, Any]]:
    raw = client.hgetall(keys(prefix, tenant_id)["inflight"])
    return {k.decode(): json.loads(v) for k, v in raw.items()}


class RouteMonitor:
    """The service account listening on every device's route topics (``up/r/#``): shows
    which follow-ups a broker process forwarded to another."""

    def __init__(self, target: MqttTarget) -> None:
        self.target = target
        self.messages: list[tuple[str, bytes]] = []
        self.link: MqttLink | None = None

    async def start(self) -> RouteMonitor:
        self.link = MqttLink(self.target, f"test-route-monitor-{uuid.uuid4().hex[:8]}",
                             lambda topic, payload: self.messages.append((topic, payload)),
                             subscriptions=[("t/+/d/+/up/r/#", 1)])
        await self.link.start()
        await asyncio.wait_for(self.link.subscribed.wait(), 10)
        return self

    def on(self, topic: str) -> list[bytes]:
        return [payload for seen, payload in self.messages if seen == topic]

    async def barrier(self, prefix: str) -> None:
        """Everything Mosquitto routed to the monitor before now has arrived: a marker
        published now (on a route no broker subscribes to) is delivered after it."""
        assert self.link is not None
        marker = f"{prefix}/up/r/barrier-{uuid.uuid4().hex[:8]}"
        self.link.publish(marker, b"{}", qos=1)
        await eventually(lambda: self.on(marker), 10, what="the monitor's own marker")

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.stop()


PIDFD_GETFD = 438  # the same number on every Linux architecture


def tcp_nodelay_of_connections(pid: int, port: int) -> list[int]:
    """TCP_NODELAY of every TCP socket of process ``pid`` connected to ``port``: each is
    duplicated with pidfd_getfd(2) (the test process is the parent: ptrace access)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    found = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            dup = libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if dup < 0:
                error = ctypes.get_errno()
                if error == 9:  # EBADF: closed meanwhile
                    continue
                raise OSError(error, f"pidfd_getfd({pid}, {name}): {os.strerror(error)}")
            with socket.socket(fileno=dup) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) \
                        or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer = sock.getpeername()
                except OSError:
                    continue
                if peer[1] == port:
                    found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        os.close(pidfd)
    return found
