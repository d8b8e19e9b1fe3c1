"""The simulated fleet as other code uses it: start, publish, read messages, stop.

    fleet = SimulatedFleet(identities)
    report = fleet.start()            # every device connected (or failed), with timings
    fleet.publish(fleet.devices[0], "up", b'{"type": "hello"}')
    device_id, topic, payload = fleet.messages.get(timeout=1)   # with forward_messages=True
    final = fleet.stop()

Devices are spread over a few worker processes (``python -m bench.simulator.worker``, started
fresh: no Flask or database state is inherited and the caller's ``__main__`` is not re-imported),
each holding its share on one asyncio loop and talking to the fleet over a socket pair. A device
is addressed by its id; the fleet knows which worker holds it.
"""

from __future__ import annotations

import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from bench.common import PROJECT_ROOT, summary_ms
from bench.simulator.identity import DeviceIdentity

DEVICES_PER_WORKER = 2_500
# Connects in flight per worker. Mosquitto listens with a backlog of 100: with 4 workers x 32
# the backlog overflowed and dropped SYNs came back after 1 s (CONNACK p99 1.7 s, against
# 0.14 s with 4 x 8, and a higher connect rate).
CONNECT_CONCURRENCY = 8


@dataclass
class FleetReport:
    devices: int
    connected: int
    failures: dict[str, int]
    connect_wall_seconds: float
    connects_per_second: float
    connack: dict[str, float]
    workers: int
    disconnects: int = 0
    published: int = 0
    received: int = 0
    behaviour_results: list[Any] = field(default_factory=list)
    behaviour_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "behaviour_results"} | {
            "behaviour_results": len(self.behaviour_results)}


def default_workers(devices: int) -> int:
    return max(1, min(8, math.ceil(devices / DEVICES_PER_WORKER)))


class SimulatedFleet:
    def __init__(self, identities: Sequence[DeviceIdentity], *, workers: int | None = None,
                 keepalive: int = 60, connect_concurrency: int = CONNECT_CONCURRENCY,
                 connect_timeout: float = 30.0, behaviour: str | None = None,
                 forward_messages: bool = False) -> None:
        self.devices = list(identities)
        self.workers = min(workers or default_workers(len(self.devices)), len(self.devices)) or 1
        self.options = {"keepalive": keepalive, "connect_concurrency": connect_concurrency,
                        "connect_timeout": connect_timeout, "behaviour": behaviour,
                        "forward_messages": forward_messages}
        self.messages: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._conns: list[Connection] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._replies: dict[Connection, queue.Queue[tuple[Any, ...]]] = {}
        self._owner: dict[str, Connection] = {}
        self._reader: threading.Thread | None = None
        self._running = False

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 300.0) -> FleetReport:
        """Spawn the workers, then connect every device at once; return the connect report."""
        shares = [self.devices[i::self.workers] for i in range(self.workers)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
        for share in shares:
            ours, theirs = socket.socketpair()
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.simulator.worker", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, cwd=PROJECT_ROOT)
            theirs.close()
            parent = Connection(ours.detach())
            parent.send(([d.to_dict() for d in share], self.options))
            self._conns.append(parent)
            self._procs.append(proc)
            self._replies[parent] = queue.Queue()
            self._owner.update({d.device_id: parent for d in share})
        self._running = True
        self._reader = threading.Thread(target=self._read, name="fleet-reader", daemon=True)
        self._reader.start()
        self._collect("ready", timeout=60)
        for conn in self._conns:
            conn.send(("connect",))
        return self._report(self._collect("connected", timeout))

    def stop(self, *, announce_offline: bool = True, timeout: float = 60.0) -> FleetReport:
        """Disconnect every device (saying offline first unless told not to); end the workers."""
        if not self._running:
            raise RuntimeError("the fleet is not running")
        for conn in self._conns:
            conn.send(("stop", announce_offline))
        stats = self._collect("stopped", timeout)
        self._running = False
        for proc in self._procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for conn in self._conns:
            conn.close()
        return self._report(stats)

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._running:
            self.stop()

    # --- while running -------------------------------------------------------------------

    def publish(self, device: DeviceIdentity | str, suffix: str, payload: str | bytes, *,
                qos: int = 0, retain: bool = False) -> None:
        """Publish on one of the device's own topics (``up``, ``up/audio``, ``state``...)."""
        device_id = device if isinstance(device, str) else device.device_id
        self._owner[device_id].send(("publish", device_id, suffix, payload, qos, retain))

    def stats(self, timeout: float = 30.0) -> FleetReport:
        for conn in self._conns:
            conn.send(("stats",))
        return self._report(self._collect("stats", timeout))

    # --- plumbing ------------------------------------------------------------------------

    def _read(self) -> None:
        while self._running:
            for conn in wait(self._conns, timeout=0.2):
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._replies[conn].put(("dead",))  # type: ignore[index]
                    continue
                if message[0] == "message":
                    self.messages.put(message[1:])
                else:
                    self._replies[conn].put(message)  # type: ignore[index]

    def _collect(self, kind: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for conn, proc in zip(self._conns, self._procs, strict=True):
            while True:
                remaining = deadline - time.monotonic()
                try:
                    reply = self._replies[conn].get(timeout=max(remaining, 0.01))
                except queue.Empty:
                    raise TimeoutError(f"worker {proc.pid} sent no {kind!r} in {timeout}s") \
                        from None
                if reply[0] == "dead":
                    raise RuntimeError(f"worker {proc.pid} died (exit code {proc.poll()})")
                if reply[0] == kind:
                    out.append(reply[1] if len(reply) > 1 else {})
                    break
        return out

    def _report(self, stats: list[dict[str, Any]]) -> FleetReport:
        failures: Counter[str] = Counter()
        for s in stats:
            failures.update(s.get("failures", {}))
        seconds = [x for s in stats for x in s.get("connect_seconds", [])]
        starts = [s["connect_started"] for s in stats if s.get("connect_started")]
        ends = [s["connect_finished"] for s in stats if s.get("connect_finished")]
        wall = (max(ends) - min(starts)) if starts and ends else 0.0
        connected = sum(s.get("connected_once", 0) for s in stats)
        return FleetReport(
            devices=len(self.devices), connected=connected, failures=dict(failures),
            connect_wall_seconds=round(wall, 3),
            connects_per_second=round(connected / wall, 1) if wall else 0.0,
            connack=summary_ms(seconds) if seconds else {},
            workers=self.workers,
            disconnects=sum(s.get("disconnects", 0) for s in stats),
            published=sum(s.get("published", 0) for s in stats),
            received=sum(s.get("received", 0) for s in stats),
            behaviour_results=[r for s in stats for r in s.get("behaviour_results", [])],
            behaviour_errors=[e for s in stats for e in s.get("behaviour_errors", [])],
        )
