"""Protocol v1 between a device and the inference broker: topics, limits, message parsing.

docs/protocol.md is the reference for firmware; this module is its executable half. Parsing is
strict and cheap (it runs on every message): a payload that is not what the document says
raises :class:`ProtocolError` with the device-facing error code, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

VERSION = 1

# Topic suffixes under the device prefix t/{tenant}/d/{device}/
UP, UP_AUDIO, DOWN, DOWN_AUDIO = "up", "up/audio", "down", "down/audio"
ROUTE = "up/r"  # + /{route} (JSON) and /{route}/audio: follow-ups straight to the stream's process

# Payload limits (bytes unless noted); docs/protocol.md lists each.
MAX_CONTROL_BYTES = 4096  # hello, abort, listen
MAX_REQUEST_BYTES = 1_572_864  # a request with its base64 images
MAX_TEXT_CHARS = 8000
MAX_IMAGES = 2
MAX_IMAGE_BYTES = 524_288  # decoded
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_OUTPUT_TOKENS = 4096
DEFAULT_OUTPUT_TOKENS = 512
MAX_TURN_MS = 60_000  # a voice turn stops listening after this much audio and is answered

REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{16,64}")
CONVERSATION_ID = re.compile(r"[0-9A-Za-z_.:-]{1,64}")

ERROR_CODES: dict[str, str] = {
    "bad_request": "The message is not valid protocol v1.",
    "too_large": "The payload is over its size limit.",
    "unauthorized": "This device may not use inference.",
    "device_suspended": "The device is suspended.",
    "license_required": "The device has no licence seat.",
    "license_expired": "The device's licence has ended.",
    "quota_exhausted": "No credit is left for this device.",
    "daily_cap_reached": "The device's daily cap is reached.",
    "rate_limited": "Too many requests from this device.",
    "concurrency_limited": "Too many streams open on this device.",
    "duplicate_request": "This request id was already received.",
    "unknown_request": "No open stream has this request id.",
    "bad_audio": "An audio frame could not be decoded.",
    "provider_unavailable": "The model provider is unavailable.",
    "provider_error": "The model provider failed.",
    "timeout": "The request took too long.",
    "internal": "Something went wrong on our side.",
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str | None = None, *, request_id: str | None = None,
                 retry_after: float | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message or ERROR_CODES[code])
        self.code = code
        self.message = message or ERROR_CODES[code]
        self.request_id = request_id
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Image:
    mime: str
    data: bytes
    width: int
    height: int


@dataclass(slots=True)
class Hello:
    version: int
    audio: dict[str, Any] | None
    features: dict[str, Any]


@dataclass(slots=True)
class Request:
    id: str
    conversation: str | None
    text: str | None
    images: list[Image] = field(default_factory=list)
    max_output_tokens: int = DEFAULT_OUTPUT_TOKENS
    speak: bool = False


@dataclass(slots=True)
class Abort:
    id: str


@dataclass(slots=True)
class Listen:
    id: str
    state: str  # start | stop
    conversation: str | None = None
    max_output_tokens: int = DEFAULT_OUTPUT_TOKENS
    speak: bool = True


Message = Hello | Request | Abort | Listen


def parse(payload: bytes) -> Message:
    """One JSON message from ``up``; raises :class:`ProtocolError`."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise ProtocolError("too_large", f"messages are at most {MAX_REQUEST_BYTES} bytes")
    try:
        # orjson, unlike the stdlib, refuses lone surrogates ("\ud800"), which no answer, memory
        # or log line could encode later, NaN, and nesting past 1,024 levels.
        data = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_request", "the payload is not UTF-8 JSON (or is nested more "
                            "than 1,024 levels deep)") from exc
    if not isinstance(data, dict):
        raise ProtocolError("bad_request", "a message is a JSON object")
    kind = data.get("type")
    request_id = _optional_id(data.get("id"))
    if kind != "request" and len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError("too_large", f"control messages are at most {MAX_CONTROL_BYTES} "
                            "bytes", request_id=request_id)
    try:
        if kind == "request":
            return _request(data)
        if kind == "abort":
            return Abort(_id(data))
        if kind == "listen":
            return _listen(data)
        if kind == "hello":
            return _hello(data)
    except ProtocolError as exc:
        exc.request_id = exc.request_id or request_id
        raise
    raise ProtocolError("bad_request", f"unknown message type {str(kind)[:32]!r}",
                        request_id=request_id)


def _optional_id(value: Any) -> str | None:
    return value if isinstance(value, str) and REQUEST_ID.fullmatch(value) else None


def _id(data: dict[str, Any]) -> str:
    value = data.get("id")
    if not isinstance(value, str) or not REQUEST_ID.fullmatch(value):
        raise ProtocolError("bad_request", "id must be 16-64 characters of [0-9A-Za-z_-], "
                            "e.g. a UUID4 or a ULID")
    return value


def _conversation(data: dict[str, Any]) -> str | None:
    value = data.get("conversation")
    if value is None:
        return None
    if not isinstance(value, str) or not CONVERSATION_ID.fullmatch(value):
        raise ProtocolError("bad_request", "conversation must be 1-64 characters of "
                            "[0-9A-Za-z_.:-]")
    return value


def _options(data: dict[str, Any], speak_default: bool) -> tuple[int, bool]:
    options = data.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError("bad_request", "options must be an object")
    max_tokens = options.get("max_output_tokens", DEFAULT_OUTPUT_TOKENS)
    if (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= MAX_OUTPUT_TOKENS):
        raise ProtocolError("bad_request",
                            f"options.max_output_tokens must be 1-{MAX_OUTPUT_TOKENS}")
    speak = options.get("speak", speak_default)
    if not isinstance(speak, bool):
        raise ProtocolError("bad_request", "options.speak must be true or false")
    return max_tokens, speak


def _request(data: dict[str, Any]) -> Request:
    request_id = _id(data)
    body = data.get("input")
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "input must be an object with text and/or images")
    text = body.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise ProtocolError("bad_request", "input.text must be a non-empty string")
    if text is not None and len(text) > MAX_TEXT_CHARS:
        raise ProtocolError("too_large", f"input.text is at most {MAX_TEXT_CHARS} characters")
    raw_images = body.get("images", [])
    if not isinstance(raw_images, list):
        raise ProtocolError("bad_request", "input.images must be a list")
    if len(raw_images) > MAX_IMAGES:
        raise ProtocolError("too_large", f"at most {MAX_IMAGES} images per request")
    images = [_image(item) for item in raw_images]
    if text is None and not images:
        raise ProtocolError("bad_request", "input needs text or at least one image")
    max_tokens, speak = _options(data, False)
    return Request(request_id, _conversation(data), text, images, max_tokens, speak)


def _image(item: Any) -> Image:
    if not isinstance(item, dict) or not isinstance(item.get("data"), str):
        raise ProtocolError("bad_request", "an image is {\"mime\": ..., \"data\": base64}")
    mime = item.get("mime")
    if mime not in ("image/jpeg", "image/png"):
        raise ProtocolError("bad_request", "image mime must be image/jpeg or image/png")
    encoded = item["data"]
    if len(encoded) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ProtocolError("too_large", f"an image is at most {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("bad_request", "image data is not base64") from exc
    if len(data) > MAX_IMAGE_BYTES:
        raise ProtocolError("too_large", f"an image is at most {MAX_IMAGE_BYTES} bytes")
    width, height = image_size(mime, data)
    if width * height > MAX_IMAGE_PIXELS:
        raise ProtocolError("too_large", "an image is at most 4096x4096 pixels")
    return Image(mime, data, width, height)


def image_size(mime: str, data: bytes) -> tuple[int, int]:
    """Width and height read from a PNG or JPEG header; a file that is neither is refused."""
    if mime == "image/png":
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
            raise ProtocolError("bad_request", "the image is not a PNG")
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] != b"\xff\xd8":
        raise ProtocolError("bad_request", "the image is not a JPEG")
    index = 2
    while index + 9 < len(data):
        if data[index] != 0xFF:
            break
        marker = data[index + 1]
        (length,) = struct.unpack(">H", data[index + 2:index + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF):
            height, width = struct.unpack(">HH", data[index + 5:index + 9])
            return width, height
        index += 2 + length
    raise ProtocolError("bad_request", "the image is not a JPEG with a frame header")


def _listen(data: dict[str, Any]) -> Listen:
    request_id = _id(data)
    state = data.get("state")
    if state == "stop":
        return Listen(request_id, "stop")
    if state != "start":
        raise ProtocolError("bad_request", "listen state must be start or stop")
    max_tokens, speak = _options(data, True)
    return Listen(request_id, "start", _conversation(data), max_tokens, speak)


def _hello(data: dict[str, Any]) -> Hello:
    version = data.get("version")
    if type(version) is not int or version != VERSION:
        raise ProtocolError("bad_request", f"this platform speaks protocol version {VERSION}")
    audio = data.get("audio")
    if audio is not None and not isinstance(audio, dict):
        raise ProtocolError("bad_request", "audio must be an object")
    features = data.get("features", {})
    if not isinstance(features, dict):
        raise ProtocolError("bad_request", "features must be an object")
    return Hello(version, audio, features)


# --- platform -> device ------------------------------------------------------------------


def dumps(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (every delta goes through here: orjson, not the stdlib)."""
    return orjson.dumps(message)


def error_message(exc: ProtocolError) -> bytes:
    message: dict[str, Any] = {"type": "error", "code": exc.code, "message": exc.message}
    if exc.request_id is not None:
        message["id"] = exc.request_id
    if exc.retry_after is not None:
        message["retry_after"] = round(exc.retry_after, 3)
    return dumps(message)
