"""The ``local`` provider: deterministic answers at a configurable pace, no network.

It is the embedded default and the benchmark's provider. Text gets an answer that quotes it;
images get one naming their size and format; a voice turn gets a transcript naming the audio's
duration, and speech (a tone) whose length follows the answer text. Time to first token and
tokens per second are settings; a token is one word of the answer (with its space).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from inference.providers.base import (
    ProviderEvent,
    ProviderRequest,
    ProviderUsage,
    Speech,
    TextDelta,
    Transcript,
)

WORDS = ("the quick brown fox jumps over the lazy dog while a small robot hums a song about "
         "light and rain and far away hills").split()
SPEECH_MS_PER_CHAR = 60  # roughly a calm speaking pace


@dataclass(frozen=True, slots=True)
class LocalSettings:
    ttft_ms: float = 150.0
    tokens_per_second: float = 30.0  # 0: as fast as possible
    answer_tokens: int = 40


def estimate_tokens(text: str) -> int:
    """The broker's local estimate: errs high (one token per 3 bytes of UTF-8, at least 1)."""
    return max(1, math.ceil(len(text.encode()) / 3))


class LocalProvider:
    name = "local"
    model = "ensoul-local-1"

    def __init__(self, settings: LocalSettings | None = None) -> None:
        self.settings = settings or LocalSettings()

    def answer_words(self, request: ProviderRequest, heard: str | None) -> list[str]:
        if request.images:
            lead = ", ".join(f"a {i.width}x{i.height} {i.mime.split('/')[1].upper()} image"
                             for i in request.images)
            opening = f"I see {lead}."
        elif heard is not None:
            opening = f"You said: {heard}"
        else:
            opening = f"You asked: {(request.text or '')[:200]}"
        words = opening.split()
        filler = (WORDS[i % len(WORDS)] for i in range(self.settings.answer_tokens))
        words.extend(filler)
        return words[:max(self.settings.answer_tokens, 1)]

    async def stream(self, request: ProviderRequest) -> AsyncIterator[ProviderEvent]:
        settings = self.settings
        heard = None
        if request.audio_pcm is not None:
            ms = len(request.audio_pcm) * 1000 // (2 * request.audio_rate)
            heard = f"{ms} milliseconds of audio"
            yield Transcript(heard)
        if settings.ttft_ms > 0:
            await asyncio.sleep(settings.ttft_ms / 1000)
        words = self.answer_words(request, heard)[:request.max_output_tokens]
        interval = 1 / settings.tokens_per_second if settings.tokens_per_second > 0 else 0.0
        started = time.monotonic()
        answer = []
        for index, word in enumerate(words):
            if interval and index:
                delay = started + index * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            text = word if index == 0 else " " + word
            answer.append(text)
            yield TextDelta(text)
        if request.speak:
            yield Speech(speech_tone("".join(answer), request.speech_rate), request.speech_rate)
        prompt = sum(estimate_tokens(m["content"]) for m in request.messages)
        prompt += estimate_tokens(request.text or "") + 85 * len(request.images)
        yield ProviderUsage(input_tokens=prompt, output_tokens=len(words))

    async def close(self) -> None:
        return None


@functools.cache
def _tone_second(rate: int) -> bytes:
    """One second of a quiet 220 Hz tone (a whole number of periods, so seconds join cleanly)."""
    return b"".join(int(3000 * math.sin(2 * math.pi * 220 * n / rate)).to_bytes(2, "little",
                                                                              signed=True)
                    for n in range(rate))


def speech_tone(text: str, rate: int) -> bytes:
    """A tone as long as ``text`` would take to say."""
    size = 2 * (rate * len(text) * SPEECH_MS_PER_CHAR // 1000)
    second = _tone_second(rate)
    return (second * (size // len(second) + 1))[:size]
