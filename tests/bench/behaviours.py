"""A behaviour for the simulator test: runs inside a worker, next to the device's socket."""

from __future__ import annotations

from typing import Any

from bench.simulator import AsyncDevice


async def say_hello(device: AsyncDevice) -> dict[str, Any]:
    device.publish("up", b'{"type": "hello"}', qos=1)
    return {"device": device.identity.device_id}
