"""A behaviour for simulated devices: a companion toy chatting with its child.

``bench.simulator.chat:converse`` says hello, then every ``ENSOUL_DEMO_CHAT_SECONDS`` (about;
jittered) sends a protocol v1 request from a small script of questions within one
conversation, reads the streamed answer from its inbox, and logs what it heard. The demo
(`serve --demo-devices N`) runs it so the portal shows devices streaming answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from typing import Any

from bench.simulator.device import AsyncDevice

log = logging.getLogger("ensoul.demo")

QUESTIONS = (
    "Good morning! What should we play today?",
    "Why is the sky blue?",
    "Can you tell me a very short story about a brave little fox?",
    "How many legs does a spider have?",
    "Sing me a lullaby, please.",
    "What do bears eat for breakfast?",
)


async def ask(device: AsyncDevice, text: str, conversation: str, timeout: float = 30.0
              ) -> dict[str, Any]:
    """One request; the answer text, its terminal message and first-delta time."""
    request_id = uuid.uuid4().hex
    sent = time.perf_counter()
    device.publish("up", json.dumps({"type": "request", "id": request_id,
                                     "conversation": conversation, "input": {"text": text},
                                     "options": {"max_output_tokens": 60}}), qos=1)
    parts: list[str] = []
    first_ms = None
    deadline = time.monotonic() + timeout
    while True:
        topic, payload = await asyncio.wait_for(device.inbox.get(),
                                                max(0.1, deadline - time.monotonic()))
        if not topic.endswith("/down"):
            continue
        message = json.loads(payload)
        if message.get("id") != request_id:
            continue
        if message["type"] == "delta":
            if first_ms is None:
                first_ms = (time.perf_counter() - sent) * 1000
            parts.append(message["text"])
        elif message["type"] in ("end", "error"):
            return {"answer": "".join(parts), "terminal": message, "first_delta_ms": first_ms}


async def converse(device: AsyncDevice) -> dict[str, Any]:
    every = float(os.environ.get("ENSOUL_DEMO_CHAT_SECONDS", "20"))
    conversation = f"demo-{uuid.uuid4().hex[:8]}"
    answered = failed = 0
    await asyncio.sleep(random.uniform(1, every))
    while device.connected:
        question = QUESTIONS[(answered + failed) % len(QUESTIONS)]
        try:
            result = await ask(device, question, conversation)
            terminal = result["terminal"]
            if terminal["type"] == "end":
                answered += 1
                log.info("%s asked %r, heard %r (first delta %.1f ms)",
                         device.identity.serial or device.identity.device_id, question,
                         result["answer"][:60], result["first_delta_ms"] or 0)
            else:
                failed += 1
                log.info("%s asked %r and got %s", device.identity.serial, question,
                         terminal.get("code"))
        except TimeoutError:
            failed += 1
        await asyncio.sleep(every * random.uniform(0.75, 1.25))
    return {"answered": answered, "failed": failed}
