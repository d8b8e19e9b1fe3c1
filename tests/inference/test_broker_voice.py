"""Voice turns and images through the real broker, with real libopus frames both ways."""

from __future__ import annotations

import asyncio
import struct
import zlib
from typing import Any

from inference.audio import AudioFormat, OpusDecoder, encode_pcm_to_frames, pack_frame, synth_tone
from inference.client import DeviceClient, Reply
from tests.inference.conftest import connect_with_retry

UPLINK = AudioFormat("opus", 16000, 1, 60)


def tiny_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_voice_turn_is_heard_answered_and_spoken(platform: Any, device: DeviceClient,
                                                    run: Any) -> None:
    hello = run(device.hello(audio=UPLINK.as_dict(), audio_down={"sample_rate": 16000}))
    assert hello["type"] == "hello" and hello["audio_down"]["sample_rate"] == 16000
    packets = encode_pcm_to_frames(synth_tone(1200, 16000), UPLINK)  # 20 frames of 60 ms

    reply = run(device.voice_turn(packets))

    end = reply.terminal
    assert end is not None and end["type"] == "end" and end["finish"] == "stop", reply.messages
    assert end["usage"]["audio_in_ms"] == 1200
    [transcript] = reply.of_type("transcript")
    assert transcript["text"] == "1200 milliseconds of audio"
    assert reply.text.startswith("You said: 1200 milliseconds of audio")
    # Speech frames: the request's tag, seq from 0, the last one flagged, real Opus inside.
    assert reply.frames and [f.seq for f in reply.frames] == list(range(len(reply.frames)))
    assert reply.frames[-1].last and not any(f.last for f in reply.frames[:-1])
    assert {f.tag for f in reply.frames} == {reply.start["tag"]}  # type: ignore[index]
    assert reply.frames[-1].packet == b""  # the end-of-speech marker carries no audio
    decoder = OpusDecoder(AudioFormat("opus", 16000, 1, 60))
    for frame in reply.frames:
        decoder.decode(frame.packet)
    assert end["usage"]["audio_out_ms"] == (len(reply.frames) - 1) * 60 == decoder.decoded_ms


def test_an_image_request_is_answered_from_the_image(platform: Any, device: DeviceClient,
                                                     run: Any) -> None:
    reply = run(device.ask("What is this?", images=[("image/png", tiny_png(32, 24))]))

    assert reply.terminal is not None and reply.terminal["type"] == "end"
    assert reply.text.startswith("I see a 32x24 PNG image.")
    assert reply.terminal["usage"]["images"] == 1


def test_a_conversation_remembers_earlier_turns(platform: Any, device: DeviceClient,
                                                run: Any, redis_client: Any) -> None:
    run(device.ask("My name is Mia.", conversation="bedtime"))
    run(device.ask("What is my name?", conversation="bedtime"))
    from inference.sessions import memory_key

    device_id = device.client_id
    tenant_id = device.prefix.split("/")[1]
    raw = redis_client.hget(memory_key(platform.config["ENSOUL_REDIS_PREFIX"], tenant_id,
                                       device_id), "bedtime")
    assert raw is not None
    import json

    turns = json.loads(raw)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"] == "My name is Mia."


def test_a_turn_that_goes_quiet_without_stop_times_out(platform: Any, monkeypatch: Any,
                                                       fleet: Any, start_broker: Any,
                                                       run: Any) -> None:
    monkeypatch.setitem(platform.config, "ENSOUL_INFERENCE_TURN_IDLE_SECONDS", 0.5)
    start_broker(shared=False)
    device = DeviceClient.from_mqtt_info(fleet.info(0))
    run(connect_with_retry(device))
    reply = device.replies.setdefault("b" * 32, Reply("b" * 32))
    device.send({"type": "listen", "state": "start", "id": "b" * 32})
    started = run(device.started(reply))
    assert started["type"] == "start"
    for seq, packet in enumerate(encode_pcm_to_frames(synth_tone(300, 16000), UPLINK)):
        device.send_raw(pack_frame(packet, seq=seq), f"{started['route']}/audio", qos=0)

    run(asyncio.wait_for(reply.done.wait(), 10))

    terminal = reply.terminal
    assert terminal is not None and terminal["type"] == "error" and terminal["code"] == "timeout"
    assert terminal["usage"]["audio_in_ms"] == 300
    run(device.close())
