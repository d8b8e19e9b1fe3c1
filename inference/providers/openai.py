"""A provider for any OpenAI-compatible endpoint: OpenAI, DashScope's compatible mode, vLLM, Ollama.

Chat answers stream from ``/chat/completions`` (SSE). A voice turn is a pipeline: the PCM goes
to ``/audio/transcriptions`` as a WAV, the transcript becomes the user turn, and when the
request asks to speak, each sentence of the answer goes to ``/audio/speech`` as soon as it is
complete, concurrently with the rest of the answer, so the device hears the first sentence
while the model is still writing the last.

All calls share one HTTP/1.1 keep-alive pool. Deadlines are asyncio deadlines rather than
httpx's per-read timeouts because what matters is the time to the first token, the silence
between chunks and the turn as a whole, not the time of any one socket read.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import json
import logging
import re
import time
import wave
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import orjson

from inference.providers.base import (
    ImageInput,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    ProviderUsage,
    Speech,
    TextDelta,
    ToolCall,
    Transcript,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# A sentence ends at . ! ? (and closing quotes) followed by whitespace, so 3.14 and example.com
# stay whole; at CJK full stops, which take no space after them; or at a line break.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s)"
                           r"|[\u3002\uff01\uff1f]+[\u201d\u2019\u300d\u300f\uff09]*"  # CJK
                           r"|\n")
_SPEAKABLE = re.compile(r"\w")


@dataclass(frozen=True, slots=True)
class OpenAISettings:
    base_url: str  # up to and including the version: https://api.openai.com/v1
    model: str
    api_key: str = ""  # empty for local servers (vLLM, Ollama) that take none
    transcription_model: str | None = None  # whisper-1; None: voice turns are refused
    speech_model: str | None = None  # tts-1; None: spoken answers are refused
    voice: str = "alloy"
    speech_rate: int = 24000  # the rate of the server's "pcm" format (OpenAI: 24 kHz mono)
    max_tokens_field: str = "max_tokens"  # OpenAI's reasoning models: max_completion_tokens
    connect_timeout: float = 5.0
    first_token_timeout: float = 20.0  # request sent -> first token, transcript or speech byte
    idle_timeout: float = 15.0  # between chunks once a stream has started
    total_timeout: float = 120.0  # the whole turn
    headers: Mapping[str, str] = field(default_factory=dict)
    max_connections: int = 200
    name: str = "openai"


class OpenAIProvider:
    def __init__(self, settings: OpenAISettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.model = settings.model
        headers = dict(settings.headers)
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self._client = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(None, connect=settings.connect_timeout),
            # Idle connections are dropped before uvicorn's (vLLM's) 5 s keep-alive would close
            # them under a request being sent.
            limits=httpx.Limits(max_connections=settings.max_connections,
                                max_keepalive_connections=settings.max_connections,
                                keepalive_expiry=4.0),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        turn = _Deadlines(self.settings)
        yielded = False
        try:
            self._check_can_answer(request)
            user_text = request.text
            if request.audio_pcm is not None:
                user_text = await self._transcribe(request, turn)
                yield Transcript(user_text)
                yielded = True
                if not user_text.strip():
                    return  # silence: nothing to answer
            events = self._chat(request, user_text, turn)
            if request.speak:
                events = self._with_speech(events, turn)
            async with aclosing(events):
                async for event in events:
                    yield event
                    yielded = True
        except ProviderError as exc:
            log.info("%s request %s failed: %s %s", self.name, request.request_id, exc.code,
                     exc.message)
            if not yielded:
                raise
            code = "timeout" if exc.code == "timeout" else "provider_error"
            raise ProviderError(code, exc.message, before_first_token=False) from exc

    def _check_can_answer(self, request: ProviderRequest) -> None:
        if request.audio_pcm is not None and not self.settings.transcription_model:
            raise ProviderError("provider_error", f"{self.name} has no transcription model")
        if request.speak and not self.settings.speech_model:
            raise ProviderError("provider_error", f"{self.name} has no speech model")

    async def _transcribe(self, request: ProviderRequest, turn: _Deadlines) -> str:
        assert request.audio_pcm is not None
        data = {"model": self.settings.transcription_model, "response_format": "json"}
        if request.language:  # the API takes ISO-639-1: "en", not "en-US"
            data["language"] = request.language.split("-")[0].lower()
        files = {"file": ("turn.wav", _wav(request.audio_pcm, request.audio_rate), "audio/wav")}
        deadline = turn.first()
        async with self._post("audio/transcriptions", deadline, data=data, files=files) as response:
            body = await _before(deadline, response.aread())
        try:
            text = json.loads(body)["text"]
        except (ValueError, KeyError, TypeError):
            raise ProviderError("provider_error", f"unreadable transcription: {body[:200]!r}") \
                from None
        if not isinstance(text, str):
            raise ProviderError("provider_error", f"unreadable transcription: {body[:200]!r}")
        return text

    async def _chat(self, request: ProviderRequest, user_text: str | None,
                    turn: _Deadlines) -> AsyncGenerator[ProviderEvent, None]:
        messages: list[dict[str, Any]] = list(request.messages)
        if user_text or request.images:
            messages.append({"role": "user", "content": _user_content(user_text, request.images)})
        body = {"model": request.model or self.model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True},
                self.settings.max_tokens_field: request.max_output_tokens}
        first_token = turn.first()
        async with self._post("chat/completions", first_token, json=body) as response:
            chunks = _ChatStream()
            lines = response.aiter_lines()
            while True:
                deadline = turn.idle() if chunks.started else first_token
                try:
                    line = await _before(deadline, anext(lines))
                except StopAsyncIteration:
                    break
                except (ProviderError, httpx.HTTPError):
                    if chunks.done:
                        break  # [DONE] came; only the end of the body was late
                    raise
                for event in chunks.feed(line):
                    yield event
            for event in chunks.end():
                yield event

    async def _with_speech(self, answer: AsyncGenerator[ProviderEvent, None],
                           turn: _Deadlines) -> AsyncGenerator[ProviderEvent, None]:
        """The answer's events as they come and, in sentence order, speech for each sentence.

        Two tasks feed one queue: the chat stream (which also cuts the text into sentences)
        and the speech of one sentence after another, so the first sentence is spoken while
        the model is still writing.
        """
        out: asyncio.Queue[ProviderEvent | Exception | None] = asyncio.Queue()
        sentences: asyncio.Queue[str | None] = asyncio.Queue()

        async def read_answer() -> None:
            splitter = _Sentences()
            async with aclosing(answer):
                async for event in answer:
                    out.put_nowait(event)
                    if isinstance(event, TextDelta):
                        for sentence in splitter.feed(event.text):
                            sentences.put_nowait(sentence)
            for sentence in splitter.flush():
                sentences.put_nowait(sentence)
            sentences.put_nowait(None)

        async def speak() -> None:
            while (sentence := await sentences.get()) is not None:
                async with aclosing(self._speak(sentence, turn)) as speech:
                    async for chunk in speech:
                        out.put_nowait(chunk)

        async def run(work: Coroutine[Any, Any, None]) -> None:
            try:
                await work
            except Exception as exc:
                out.put_nowait(exc)
            else:
                out.put_nowait(None)

        tasks = [asyncio.create_task(run(read_answer())), asyncio.create_task(run(speak()))]
        try:
            running = len(tasks)
            while running:
                item = await out.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _speak(self, sentence: str, turn: _Deadlines) -> AsyncGenerator[Speech, None]:
        body = {"model": self.settings.speech_model, "input": sentence,
                "voice": self.settings.voice, "response_format": "pcm"}
        deadline = turn.first()
        async with self._post("audio/speech", deadline, json=body) as response:
            chunks = response.aiter_bytes()
            odd = b""  # a chunk may end inside a 16-bit sample
            while True:
                try:
                    data = odd + await _before(deadline, anext(chunks))
                except StopAsyncIteration:
                    break
                deadline = turn.idle()
                whole = len(data) & ~1
                odd = data[whole:]
                if whole:
                    yield Speech(data[:whole], self.settings.speech_rate)

    @asynccontextmanager
    async def _post(self, path: str, deadline: float,
                    **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """POST and open the response, with every failure turned into a ProviderError."""
        request = self._client.build_request("POST", path, **kwargs)
        try:
            response = await _before(deadline, self._client.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise ProviderError("provider_unavailable", f"{path}: {exc!r}") from exc
        try:
            if response.status_code >= 400:
                await _raise_for_status(path, response, deadline)
            yield response
        except httpx.HTTPError as exc:  # the body broke off
            raise ProviderError("provider_error", f"{path}: {exc!r}") from exc
        finally:
            await response.aclose()


class _Deadlines:
    """The turn's deadlines on the loop's clock: one for the turn, fresh ones per wait."""

    def __init__(self, settings: OpenAISettings) -> None:
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._end = self._loop.time() + settings.total_timeout

    def first(self) -> float:
        return min(self._loop.time() + self._settings.first_token_timeout, self._end)

    def idle(self) -> float:
        return min(self._loop.time() + self._settings.idle_timeout, self._end)


async def _before(deadline: float, work: Awaitable[T]) -> T:
    """Await ``work`` by ``deadline`` (the loop's clock), or raise ProviderError("timeout")."""
    try:
        async with asyncio.timeout_at(deadline):
            return await work
    except TimeoutError:
        raise ProviderError("timeout", "the provider did not answer in time") from None


async def _raise_for_status(path: str, response: httpx.Response, deadline: float) -> None:
    body = await _before(deadline, response.aread())
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    message = f"{path}: HTTP {response.status_code}: {message}"
    if response.status_code == 429 or response.status_code >= 500:
        raise ProviderError("provider_unavailable", message,
                            retry_after=_retry_after(response.headers))
    raise ProviderError("provider_error", message)


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait: ``retry-after-ms`` (OpenAI, Azure) or ``Retry-After`` (seconds or date)."""
    if milliseconds := headers.get("retry-after-ms"):
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


class _ChatStream:
    """Turns the SSE lines of a ``chat.completion.chunk`` stream into provider events."""

    def __init__(self) -> None:
        self.started = False  # the model has produced text or a tool call
        self.done = False  # data: [DONE]
        self._finished = False  # a finish_reason: the answer is complete
        self._data: list[str] = []
        self._calls: dict[int, dict[str, str]] = {}
        self._usage: dict[str, Any] | None = None

    def feed(self, line: str) -> list[ProviderEvent]:
        if line:
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
            return []  # comments (": keep-alive"), event:, id:, retry:
        if not self._data:
            return []
        data = "\n".join(self._data)
        self._data = []
        if data == "[DONE]":
            self.done = True
            return self._complete_calls()
        try:
            return self._chunk(orjson.loads(data))
        except (ValueError, TypeError, AttributeError, KeyError):
            raise ProviderError("provider_error", f"malformed chunk: {data[:200]!r}") from None

    def end(self) -> list[ProviderEvent]:
        """The body ended: the answer, unless it was cut before it finished."""
        events = self.feed("")
        if not (self.done or self._finished):
            raise ProviderError("provider_error", "the stream ended before the answer did")
        events += self._complete_calls()
        if self._usage:
            events.append(ProviderUsage(self._usage.get("prompt_tokens"),
                                        self._usage.get("completion_tokens")))
        return events

    def _chunk(self, chunk: dict[str, Any]) -> list[ProviderEvent]:
        if chunk.get("error"):
            raise ProviderError("provider_error", f"error in stream: {chunk['error']}")
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        events: list[ProviderEvent] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if content := delta.get("content"):
                if not isinstance(content, str):
                    raise TypeError(content)
                events.append(TextDelta(content))
                self.started = True
            if delta.get("reasoning_content") or delta.get("reasoning"):
                self.started = True  # a thinking model is producing: the idle timeout applies
            for part in delta.get("tool_calls") or []:
                call = self._calls.setdefault(part.get("index", 0),
                                              {"id": "", "name": "", "arguments": ""})
                function = part.get("function") or {}
                # Some servers repeat the id and name in every delta: keep the first.
                call["id"] = call["id"] or part.get("id") or ""
                call["name"] = call["name"] or function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
                self.started = True
            if choice.get("finish_reason"):
                self._finished = True
                events += self._complete_calls()
        return events

    def _complete_calls(self) -> list[ProviderEvent]:
        calls: list[ProviderEvent] = [
            ToolCall(call["id"] or f"call_{index}", call["name"], call["arguments"])
            for index, call in sorted(self._calls.items())]
        self._calls.clear()
        return calls


class _Sentences:
    """Cuts streamed text into sentences as it arrives."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        self._pending += text
        sentences: list[str] = []
        start = 0
        for end in _SENTENCE_END.finditer(self._pending):
            sentences.append(self._pending[start:end.end()])
            start = end.end()
        self._pending = self._pending[start:]
        return [s.strip() for s in sentences if _SPEAKABLE.search(s)]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending.strip(), ""
        return [rest] if _SPEAKABLE.search(rest) else []


def _user_content(text: str | None, images: list[ImageInput]) -> str | list[dict[str, Any]]:
    if not images:
        return text or ""
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for image in images:
        url = f"data:{image.mime};base64,{base64.b64encode(image.data).decode('ascii')}"
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _wav(pcm: bytes, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)
    return buffer.getvalue()
