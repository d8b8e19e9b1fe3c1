"""A runnable example device: connect, say hello, ask a question or speak, print the stream.

    python -m inference.example_device --endpoint 127.0.0.1:1883 --username <tenant>/d/<device> \\
        --password <password> --text "Tell me a joke"
    python -m inference.example_device --mqtt-json mqtt.json --voice-ms 1500

``--mqtt-json`` takes the ``mqtt`` object of the bootstrap answer (docs/devices.md) or the
credentials file row. A voice turn sends a tone encoded with libopus as 60 ms frames and
prints the transcript, the answer and how many speech frames came back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from inference.audio import AudioFormat, encode_pcm_to_frames, synth_tone
from inference.client import DeviceClient


def _info(args: argparse.Namespace) -> dict[str, Any]:
    if args.mqtt_json:
        return dict(json.loads(Path(args.mqtt_json).read_text()))
    device_part = args.username.split("/")
    if len(device_part) != 3 or device_part[1] != "d":
        raise SystemExit("--username is <tenant id>/d/<device id>")
    return {"endpoint": args.endpoint, "username": args.username, "password": args.password,
            "client_id": device_part[2], "topic_prefix": f"t/{args.username}"}


async def main(args: argparse.Namespace) -> int:
    client = DeviceClient.from_mqtt_info(_info(args), args.password)
    await client.connect()
    try:
        hello = await client.hello(audio=AudioFormat().as_dict())
        print(f"hello: session {hello.get('session')}, limits {hello.get('limits')}")
        if args.voice_ms:
            packets = encode_pcm_to_frames(synth_tone(args.voice_ms, 16000), AudioFormat())
            reply = await client.voice_turn(packets)
            for message in reply.of_type("transcript"):
                print(f"heard: {message['text']}")
        else:
            reply = client.begin(args.text, conversation=args.conversation)
            while not reply.done.is_set():
                message = await asyncio.wait_for(reply.queue.get(), 60)
                if message["type"] == "delta":
                    print(message["text"], end="", flush=True)
            print()
        print(f"answer: {reply.text}")
        if reply.frames:
            print(f"speech: {len(reply.frames)} Opus frames")
        print(f"terminal: {json.dumps(reply.terminal)}")
        print(f"first delta after {reply.first_delta_ms or 0:.1f} ms")
        return 0 if reply.terminal and reply.terminal["type"] == "end" else 1
    finally:
        await client.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--endpoint", default="127.0.0.1:1883")
    parser.add_argument("--username")
    parser.add_argument("--password")
    parser.add_argument("--mqtt-json", help="the bootstrap answer's mqtt object, as a file")
    parser.add_argument("--text", default="Hello! Who are you?")
    parser.add_argument("--conversation")
    parser.add_argument("--voice-ms", type=int, default=0, help="speak a tone this long")
    args = parser.parse_args(argv)
    if not args.mqtt_json and not (args.username and args.password):
        parser.error("give --mqtt-json, or --username and --password")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
