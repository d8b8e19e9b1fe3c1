"""The one async streaming interface every provider implements.

A provider turns a :class:`ProviderRequest` into an async iterator of events: text deltas,
the transcript of a voice turn, speech (PCM, which the broker encodes for the device), tool
calls, and the provider's own usage report when it gives one. Closing the iterator
(``aclose()``) cancels the upstream work: an HTTP stream is closed, timers stop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ImageInput:
    mime: str  # image/jpeg or image/png
    data: bytes
    width: int
    height: int


@dataclass(slots=True)
class ProviderRequest:
    request_id: str
    messages: list[dict[str, str]]  # conversation memory then this turn: {"role", "content"}
    text: str | None = None
    images: list[ImageInput] = field(default_factory=list)
    audio_pcm: bytes | None = None  # a voice turn: 16-bit little-endian mono PCM
    audio_rate: int = 16000
    speak: bool = False  # synthesise speech for the answer
    speech_rate: int = 24000  # PCM rate the provider should produce speech at
    max_output_tokens: int = 512
    model: str | None = None
    language: str | None = None


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str


@dataclass(frozen=True, slots=True)
class Speech:
    pcm: bytes  # 16-bit little-endian mono at ``rate``
    rate: int


@dataclass(frozen=True, slots=True)
class ToolCall:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ProviderUsage:
    """What the provider says it consumed; overrides the broker's estimate at settle."""

    input_tokens: int | None = None
    output_tokens: int | None = None


ProviderEvent = TextDelta | Transcript | Speech | ToolCall | ProviderUsage


class ProviderError(Exception):
    """A provider failed. ``code`` is the device-facing error code."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None,
                 before_first_token: bool = True) -> None:
        super().__init__(message)
        self.code = code  # provider_unavailable | provider_error | timeout
        self.message = message
        self.retry_after = retry_after
        self.before_first_token = before_first_token


class Provider(Protocol):
    name: str
    model: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        """Start the request; iterate for its events; ``aclose()`` cancels it."""
        ...

    async def close(self) -> None:
        """Release connections (called when the broker stops)."""
        ...


def describe(settings: dict[str, Any]) -> str:
    """A provider's settings for logs, without its secrets."""
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items())
                     if "key" not in k and "secret" not in k)
