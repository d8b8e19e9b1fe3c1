"""The OpenAI-compatible provider against a local server that speaks the real wire format."""

from __future__ import annotations

import asyncio
import base64
import io
import wave
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

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
from inference.providers.failover import FailoverProvider
from inference.providers.openai import OpenAIProvider, OpenAISettings, _Sentences
from tests.support.fake_openai import (
    DEFAULT_ANSWER,
    SPEECH_RATE,
    FakeOpenAI,
    Scenario,
    speech_for,
    tokens_of,
)
from tests.support.waiting import free_port

T = TypeVar("T")
API_KEY = "sk-test-key"
SYSTEM = {"role": "system", "content": "You are a small robot."}


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=API_KEY) as fake:
        yield fake


def settings(server: FakeOpenAI, **changes: Any) -> OpenAISettings:
    defaults: dict[str, Any] = {
        "base_url": server.base_url, "api_key": API_KEY, "model": "gpt-test",
        "transcription_model": "whisper-1", "speech_model": "tts-1", "voice": "nova",
        "headers": {"X-Tenant": "acme"}, "first_token_timeout": 10.0, "idle_timeout": 10.0}
    return OpenAISettings(**{**defaults, **changes})


def run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on a fresh loop; a hang fails the test instead of waiting for pytest."""
    async def bounded() -> T:
        async with asyncio.timeout(20):
            return await work

    return asyncio.run(bounded())


async def collect(events: AsyncIterator[ProviderEvent]
                  ) -> tuple[list[ProviderEvent], ProviderError | None]:
    received: list[ProviderEvent] = []
    try:
        async for event in events:
            received.append(event)
    except ProviderError as exc:
        return received, exc
    return received, None


def answer(server: FakeOpenAI, request: ProviderRequest, *,
           while_open: Callable[[], object] | None = None, **changes: Any
           ) -> tuple[list[ProviderEvent], ProviderError | None]:
    """Ask a new provider; ``while_open`` runs (in a thread) before the provider is closed."""
    async def ask() -> tuple[list[ProviderEvent], ProviderError | None]:
        provider = OpenAIProvider(settings(server, **changes))
        try:
            received = await collect(provider.stream(request))
            if while_open is not None:
                await asyncio.to_thread(while_open)
            return received
        finally:
            await provider.close()

    return run(ask())


def text_of(events: list[ProviderEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def pcm(seconds: float, rate: int = 16000) -> bytes:
    return b"\x01\x00" * int(seconds * rate)


def turn(text: str | None = "What can you do?", **fields: Any) -> ProviderRequest:
    return ProviderRequest(request_id="req-1", messages=[SYSTEM], text=text, **fields)


def test_streams_text_deltas_then_the_usage_the_server_reports(server: FakeOpenAI) -> None:
    server.next_scenario(usage=(12, 7))

    events, error = answer(server, turn(max_output_tokens=64))

    assert error is None
    assert events == [TextDelta(t) for t in tokens_of(DEFAULT_ANSWER)] + [ProviderUsage(12, 7)]
    [sent] = server.requests_to("/chat/completions")
    assert sent.json == {
        "model": "gpt-test", "stream": True, "stream_options": {"include_usage": True},
        "max_tokens": 64,
        "messages": [SYSTEM, {"role": "user", "content": "What can you do?"}]}
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["x-tenant"] == "acme"


def test_the_token_limit_field_and_model_follow_settings_and_request(server: FakeOpenAI) -> None:
    events, error = answer(server, turn(model="gpt-other", max_output_tokens=32),
                           max_tokens_field="max_completion_tokens")

    assert error is None and text_of(events) == DEFAULT_ANSWER
    body = server.requests_to("/chat/completions")[0].json
    assert body["model"] == "gpt-other"
    assert body["max_completion_tokens"] == 32 and "max_tokens" not in body


def test_turns_reuse_one_keep_alive_connection(server: FakeOpenAI) -> None:
    async def two_turns() -> None:
        provider = OpenAIProvider(settings(server))
        try:
            for _ in range(2):
                events, error = await collect(provider.stream(turn()))
                assert error is None and text_of(events) == DEFAULT_ANSWER
        finally:
            await provider.close()

    run(two_turns())

    first, second = server.requests_to("/chat/completions")
    assert first.connection == second.connection


def test_images_are_sent_as_data_urls_after_the_text(server: FakeOpenAI) -> None:
    jpeg = ImageInput("image/jpeg", b"\xff\xd8\xff\xe0fake-jpeg", 4, 3)
    png = ImageInput("image/png", b"\x89PNG fake", 2, 2)

    events, error = answer(server, turn("What is this?", images=[jpeg, png]))

    assert error is None and text_of(events) == DEFAULT_ANSWER
    user = server.requests_to("/chat/completions")[0].json["messages"][-1]
    assert user == {"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(jpeg.data).decode()}},
        {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png.data).decode()}}]}


def test_voice_turn_transcribes_answers_and_speaks_sentence_one_while_the_answer_streams(
        server: FakeOpenAI) -> None:
    # The chat stream stops after " How" (sentence one is complete) until released: speech for
    # it can only arrive if it is synthesised while the answer is still streaming.
    server.next_scenario(hold_after=4)
    request = ProviderRequest(request_id="req-v", messages=[SYSTEM], audio_pcm=pcm(1.5),
                              speak=True, language="en-GB")

    async def talk() -> tuple[list[ProviderEvent], list[ProviderEvent]]:
        provider = OpenAIProvider(settings(server))
        events = provider.stream(request)
        try:
            before_release: list[ProviderEvent] = []
            while not isinstance(event := await anext(events), Speech):
                before_release.append(event)
            before_release.append(event)
            assert not server.requests_to("/chat/completions")[0].completed.is_set()
            server.release()
            rest, error = await collect(events)
            assert error is None
            return before_release, rest
        finally:
            await events.aclose()
            await provider.close()

    before_release, rest = run(talk())

    events = before_release + rest
    assert events[0] == Transcript("I heard 1500 ms of audio.")
    assert text_of(before_release) == "Hello there. How"
    assert text_of(events) == DEFAULT_ANSWER
    speech = [e for e in events if isinstance(e, Speech)]
    assert {e.rate for e in speech} == {SPEECH_RATE}
    assert all(len(e.pcm) % 2 == 0 for e in speech)
    assert b"".join(e.pcm for e in speech) == (
        speech_for("Hello there.") + speech_for("How can I help you today?"))
    assert [r.json["input"] for r in server.requests_to("/audio/speech")] == [
        "Hello there.", "How can I help you today?"]
    assert {r.json["voice"] for r in server.requests_to("/audio/speech")} == {"nova"}
    [asr] = server.requests_to("/audio/transcriptions")
    assert asr.form["model"] == b"whisper-1" and asr.form["language"] == b"en"
    with wave.open(io.BytesIO(asr.form["file"])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.readframes(wav.getnframes()) == pcm(1.5)
    chat = server.requests_to("/chat/completions")[0].json
    assert chat["messages"][-1] == {"role": "user", "content": "I heard 1500 ms of audio."}


def test_a_text_turn_that_asks_to_speak_is_spoken_without_transcription(
        server: FakeOpenAI) -> None:
    server.next_scenario(text="One. Two!")

    events, error = answer(server, turn(speak=True))

    assert error is None
    assert text_of(events) == "One. Two!"
    assert b"".join(e.pcm for e in events if isinstance(e, Speech)) == (
        speech_for("One.") + speech_for("Two!"))
    assert server.requests_to("/audio/transcriptions") == []


def test_a_voice_turn_without_speech_yields_transcript_then_text(server: FakeOpenAI) -> None:
    events, error = answer(server, turn(None, audio_pcm=pcm(0.25, 8000), audio_rate=8000))

    assert error is None
    assert events[0] == Transcript("I heard 250 ms of audio.")
    assert text_of(events) == DEFAULT_ANSWER
    assert not any(isinstance(e, Speech) for e in events)
    assert server.requests_to("/audio/speech") == []


def test_429_is_unavailable_with_the_servers_retry_after(server: FakeOpenAI) -> None:
    server.next_scenario("429")

    events, error = answer(server, turn())

    assert events == []
    assert error is not None and error.code == "provider_unavailable"
    assert error.retry_after == 7.0 and error.before_first_token


def test_500_is_unavailable(server: FakeOpenAI) -> None:
    server.next_scenario("500")

    events, error = answer(server, turn())

    assert events == []
    assert error is not None and error.code == "provider_unavailable"
    assert error.retry_after is None and error.before_first_token


def test_a_refused_request_is_a_provider_error(server: FakeOpenAI) -> None:
    events, error = answer(server, turn(), api_key="sk-wrong")

    assert events == []
    assert error is not None and error.code == "provider_error"
    assert "Incorrect API key" in error.message


def test_a_refused_transcription_fails_the_turn_before_its_first_event(
        server: FakeOpenAI) -> None:
    server.next_scenario("500", endpoint="/audio/transcriptions")

    events, error = answer(server, turn(None, audio_pcm=pcm(0.5)))

    assert events == []
    assert error is not None and error.code == "provider_unavailable"
    assert server.requests_to("/chat/completions") == []


def test_an_unreachable_server_is_unavailable(server: FakeOpenAI) -> None:
    events, error = answer(server, turn(), base_url=f"http://127.0.0.1:{free_port()}/v1")

    assert events == []
    assert error is not None and error.code == "provider_unavailable"


def test_a_slow_first_token_times_out_and_hangs_up(server: FakeOpenAI) -> None:
    server.next_scenario("slow")

    def server_saw_the_hang_up() -> None:
        [connection] = server.connections
        assert connection.closed.wait(5) and connection.closed_by == "client"

    events, error = answer(server, turn(), first_token_timeout=0.3, idle_timeout=60.0,
                           while_open=server_saw_the_hang_up)

    assert events == []
    assert error is not None and error.code == "timeout" and error.before_first_token


def test_slow_response_headers_time_out(server: FakeOpenAI) -> None:
    server.next_scenario(headers_delay=30.0)

    events, error = answer(server, turn(), first_token_timeout=0.3)

    assert events == [] and error is not None and error.code == "timeout"


def test_a_silent_stream_after_the_first_token_times_out(server: FakeOpenAI) -> None:
    server.next_scenario(hold_after=2)

    events, error = answer(server, turn(), idle_timeout=0.3)

    assert text_of(events) == "Hello there"
    assert error is not None and error.code == "timeout" and not error.before_first_token


@pytest.mark.parametrize("kind", ["cut", "end_early"])
def test_a_stream_cut_mid_way_is_a_provider_error_after_the_first_token(
        server: FakeOpenAI, kind: str) -> None:
    server.next_scenario(kind, break_after=3)

    events, error = answer(server, turn())

    assert text_of(events) == "Hello there."
    assert error is not None and error.code == "provider_error"
    assert not error.before_first_token


@pytest.mark.parametrize(("break_after", "before_first_token"), [(0, True), (3, False)])
def test_a_malformed_chunk_is_a_provider_error(
        server: FakeOpenAI, break_after: int, before_first_token: bool) -> None:
    server.next_scenario("malformed", break_after=break_after)

    events, error = answer(server, turn())

    assert text_of(events) == "".join(tokens_of(DEFAULT_ANSWER)[:break_after])
    assert error is not None and error.code == "provider_error"
    assert "malformed chunk" in error.message
    assert error.before_first_token is before_first_token


def test_tool_call_deltas_are_assembled_into_tool_calls(server: FakeOpenAI) -> None:
    weather = '{"city": "Paris", "unit": "celsius"}'
    server.next_scenario(Scenario("tool_call", usage=(30, 20), tool_calls=(
        ("get_weather", weather), ("set_volume", '{"level": 3}'))))

    events, error = answer(server, turn())

    assert error is None
    assert events == [ToolCall("call_fake0", "get_weather", weather),
                      ToolCall("call_fake1", "set_volume", '{"level": 3}'),
                      ProviderUsage(30, 20)]


@pytest.mark.parametrize("speak", [False, True])
def test_closing_the_stream_closes_the_upstream_connection(
        server: FakeOpenAI, speak: bool) -> None:
    server.next_scenario(hold_after=2)  # the server would wait forever for release()

    def server_saw_the_hang_up() -> None:
        [chat] = server.requests_to("/chat/completions")
        connection = next(c for c in server.connections if c.id == chat.connection)
        assert connection.closed.wait(5)
        assert connection.closed_by == "client" and not chat.completed.is_set()

    async def abort() -> list[ProviderEvent]:
        provider = OpenAIProvider(settings(server))
        events = provider.stream(turn(speak=speak))
        try:
            received = [await anext(events), await anext(events)]
            await events.aclose()
            # Still inside the provider's life: closing its pool would hang up anyway.
            await asyncio.to_thread(server_saw_the_hang_up)
            return received
        finally:
            await provider.close()

    assert run(abort()) == [TextDelta("Hello"), TextDelta(" there")]


def answer_with_failover(server: FakeOpenAI
                         ) -> tuple[list[ProviderEvent], ProviderError | None]:
    """Ask a new failover provider whose primary and secondary are both ``server``, told
    apart by their model."""
    async def ask() -> tuple[list[ProviderEvent], ProviderError | None]:
        provider = FailoverProvider(OpenAIProvider(settings(server, model="primary")),
                                    OpenAIProvider(settings(server, model="secondary")))
        try:
            return await collect(provider.stream(turn()))
        finally:
            await provider.close()

    return run(ask())


def test_failover_answers_from_the_secondary_when_the_primary_fails_first(
        server: FakeOpenAI) -> None:
    server.next_scenario("500")

    events, error = answer_with_failover(server)

    assert error is None and text_of(events) == DEFAULT_ANSWER
    assert [r.json["model"] for r in server.requests_to("/chat/completions")] == [
        "primary", "secondary"]


def test_failover_passes_an_error_after_the_first_event_through(server: FakeOpenAI) -> None:
    server.next_scenario("cut")

    events, error = answer_with_failover(server)

    assert text_of(events) == "Hello there."
    assert error is not None and error.code == "provider_error" and not error.before_first_token
    assert [r.json["model"] for r in server.requests_to("/chat/completions")] == ["primary"]


@pytest.mark.parametrize(("pieces", "sentences"), [
    (["Hello", " there", ".", " How", " are", " you", "?"], ["Hello there.", "How are you?"]),
    (["Pi is 3", ".14 and", " example.com is", " a site. ", "Ok"],
     ["Pi is 3.14 and example.com is a site.", "Ok"]),
    (["你好。", "今天", "天气很好！", "是吗？"], ["你好。", "今天天气很好！", "是吗？"]),  # noqa: RUF001
    (["He said \"go.\" Then", " left\n", "\n", "- ", "done"],
     ["He said \"go.\"", "Then left", "- done"]),
])
def test_sentences_are_cut_as_text_streams(pieces: list[str], sentences: list[str]) -> None:
    splitter = _Sentences()

    cut = [sentence for piece in pieces for sentence in splitter.feed(piece)]

    assert cut + splitter.flush() == sentences
