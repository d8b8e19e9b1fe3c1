"""The protocol's JSON Schemas (inference/protocol_schemas/) against the code and docs/protocol.md.

Each schema must be a valid draft 2020-12 schema, agree with the constants and enums of the
code, and accept every example of the document (a fenced ``json`` block follows a marker
``<!-- schema: down.start -->``, or ``<!-- schema: none -->`` for JSON that is not a message).
For device messages the schema and the parser (``inference.protocol.parse``, plus the audio
format check the broker applies to a ``hello``) must agree on what is accepted; the few places
where JSON Schema cannot say what the parser checks are pinned in ``KNOWN_DIFFERENCES``.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import zlib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from inference import protocol
from inference.audio import FRAME_MS, MAX_FRAME_BYTES, SAMPLE_RATES, AudioError, AudioFormat
from inference.protocol import ProtocolError

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "inference" / "protocol_schemas"
DOC = ROOT / "docs" / "protocol.md"
ID_BASE = "https://ensoul.example/schemas/protocol/v1/"
UP = ("hello", "request", "abort", "listen")
DOWN = ("hello", "start", "delta", "transcript", "end", "error")
SHARED_DEFS = ("request_id", "conversation", "usage")
RID = "3f2b9c1e8d4a4f6b9e2c7a1d5b8f0c3e"


@cache
def schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())  # type: ignore[no-any-return]


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(schema(name))


def names() -> list[str]:
    return [f"up.{kind}" for kind in UP] + [f"down.{kind}" for kind in DOWN]


def png(width: int = 1, height: int = 1) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the schemas themselves ------------------------------------------------------------------


def test_the_schema_directory_holds_one_schema_per_message() -> None:
    assert sorted(p.stem for p in SCHEMAS.glob("*.json")) == sorted(names())


@pytest.mark.parametrize("name", names())
def test_each_schema_is_a_valid_2020_12_schema_named_after_its_message(name: str) -> None:
    document = schema(name)

    Draft202012Validator.check_schema(document)

    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"] == f"{ID_BASE}{name}.json"
    assert document["description"]
    assert document["properties"]["type"] == {"const": name.split(".", 1)[1]}
    if name.startswith("down."):  # platform messages are closed; device messages are open
        assert document["additionalProperties"] is False
    else:
        assert "additionalProperties" not in document


def test_a_broken_schema_is_refused() -> None:
    with pytest.raises(SchemaError):
        Draft202012Validator.check_schema({"type": "object", "required": "id"})


def test_definitions_shared_between_schemas_are_identical() -> None:
    for definition in SHARED_DEFS:
        found = {name: schema(name)["$defs"][definition] for name in names()
                 if definition in schema(name).get("$defs", {})}
        assert len(found) >= 2, definition
        first = next(iter(found.values()))
        assert all(value == first for value in found.values()), definition


def test_schemas_agree_with_the_constants_and_enums_of_the_code() -> None:
    from inference.streams import FINISHES

    assert schema("down.error")["properties"]["code"]["enum"] == list(protocol.ERROR_CODES)
    assert schema("down.end")["properties"]["finish"]["enum"] == [
        finish for finish in FINISHES if finish != "error"]

    request_id = schema("up.request")["$defs"]["request_id"]["pattern"]
    assert request_id == f"^{protocol.REQUEST_ID.pattern}$"
    conversation = schema("up.request")["$defs"]["conversation"]["pattern"]
    assert conversation == f"^{protocol.CONVERSATION_ID.pattern}$"

    request = schema("up.request")
    text = request["properties"]["input"]["properties"]["text"]["oneOf"][0]
    assert text["maxLength"] == protocol.MAX_TEXT_CHARS
    assert request["properties"]["input"]["properties"]["images"]["maxItems"] == \
        protocol.MAX_IMAGES
    data = request["$defs"]["image"]["properties"]["data"]
    assert data["maxLength"] == (protocol.MAX_IMAGE_BYTES * 4) // 3 + 4
    for name in ("up.request", "up.listen"):
        tokens = schema(name)["$defs"]["options"]["properties"]["max_output_tokens"]
        assert (tokens["minimum"], tokens["maximum"], tokens["default"]) == (
            1, protocol.MAX_OUTPUT_TOKENS, protocol.DEFAULT_OUTPUT_TOKENS)

    for name, definition in (("up.hello", "audio_format_request"),
                             ("down.hello", "audio_format")):
        audio = schema(name)["$defs"][definition]["properties"]
        assert audio["sample_rate"]["enum"] == list(SAMPLE_RATES)
        assert audio["frame_ms"]["enum"] == list(FRAME_MS)
        assert set(audio) == set(AudioFormat().as_dict())
    asked = schema("up.hello")["$defs"]["audio_format_request"]
    answered = schema("down.hello")["$defs"]["audio_format"]
    assert asked["properties"] == answered["properties"]
    assert answered["required"] == list(AudioFormat().as_dict())

    limits = schema("down.hello")["properties"]["limits"]["properties"]
    assert {key: value["const"] for key, value in limits.items() if "const" in value} == {
        "max_request_bytes": protocol.MAX_REQUEST_BYTES,
        "max_control_bytes": protocol.MAX_CONTROL_BYTES,
        "max_text_chars": protocol.MAX_TEXT_CHARS,
        "max_images": protocol.MAX_IMAGES,
        "max_image_bytes": protocol.MAX_IMAGE_BYTES,
        "max_output_tokens": protocol.MAX_OUTPUT_TOKENS,
        "max_turn_ms": protocol.MAX_TURN_MS,
    }


def test_usage_and_budget_carry_exactly_the_metered_units() -> None:
    from inference.units import UNIT_NAMES

    units = schema("down.start")["$defs"]["units"]
    usage = schema("down.end")["$defs"]["usage"]
    assert units["required"] == list(UNIT_NAMES)
    assert usage["required"] == [*UNIT_NAMES, "credits", "credit_split"]
    assert {name: usage["properties"][name] for name in UNIT_NAMES} == units["properties"]


# --- the document's examples -----------------------------------------------------------------

MARKER = re.compile(r"<!-- schema: ([a-z.]+) -->")


def doc_examples() -> list[tuple[int, str, str]]:
    """(line, schema name or "none", JSON text) of every fenced json block of the document."""
    lines = DOC.read_text().splitlines()
    examples = []
    index = 0
    while index < len(lines):
        if lines[index].strip() == "```json":
            marker = MARKER.fullmatch(lines[index - 1].strip()) if index else None
            assert marker, f"docs/protocol.md:{index + 1}: a json block needs a schema marker"
            end = lines.index("```", index + 1)
            examples.append((index + 1, marker.group(1), "\n".join(lines[index + 1:end])))
            index = end
        index += 1
    return examples


def test_the_document_has_an_example_of_every_message() -> None:
    assert {name for _, name, _ in doc_examples()} == {*names(), "none"}


@pytest.mark.parametrize(("line", "name", "text"), doc_examples(),
                         ids=lambda value: str(value)[:20])
def test_each_example_of_the_document_validates_against_its_schema(
        line: int, name: str, text: str) -> None:
    message = json.loads(text)
    if name == "none":
        return
    errors = [error.message for error in validator(name).iter_errors(message)]
    assert not errors, f"docs/protocol.md:{line}: {errors}"
    if name.startswith("up."):
        assert platform_accepts(message), f"docs/protocol.md:{line}: the parser refuses it"
    else:  # what the platform sends: compact JSON
        assert text == protocol.dumps(message).decode(), f"docs/protocol.md:{line}"


# --- the parser and the schemas agree ----------------------------------------------------------


def platform_accepts(message: dict[str, Any]) -> bool:
    """Whether the platform takes this message: the parser, then the audio formats of a hello
    as the broker checks them (missing fields take the defaults, unknown ones are refused)."""
    try:
        parsed = protocol.parse(json.dumps(message).encode())
        if isinstance(parsed, protocol.Hello):
            if parsed.audio is not None:
                AudioFormat.from_dict({**AudioFormat().as_dict(), **parsed.audio})
            wanted = parsed.features.get("audio_down")
            if isinstance(wanted, dict):
                AudioFormat.from_dict({**AudioFormat(sample_rate=24000).as_dict(), **wanted})
    except (ProtocolError, AudioError):
        return False
    return True


def schema_accepts(message: dict[str, Any]) -> bool:
    return validator(f"up.{message['type']}").is_valid(message)


IMAGE = {"mime": "image/png", "data": b64(png())}


def request(**fields: Any) -> dict[str, Any]:
    return {"type": "request", "id": RID, "input": {"text": "hello"}, **fields}


def with_input(**body: Any) -> dict[str, Any]:
    return request(input=body)


CASES: list[tuple[str, dict[str, Any], bool]] = [
    # request
    ("text", request(), True),
    ("image only", with_input(images=[IMAGE]), True),
    ("text null and an image", with_input(text=None, images=[IMAGE]), True),
    ("two images", with_input(text="compare", images=[IMAGE, IMAGE]), True),
    ("every option", request(conversation="kitchen:1", options={
        "max_output_tokens": 4096, "speak": True}), True),
    ("unknown fields anywhere", request(extra=1, options={"future": True},
                                        input={"text": "x", "lang": "de"}), True),
    ("64-character id", request(id="a" * 64), True),
    ("conversation null", request(conversation=None), True),
    ("8000 characters", with_input(text="x" * 8000), True),
    ("no input", {"type": "request", "id": RID}, False),
    ("input not an object", request(input="hello"), False),
    ("empty input", with_input(), False),
    ("blank text", with_input(text=" \n\t"), False),
    ("empty text", with_input(text=""), False),
    ("text not a string", with_input(text=42), False),
    ("8001 characters", with_input(text="x" * 8001), False),
    ("three images", with_input(images=[IMAGE, IMAGE, IMAGE]), False),
    ("images not a list", with_input(images=IMAGE), False),
    ("images empty, no text", with_input(images=[]), False),
    ("gif", with_input(images=[{**IMAGE, "mime": "image/gif"}]), False),
    ("no mime", with_input(images=[{"data": IMAGE["data"]}]), False),
    ("base64 with a line break", with_input(images=[{
        **IMAGE, "data": IMAGE["data"][:20] + "\n" + IMAGE["data"][20:]}]), False),
    ("base64 without padding", with_input(images=[{
        **IMAGE, "data": IMAGE["data"].rstrip("=")}]), False),
    ("image too long", with_input(images=[{
        **IMAGE, "data": "A" * ((protocol.MAX_IMAGE_BYTES * 4) // 3 + 8)}]), False),
    ("15-character id", request(id="a" * 15), False),
    ("65-character id", request(id="a" * 65), False),
    ("id with a dot", request(id="3f2b9c1e.8d4a4f6b9e2c"), False),
    ("id a number", request(id=1234567890123456789), False),
    ("no id", {"type": "request", "input": {"text": "x"}}, False),
    ("conversation with a space", request(conversation="my kitchen"), False),
    ("conversation empty", request(conversation=""), False),
    ("options null", request(options=None), False),
    ("max_output_tokens 0", request(options={"max_output_tokens": 0}), False),
    ("max_output_tokens 4097", request(options={"max_output_tokens": 4097}), False),
    ("max_output_tokens true", request(options={"max_output_tokens": True}), False),
    ("max_output_tokens a string", request(options={"max_output_tokens": "512"}), False),
    ("speak a string", request(options={"speak": "yes"}), False),
    # abort
    ("abort", {"type": "abort", "id": RID}, True),
    ("abort with extras", {"type": "abort", "id": RID, "reason": "button"}, True),
    ("abort without id", {"type": "abort"}, False),
    ("abort with a short id", {"type": "abort", "id": "abc"}, False),
    # listen
    ("listen start", {"type": "listen", "state": "start", "id": RID}, True),
    ("listen start, all fields", {"type": "listen", "state": "start", "id": RID,
                                  "conversation": "c", "options": {"speak": False,
                                                                   "max_output_tokens": 64}},
     True),
    ("listen stop ignores options", {"type": "listen", "state": "stop", "id": RID,
                                     "options": "whatever", "conversation": "a b"}, True),
    ("listen start, bad options", {"type": "listen", "state": "start", "id": RID,
                                   "options": {"speak": 1}}, False),
    ("listen start, bad conversation", {"type": "listen", "state": "start", "id": RID,
                                        "conversation": "a/b"}, False),
    ("listen pause", {"type": "listen", "state": "pause", "id": RID}, False),
    ("listen without state", {"type": "listen", "id": RID}, False),
    ("listen without id", {"type": "listen", "state": "stop"}, False),
    # hello
    ("hello", {"type": "hello", "version": 1}, True),
    ("hello with formats", {"type": "hello", "version": 1,
                            "audio": {"codec": "opus", "sample_rate": 16000, "channels": 1,
                                      "frame_ms": 60},
                            "features": {"audio_down": {"sample_rate": 48000, "frame_ms": 20},
                                         "mcp": True}}, True),
    ("hello, audio null", {"type": "hello", "version": 1, "audio": None}, True),
    ("hello, partial audio", {"type": "hello", "version": 1, "audio": {"frame_ms": 20}}, True),
    ("hello version 2", {"type": "hello", "version": 2}, False),
    ("hello version a string", {"type": "hello", "version": "1"}, False),
    ("hello without version", {"type": "hello"}, False),
    ("hello, 44.1 kHz", {"type": "hello", "version": 1, "audio": {"sample_rate": 44100}},
     False),
    ("hello, stereo", {"type": "hello", "version": 1, "audio": {"channels": 2}}, False),
    ("hello, pcm", {"type": "hello", "version": 1, "audio": {"codec": "pcm"}}, False),
    ("hello, unknown audio field", {"type": "hello", "version": 1,
                                    "audio": {"bitrate": 24000}}, False),
    ("hello, audio a list", {"type": "hello", "version": 1, "audio": []}, False),
    ("hello, features a list", {"type": "hello", "version": 1, "features": []}, False),
    ("hello, 30 ms downlink", {"type": "hello", "version": 1,
                               "features": {"audio_down": {"frame_ms": 30}}}, False),
]


@pytest.mark.parametrize(("case", "message", "accepted"), CASES, ids=[c[0] for c in CASES])
def test_the_parser_and_the_schema_agree(case: str, message: dict[str, Any],
                                         accepted: bool) -> None:
    assert platform_accepts(message) is accepted
    assert schema_accepts(message) is accepted


# Where JSON Schema cannot say what the platform checks (or the platform is more lenient than
# the document asks); docs/protocol.md states the rule, these pin the behaviour.
KNOWN_DIFFERENCES: list[tuple[str, dict[str, Any], bool, bool]] = [
    # (case, message, platform accepts, schema accepts)
    ("an integer written as 512.0", request(options={"max_output_tokens": 512.0}), False, True),
    ("a rate written as 16000.0", {"type": "hello", "version": 1,
                                   "audio": {"sample_rate": 16000.0}}, False, True),
    ("PNG bytes declared as JPEG", with_input(images=[{**IMAGE, "mime": "image/jpeg"}]),
     False, True),
    ("not an image at all", with_input(images=[{"mime": "image/png", "data": b64(b"hi!")}]),
     False, True),
    ("more than 4096 x 4096 pixels", with_input(images=[{
        "mime": "image/png", "data": b64(png(4097, 4096))}]), False, True),
    ("audio_down not an object (ignored)", {"type": "hello", "version": 1,
                                            "features": {"audio_down": "24k"}}, True, False),
]


@pytest.mark.parametrize(("case", "message", "platform", "in_schema"), KNOWN_DIFFERENCES,
                         ids=[c[0] for c in KNOWN_DIFFERENCES])
def test_known_differences_between_the_parser_and_the_schema(
        case: str, message: dict[str, Any], platform: bool, in_schema: bool) -> None:
    assert platform_accepts(message) is platform
    assert schema_accepts(message) is in_schema


def test_the_base64_pattern_accepts_only_what_the_parser_decodes() -> None:
    pattern = re.compile(schema("up.request")["$defs"]["image"]["properties"]["data"]["pattern"])
    samples = ["", "QQ==", "QUI=", "QUJD", "QUJDRA==", "QQ", "QUI", "QUJDR", "QQ=", "QUJD=",
               "QU JD", "QUJD\n", "QU-D", "QU_D", "Q===", "QUJD====", b64(png())]
    for sample in samples:
        if not pattern.fullmatch(sample):
            continue
        base64.b64decode(sample, validate=True)  # the parser's call; must not raise


def test_size_limits_the_schema_cannot_express_are_enforced_by_the_parser() -> None:
    too_big = json.dumps(request(padding="x" * protocol.MAX_REQUEST_BYTES)).encode()
    control = json.dumps({"type": "abort", "id": RID,
                          "padding": "x" * protocol.MAX_CONTROL_BYTES}).encode()

    for payload, request_id in ((too_big, None), (control, RID)):
        with pytest.raises(ProtocolError) as refused:
            protocol.parse(payload)
        assert (refused.value.code, refused.value.request_id) == ("too_large", request_id)
    assert MAX_FRAME_BYTES == 1508  # docs/protocol.md section 4 and 11.1


# --- what the code sends validates ---------------------------------------------------------


@pytest.mark.parametrize("code", list(protocol.ERROR_CODES))
def test_every_error_the_parser_path_sends_validates(code: str) -> None:
    for request_id, retry_after in ((None, None), (RID, 1.0), (RID, 23.456789)):
        sent = json.loads(protocol.error_message(
            ProtocolError(code, request_id=request_id, retry_after=retry_after)))
        assert validator("down.error").is_valid(sent), sent


def test_platform_messages_refuse_unknown_fields_and_wrong_values() -> None:
    end = json.loads(next(text for _, name, text in doc_examples() if name == "down.end"))

    assert validator("down.end").is_valid(end)
    assert not validator("down.end").is_valid({**end, "extra": 1})
    assert not validator("down.end").is_valid({**end, "finish": "error"})
    assert not validator("down.end").is_valid({**end, "usage": {**end["usage"], "x": 1}})
    assert not validator("down.error").is_valid({"type": "error", "code": "nope",
                                                 "message": "m"})
    assert not validator("down.error").is_valid({"type": "error", "code": "internal",
                                                 "message": "m", "usage": end["usage"]})
