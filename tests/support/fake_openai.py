"""A local OpenAI-compatible server for tests and benchmarks.

A real HTTP/1.1 server (keep-alive, chunked streaming) on 127.0.0.1 and a free port, run by an
asyncio loop in a background thread. It writes exactly what OpenAI-compatible servers send:
``chat.completion.chunk`` SSE events, tool-call arguments split over chunks, the usage chunk
with ``choices: []`` and ``data: [DONE]``; ``/audio/transcriptions`` answers with the duration
of the WAV it received and ``/audio/speech`` streams 24 kHz 16-bit PCM (:func:`speech_for`).

Each chat request plays a :class:`Scenario`: the first queued one whose endpoint matches
(``server.next_scenario(...)``), else the one named by ``[fake:<name>]`` in the last user
message (see ``NAMED``), else a normal answer. Requests and connections are recorded so tests
can assert on bodies, headers and on the server seeing a connection closed::

    with FakeOpenAI() as server:
        server.next_scenario("429")
        ...  # point a client at server.base_url
        server.requests[-1].json, server.connections[-1].closed.wait(5)
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import re
import struct
import threading
import time
import wave
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

SPEECH_RATE = 24000
SPEECH_SAMPLES_PER_CHAR = 1200  # 50 ms of speech per character of input
# Odd on purpose: real chunk boundaries fall in the middle of a 16-bit sample.
SPEECH_CHUNK_BYTES = 4001
DEFAULT_ANSWER = "Hello there. How can I help you today?"


def speech_for(text: str) -> bytes:
    """The PCM the server speaks for ``text``: one sample value derived from the text."""
    sample = zlib.crc32(text.encode()) % 30000 + 1
    return struct.pack("<h", sample) * (len(text) * SPEECH_SAMPLES_PER_CHAR)


def tokens_of(text: str) -> list[str]:
    """Split ``text`` the way a model streams it: words with their leading space, punctuation."""
    return re.findall(r"\s*\w+|\s*[^\w\s]|\s+", text)


@dataclass(frozen=True)
class Scenario:
    kind: str = "normal"  # normal | status | cut | end_early | malformed | tool_call
    endpoint: str = "chat/completions"  # the path suffix this scenario applies to
    text: str | None = None  # the answer; None: DEFAULT_ANSWER (no text before tool calls)
    status: int = 500  # status: the HTTP status answered
    retry_after: str | None = None  # status: the Retry-After header
    headers_delay: float = 0.0  # seconds before the response headers
    first_token_delay: float = 0.0  # seconds between the role chunk and the first token
    hold_after: int | None = None  # wait for server.release() after this many tokens
    break_after: int = 3  # cut / end_early / malformed: tokens sent before it happens
    tool_calls: tuple[tuple[str, str], ...] = ()  # tool_call: (name, arguments JSON)
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens; None: counted


NAMED: dict[str, Scenario] = {
    "normal": Scenario(),
    "429": Scenario("status", status=429, retry_after="7"),
    "500": Scenario("status", status=500),
    "slow": Scenario(first_token_delay=30.0),
    "cut": Scenario("cut"),
    "end_early": Scenario("end_early"),
    "malformed": Scenario("malformed"),
    "tool_call": Scenario("tool_call", tool_calls=(("get_weather", '{"city": "Paris"}'),)),
}


@dataclass
class RecordedRequest:
    connection: int
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any = None
    form: dict[str, bytes] = field(default_factory=dict)  # multipart fields and files
    completed: threading.Event = field(default_factory=threading.Event)  # response fully sent


@dataclass
class ConnectionRecord:
    id: int
    closed: threading.Event = field(default_factory=threading.Event)
    closed_by: str | None = None  # client | server


class _Cut(Exception):
    """The scenario closes the connection in the middle of the body."""


class FakeOpenAI:
    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key  # when set, requests must carry it as a bearer token
        self.requests: list[RecordedRequest] = []
        self.connections: list[ConnectionRecord] = []
        self.port = 0
        self._scenarios: deque[Scenario] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-openai",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._released: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def next_scenario(self, scenario: Scenario | str = "normal", **changes: Any) -> None:
        """Queue a scenario (or a ``NAMED`` one, with ``changes``) for the next matching request."""
        if isinstance(scenario, str):
            scenario = NAMED[scenario]
        with self._lock:
            self._scenarios.append(replace(scenario, **changes))

    def release(self) -> None:
        """Let held streams (``hold_after``) go on; later ones are not held."""
        released = self._released
        assert released is not None, "start() the server first"
        self._loop.call_soon_threadsafe(released.set)

    def requests_to(self, suffix: str) -> list[RecordedRequest]:
        return [r for r in list(self.requests) if r.path.endswith(suffix)]

    # The server side, run on the background loop.

    async def _listen(self) -> None:
        self._released = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        connection = ConnectionRecord(next(self._ids))
        self.connections.append(connection)
        try:
            while (request := await _read_request(reader, connection.id)) is not None:
                self.requests.append(request)
                await self._respond(request, reader, writer, connection)
                request.completed.set()
            connection.closed_by = "client"
        except _Cut:
            connection.closed_by = "server"
        except (ConnectionError, asyncio.IncompleteReadError):
            connection.closed_by = "client"
        finally:
            writer.close()
            connection.closed.set()
            self._handlers.discard(task)

    def _scenario_for(self, request: RecordedRequest) -> Scenario:
        with self._lock:
            for scenario in self._scenarios:
                if request.path.endswith(scenario.endpoint):
                    self._scenarios.remove(scenario)
                    return scenario
        messages = request.json.get("messages") if isinstance(request.json, dict) else None
        users = [m for m in messages or [] if m.get("role") == "user"]
        if users:
            content = users[-1].get("content")
            text = content if isinstance(content, str) else " ".join(
                part.get("text", "") for part in content if isinstance(part, dict))
            if match := re.search(r"\[fake:(\w+)\]", text):
                return NAMED[match.group(1)]
        return Scenario(endpoint=request.path)

    async def _respond(self, request: RecordedRequest, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, connection: ConnectionRecord) -> None:
        scenario = self._scenario_for(request)
        if scenario.headers_delay:
            await _unless_closed(reader, asyncio.sleep(scenario.headers_delay))
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("authorization") != expected:
            return await _send_error(writer, 401, "Incorrect API key provided.")
        if scenario.kind == "status":
            headers = {"retry-after": scenario.retry_after} if scenario.retry_after else {}
            return await _send_error(writer, scenario.status, "The fake says no.", headers)
        if request.path.endswith("/chat/completions"):
            if not isinstance(request.json, dict) or request.json.get("stream") is not True:
                return await _send_error(writer, 400, "The fake server only streams.")
            body = self._chat_events(request.json, scenario)
            return await _stream(reader, writer, "text/event-stream", body)
        if request.path.endswith("/audio/transcriptions"):
            heard = _heard_ms(request)
            if heard is None:
                return await _send_error(writer, 400, "The fake transcribes a WAV file.")
            return await _send_json(writer, 200, {"text": f"I heard {heard} ms of audio."})
        if request.path.endswith("/audio/speech"):
            options = request.json if isinstance(request.json, dict) else {}
            if options.get("response_format") != "pcm" or not options.get("input"):
                return await _send_error(writer, 400, "The fake speaks pcm, from some input.")
            pcm = speech_for(options["input"])
            return await _stream(reader, writer, "application/octet-stream", _slices(pcm))
        return await _send_error(writer, 404, f"No route {request.path}.")

    async def _chat_events(self, body: dict[str, Any], scenario: Scenario) -> AsyncIterator[bytes]:
        chunk = _chunk_maker(body)
        tokens = tokens_of(DEFAULT_ANSWER if scenario.text is None and scenario.kind != "tool_call"
                           else scenario.text or "")
        yield _sse(chunk({"role": "assistant", "content": ""}))
        if scenario.first_token_delay:
            await asyncio.sleep(scenario.first_token_delay)
        for sent, token in enumerate(tokens):
            if scenario.hold_after == sent:
                assert self._released is not None
                await self._released.wait()
            if scenario.break_after == sent:
                if scenario.kind == "cut":
                    raise _Cut
                if scenario.kind == "end_early":
                    return
                if scenario.kind == "malformed":
                    yield b'data: {"id":"chatcmpl-fake","choices":[{"delta":\n\n'
            yield _sse(chunk({"content": token}))
        for index, (name, arguments) in enumerate(scenario.tool_calls):
            yield _sse(chunk({"tool_calls": [{
                "index": index, "id": f"call_fake{index}", "type": "function",
                "function": {"name": name, "arguments": ""}}]}))
            for start in range(0, len(arguments), 5):
                yield _sse(chunk({"tool_calls": [{
                    "index": index, "function": {"arguments": arguments[start:start + 5]}}]}))
        finish = "tool_calls" if scenario.tool_calls else "stop"
        yield _sse(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt, completion = scenario.usage or (_count_prompt(body), len(tokens))
            yield _sse(chunk(None, usage={"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}))
        yield b"data: [DONE]\n\n"


def _chunk_maker(body: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """Chunks as OpenAI writes them: one id per stream, ``usage: null`` until the last."""
    stream_id = f"chatcmpl-fake{zlib.crc32(json.dumps(body).encode()):08x}"
    created = int(time.time())
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None,
              usage: dict[str, int] | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        made: dict[str, Any] = {"id": stream_id, "object": "chat.completion.chunk",
                                "created": created, "model": body.get("model", "fake"),
                                "system_fingerprint": "fp_fake", "choices": choices}
        if include_usage:
            made["usage"] = usage
        return made

    return chunk


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _count_prompt(body: dict[str, Any]) -> int:
    words = 0
    for message in body.get("messages") or []:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [
            p.get("text", "") for p in content or [] if isinstance(p, dict)]
        words += sum(len(part.split()) for part in parts) + 3  # role and separators
    return words


async def _slices(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), SPEECH_CHUNK_BYTES):
        yield data[start:start + SPEECH_CHUNK_BYTES]


def _heard_ms(request: RecordedRequest) -> int | None:
    try:
        with wave.open(io.BytesIO(request.form["file"])) as wav:
            return wav.getnframes() * 1000 // wav.getframerate()
    except (KeyError, EOFError, wave.Error):
        return None


# HTTP/1.1, just enough of it: Content-Length or chunked request bodies, chunked responses.

async def _read_request(reader: asyncio.StreamReader, connection: int) -> RecordedRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in filter(None, header_lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    request = RecordedRequest(connection, method, target.split("?")[0], headers, body)
    content_type = headers.get("content-type", "")
    if content_type.startswith("application/json"):
        request.json = json.loads(body)
    elif content_type.startswith("multipart/form-data"):
        request.form = _multipart(body, content_type)
    return request


def _multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    assert boundary is not None, content_type
    form = {}
    for part in body.split(b"--" + boundary.group(1).encode())[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        assert name is not None, head
        form[name.group(1).decode()] = content[:-2]  # the CRLF before the next boundary
    return form


async def _send_json(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    head = {"content-type": "application/json", "content-length": str(len(body)),
            **(headers or {})}
    writer.write(_head(status, head) + body)
    await writer.drain()


async def _send_error(writer: asyncio.StreamWriter, status: int, message: str,
                      headers: dict[str, str] | None = None) -> None:
    error = {"message": message, "type": "fake_error", "param": None, "code": str(status)}
    await _send_json(writer, status, {"error": error}, headers)


async def _stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, content_type: str,
                  body: AsyncIterator[bytes]) -> None:
    """Send ``body`` chunked; stops (and raises ConnectionError) when the client hangs up."""
    writer.write(_head(200, {"content-type": content_type, "transfer-encoding": "chunked",
                             "cache-control": "no-cache"}))

    async def send() -> None:
        async for data in body:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    await _unless_closed(reader, send())


async def _unless_closed(reader: asyncio.StreamReader, work: Any) -> None:
    """Run ``work`` while watching the connection: a client that hangs up stops it.

    A client sends nothing while its response is outstanding (HTTP/1.1 without pipelining),
    so a read that returns is the client closing the connection.
    """
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not worker.done():
            raise ConnectionResetError("the client closed the connection")
        worker.result()
    finally:
        worker.cancel()
        watcher.cancel()
        await asyncio.gather(worker, watcher, return_exceptions=True)


def _head(status: int, headers: dict[str, str]) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", "connection: keep-alive",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
