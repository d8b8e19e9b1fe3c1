"""Text and image requests through the real broker on Mosquitto, as a device sees them."""

from __future__ import annotations

import json
import uuid
from typing import Any

from inference.client import DeviceClient
from inference.hook import keys
from tests.inference.conftest import Fleet


def usage_entries(redis_client: Any, app: Any, tenant_id: str) -> list[dict[str, Any]]:
    stream = keys(app.config["ENSOUL_REDIS_PREFIX"], tenant_id)["usage"]
    return [json.loads(fields[b"e"]) for _, fields in redis_client.xrange(stream)]


def test_a_request_streams_start_deltas_and_one_end(platform: Any, fleet: Fleet,
                                                     device: DeviceClient, run: Any,
                                                     redis_client: Any) -> None:
    reply = run(device.ask("Hello there, bear!"))

    types = [m["type"] for m in reply.messages]
    assert types[0] == "start" and types[-1] == "end"
    assert types.count("end") == 1 and "error" not in types
    assert reply.text.startswith("You asked: Hello there, bear!")
    deltas = reply.of_type("delta")
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    end = reply.terminal
    assert end is not None and end["finish"] == "stop"
    assert end["usage"]["output_tokens"] == 12 and end["usage"]["credits"] == 0
    assert reply.start is not None and reply.start["route"].startswith("up/r/")
    [event] = usage_entries(redis_client, platform, str(fleet.devices[0][0].tenant_id))
    assert event["request_id"] == reply.request_id
    assert event["units"] == {k: v for k, v in end["usage"].items()
                              if k not in ("credits", "credit_split")}


def test_a_repeated_request_id_is_neither_answered_nor_billed_twice(
        platform: Any, fleet: Fleet, device: DeviceClient, run: Any, redis_client: Any) -> None:
    request_id = uuid.uuid4().hex
    first = run(device.ask("once", request_id=request_id))
    assert first.terminal is not None and first.terminal["type"] == "end"
    device.replies.pop(request_id)
    second = device.begin("once", request_id=request_id)
    run(device.started(second))
    assert second.messages == [{"type": "error", "code": "duplicate_request",
                                "message": second.messages[0]["message"], "id": request_id}]
    assert len(usage_entries(redis_client, platform, str(fleet.devices[0][0].tenant_id))) == 1
