"""Simulator behaviours of the inference benchmark: they run inside the fleet's workers.

``bench.inference_latency`` starts a :class:`~bench.simulator.SimulatedFleet` with
``behaviour="bench.inference_load:latency"`` (or ``:throughput``). Each device's behaviour
reads the run's *plan* (a JSON file named by ``ENSOUL_BENCH_INFERENCE_PLAN``, inherited by the
workers), waits until the plan carries ``start_at`` (the parent writes it once every device is
connected), then sends protocol v1 requests on its ``up`` topic and timestamps every answer in
paho's message callback, next to the socket, with ``time.perf_counter()``.

- ``latency``: open loop on a fixed schedule. Device ``i`` sends a request at
  ``start_at + offset_i * period + k * period`` whether or not its previous answer has ended
  (an overloaded server gets more streams, never fewer). Requests sent inside the measurement
  window (after ``warmup``, for ``duration``) are recorded: first-delta latency, the gaps
  between deltas, arrival of ``end`` and the broker's own ``end.timing.first_delta_ms``.
- ``throughput``: closed loop. Each device keeps ``outstanding`` requests open and sends a new
  one as soon as one ends; deltas are counted from the payload's first bytes, only ``end`` and
  ``error`` are parsed.

Both count the deltas and ends that arrive inside the window, and report the worker's own CPU
time over the window (to show the load generator was not the bottleneck).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.simulator import AsyncDevice

PLAN_ENV = "ENSOUL_BENCH_INFERENCE_PLAN"
DELTA = b'{"type":"delta"'
END = b'{"type":"end"'
ERROR = b'{"type":"error"'

_plan: asyncio.Future[dict[str, Any]] | None = None
_cpu: asyncio.Future[dict[str, Any]] | None = None


class _Discard:
    """Replaces the device's inbox: every answer is handled in the callback instead."""

    def put_nowait(self, item: object) -> None:
        return None


async def _read_plan(path: str) -> dict[str, Any]:
    while True:
        try:
            plan = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            plan = {}
        if plan.get("start_at"):
            return plan  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)


async def plan() -> dict[str, Any]:
    """The run's plan, once it has a start time (one reader per worker)."""
    global _plan
    if _plan is None:
        _plan = asyncio.ensure_future(_read_plan(os.environ[PLAN_ENV]))
    return await asyncio.shield(_plan)


class Clock:
    """The plan's wall-clock times on this process's ``perf_counter`` and loop clocks."""

    def __init__(self, the_plan: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        skew = the_plan["start_at"] - time.time()
        self.perf_start = time.perf_counter() + skew  # sending starts (warm-up first)
        self.loop_start = loop.time() + skew
        warmup, duration = float(the_plan["warmup"]), float(the_plan["duration"])
        self.window = (self.perf_start + warmup, self.perf_start + warmup + duration)
        self.loop_window = (self.loop_start + warmup, self.loop_start + warmup + duration)
        self.deadline = self.loop_window[1] + float(the_plan["drain"])

    def inside(self, at: float) -> bool:
        return self.window[0] <= at < self.window[1]


async def _measure_cpu(clock: Clock) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, clock.loop_window[0] - loop.time()))
    started = time.process_time()
    await asyncio.sleep(max(0.0, clock.loop_window[1] - loop.time()))
    return {"pid": os.getpid(), "cpu_seconds": time.process_time() - started}


async def worker_cpu(clock: Clock) -> dict[str, Any]:
    """This worker's CPU seconds over the measurement window (one measurement per worker)."""
    global _cpu
    if _cpu is None:
        _cpu = asyncio.ensure_future(_measure_cpu(clock))
    return await asyncio.shield(_cpu)


def _request(request_id: str, text: str, max_output_tokens: int) -> bytes:
    return json.dumps({"type": "request", "id": request_id, "input": {"text": text},
                       "options": {"max_output_tokens": max_output_tokens}},
                      separators=(",", ":")).encode()


# --- open loop: latency ----------------------------------------------------------------------


class _Pending:
    __slots__ = ("broker_first_delta_ms", "deltas", "end", "error", "record", "sent", "start",
                 "tokens")

    def __init__(self, sent: float, record: bool) -> None:
        self.sent = sent
        self.record = record
        self.start: float | None = None
        self.deltas: list[float] = []
        self.tokens = 0
        self.end: float | None = None
        self.error: str | None = None
        self.broker_first_delta_ms: float | None = None

    def as_dict(self) -> dict[str, Any]:
        first = (self.deltas[0] - self.sent) * 1000 if self.deltas else None
        return {
            "first_delta_ms": round(first, 4) if first is not None else None,
            "start_ms": round((self.start - self.sent) * 1000, 4) if self.start else None,
            "end_ms": round((self.end - self.sent) * 1000, 3) if self.end else None,
            "gaps_ms": [round((b - a) * 1000, 3) for a, b in itertools.pairwise(self.deltas)],
            "deltas": len(self.deltas),
            "tokens": self.tokens,
            "error": self.error,
            "broker_first_delta_ms": self.broker_first_delta_ms,
        }


async def latency(device: AsyncDevice) -> dict[str, Any]:
    the_plan = await plan()
    clock = Clock(the_plan)
    loop = asyncio.get_running_loop()
    period = float(the_plan["period"])
    offset = float(the_plan["offsets"].get(device.identity.device_id, 0.0)) * period
    tokens = int(the_plan["max_output_tokens"])
    text = str(the_plan.get("text", "Tell me a story"))
    pending: dict[str, _Pending] = {}
    open_ids: set[str] = set()
    counts = {"deltas_in_window": 0, "tokens_in_window": 0, "ends_in_window": 0,
              "sent_in_window": 0, "sent": 0}
    all_ended = asyncio.Event()

    def on_message(_: AsyncDevice, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        message = json.loads(payload)
        entry = pending.get(message.get("id", ""))
        if entry is None:
            return
        kind = message.get("type")
        if kind == "delta":
            entry.deltas.append(now)
            tokens = len(str(message.get("text", "")).split())  # a token is a word here
            entry.tokens += tokens
            if clock.inside(now):
                counts["deltas_in_window"] += 1
                counts["tokens_in_window"] += tokens
        elif kind == "start":
            entry.start = now
        elif kind in ("end", "error"):
            entry.end = now
            if kind == "error":
                entry.error = str(message.get("code"))
            else:
                entry.broker_first_delta_ms = (message.get("timing") or {}).get(
                    "first_delta_ms")
            if clock.inside(now):
                counts["ends_in_window"] += 1
            open_ids.discard(message["id"])
            if not open_ids and loop.time() >= clock.loop_window[1]:
                all_ended.set()

    device.on_message = on_message
    device.inbox = _Discard()  # type: ignore[assignment]
    cpu = asyncio.ensure_future(worker_cpu(clock))
    k = 0
    while True:
        send_at = clock.loop_start + offset + k * period
        if send_at >= clock.loop_window[1]:
            break
        await asyncio.sleep(max(0.0, send_at - loop.time()))
        request_id = uuid.uuid4().hex
        sent = time.perf_counter()
        record = clock.inside(sent)
        pending[request_id] = _Pending(sent, record)
        open_ids.add(request_id)
        device.publish("up", _request(request_id, text, tokens), qos=1)
        counts["sent"] += 1
        counts["sent_in_window"] += record
        k += 1
    await asyncio.sleep(max(0.0, clock.loop_window[1] - loop.time()))
    if open_ids:
        try:
            await asyncio.wait_for(all_ended.wait(), max(0.0, clock.deadline - loop.time()))
        except TimeoutError:
            pass
    return {"device": device.identity.device_id, **counts, "open_at_end": len(open_ids),
            "cpu": await cpu,
            "requests": [p.as_dict() for p in pending.values() if p.record]}


# --- closed loop: throughput -----------------------------------------------------------------


async def throughput(device: AsyncDevice) -> dict[str, Any]:
    the_plan = await plan()
    clock = Clock(the_plan)
    loop = asyncio.get_running_loop()
    outstanding = int(the_plan["outstanding"])
    tokens = int(the_plan["max_output_tokens"])
    text = str(the_plan.get("text", "Tell me a story"))
    stagger = float(the_plan["offsets"].get(device.identity.device_id, 0.0)) * 0.2
    sent_at: dict[str, float] = {}
    counts = {"deltas_in_window": 0, "ends_in_window": 0, "errors_in_window": 0, "sent": 0}
    errors: Counter[str] = Counter()
    durations: list[float] = []
    drained = asyncio.Event()

    def send() -> None:
        request_id = uuid.uuid4().hex
        sent_at[request_id] = time.perf_counter()
        device.publish("up", _request(request_id, text, tokens), qos=1)
        counts["sent"] += 1

    def on_message(_: AsyncDevice, topic: str, payload: bytes) -> None:
        now = time.perf_counter()
        if payload.startswith(DELTA):
            if clock.inside(now):
                counts["deltas_in_window"] += 1
            return
        is_end = payload.startswith(END)
        if not is_end and not payload.startswith(ERROR):
            return
        message = json.loads(payload)
        sent = sent_at.pop(message.get("id", ""), None)
        if sent is None:
            return
        if clock.inside(now):
            if is_end:
                counts["ends_in_window"] += 1
                durations.append(now - sent)
            else:
                counts["errors_in_window"] += 1
                errors[str(message.get("code"))] += 1
        if now < clock.window[1]:
            send()
        elif not sent_at:
            drained.set()

    device.on_message = on_message
    device.inbox = _Discard()  # type: ignore[assignment]
    cpu = asyncio.ensure_future(worker_cpu(clock))
    await asyncio.sleep(max(0.0, clock.loop_start + stagger - loop.time()))
    for _ in range(outstanding):
        send()
    await asyncio.sleep(max(0.0, clock.loop_window[1] - loop.time()))
    if sent_at:
        try:
            await asyncio.wait_for(drained.wait(), max(0.0, clock.deadline - loop.time()))
        except TimeoutError:
            pass
    durations.sort()
    return {"device": device.identity.device_id, **counts, "open_at_end": len(sent_at),
            "errors": dict(errors), "cpu": await cpu,
            "request_ms": [round(d * 1000, 3) for d in durations]}
