"""The floor of the inference benchmark: a trivial streamer on the same Mosquitto.

    .venv/bin/python -m bench.bare_streamer --url mqtt://user:pw@127.0.0.1:1883 [--shared]
        [--deltas 50] [--rate 30]

It subscribes the devices' request topic (``t/+/d/+/up``, QoS 1; with ``--shared``
``$share/ensoul-bare/t/+/d/+/up``, so several processes split the requests round-robin as the
broker's processes do) and answers every ``request`` with ``start`` (QoS 1), ``--deltas``
deltas (QoS 0) at ``--rate`` per second, the first one at once (``--rate 0``: all at once),
then ``end`` (QoS 1), in the platform's message shapes. Nothing else: no profile lookup,
admission, limits, metering, coalescing, Redis or settlement. What remains is paho on an
asyncio loop with the broker's own socket driver (:class:`core.mqtt_loop.LoopSocket`,
``TCP_NODELAY`` on), the same JSON encoder (orjson) and Mosquitto, which is what the inference
broker is compared against.

It prints ``bare streamer ready`` on stdout once its subscription is acknowledged and stops
cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from core.mqtt_loop import LoopSocket

SHARE_GROUP = "ensoul-bare"
REQUEST_TOPIC = "t/+/d/+/up"
WORDS = ("the quick brown fox jumps over the lazy dog while a small robot hums a song about "
         "light and rain and far away hills").split()


def dumps(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)  # as the broker's protocol.dumps


class BareStreamer:
    def __init__(self, url: str, *, shared: bool, deltas: int, rate: float,
                 client_id: str | None = None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 1883
        self.deltas = deltas
        self.interval = 1 / rate if rate > 0 else 0.0
        self.topic = f"$share/{SHARE_GROUP}/{REQUEST_TOPIC}" if shared else REQUEST_TOPIC
        self.route = f"up/r/bare-{os.getpid()}"
        self.loop = asyncio.get_running_loop()
        self.subscribed = asyncio.Event()
        self.streams: set[asyncio.Task[None]] = set()
        self.served = 0
        self.tag = 0
        client = paho.Client(CallbackAPIVersion.VERSION2,
                             client_id=client_id or f"ensoul-bare-{os.getpid()}")
        if parts.username:
            client.username_pw_set(unquote(parts.username),
                                   unquote(parts.password) if parts.password else None)
        self.socket = LoopSocket(client, self.loop)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self.subscribed.set()
        client.on_message = self._on_message
        client.max_inflight_messages_set(1000)  # as the broker's link: never throttle QoS 1
        client.max_queued_messages_set(0)
        self.client = client

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.topic, qos=1)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.client.loop_misc()

    # --- the service ---------------------------------------------------------------------

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            request = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(request, dict) or request.get("type") != "request":
            return
        prefix = message.topic.rsplit("/", 1)[0]
        wanted = (request.get("options") or {}).get("max_output_tokens") or self.deltas
        task = self.loop.create_task(self._stream(prefix, str(request.get("id")),
                                                  min(int(wanted), self.deltas)))
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)

    async def _stream(self, prefix: str, request_id: str, count: int) -> None:
        down = f"{prefix}/down"
        publish = self.client.publish
        self.tag = (self.tag % 65535) + 1
        publish(down, dumps({"type": "start", "id": request_id,
                             "stream": f"bare-{os.getpid()}-{self.served}",
                             "route": self.route, "tag": self.tag, "model": "bare"}), qos=1)
        started = time.monotonic()
        for index in range(count):
            if self.interval and index:
                delay = started + index * self.interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            word = WORDS[index % len(WORDS)]
            publish(down, dumps({"type": "delta", "id": request_id, "seq": index,
                                 "text": word if index == 0 else " " + word}))
        publish(down, dumps({"type": "end", "id": request_id, "finish": "stop",
                             "usage": {"output_tokens": count}}), qos=1)
        self.served += 1

    async def run(self, stop: asyncio.Event) -> None:
        self.client.connect(self.host, self.port, keepalive=30)
        keepalive = self.loop.create_task(self._keepalive())
        await asyncio.wait_for(self.subscribed.wait(), 30)
        print("bare streamer ready", flush=True)
        await stop.wait()
        for task in list(self.streams):
            task.cancel()
        keepalive.cancel()
        self.client.disconnect()
        await asyncio.sleep(0.05)  # let the DISCONNECT go out


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    streamer = BareStreamer(args.url, shared=args.shared, deltas=args.deltas, rate=args.rate)
    await streamer.run(stop)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_streamer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="mqtt://user:password@host:port")
    parser.add_argument("--shared", action="store_true",
                        help=f"subscribe $share/{SHARE_GROUP}/{REQUEST_TOPIC}")
    parser.add_argument("--deltas", type=int, default=50, help="deltas per answer (at most)")
    parser.add_argument("--rate", type=float, default=30.0,
                        help="deltas per second per stream; 0: all at once")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
