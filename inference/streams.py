"""One request from admission to its single terminal message.

:meth:`StreamRunner.serve` admits a ``request`` or a voice turn (``listen start``), opens the
provider stream and forwards it: the first delta the moment it arrives, later ones merged
for at most ``coalesce_ms``; speech is encoded to Opus frames for ``down/audio``. Whatever
happens (stop, length, abort, budget cut, provider failure, timeout, shutdown) the stream is
settled once through the hook and the device gets exactly one ``end`` or ``error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.logging import request_id_var as request_log_id
from inference import metrics, protocol
from inference.audio import AudioError, AudioFormat, Frame, OpusDecoder, OpusEncoder, pack_frame
from inference.hook import Admission, Refused, keys
from inference.protocol import ProtocolError
from inference.providers.base import (
    ImageInput,
    ProviderError,
    ProviderRequest,
    ProviderUsage,
    Speech,
    TextDelta,
    ToolCall,
    Transcript,
)
from inference.providers.local import estimate_tokens
from inference.units import Units
from inference.usage import UsageEvent

if TYPE_CHECKING:
    from inference.broker import InferenceBroker

log = logging.getLogger(__name__)

FINISHES = ("stop", "length", "abort", "quota_exhausted", "error")
DEFAULT_UPLINK = AudioFormat("opus", 16000, 1, 60)
DEFAULT_DOWNLINK = AudioFormat("opus", 24000, 1, 60)
DEFAULT_FORMATS = (DEFAULT_UPLINK, DEFAULT_DOWNLINK)
TURN_TICK_SECONDS = 0.25
EARLY_FRAMES_MAX = 200


class VoiceTurn:
    """The audio of one voice turn, decoded as it arrives; ``stopped`` ends the listening."""

    def __init__(self, fmt: AudioFormat, max_ms: int) -> None:
        self.decoder = OpusDecoder(fmt)
        self.rate = fmt.sample_rate
        self.pcm = bytearray()
        self.next_seq = 0
        self.late = 0
        self.max_ms = max_ms
        self.stopped = asyncio.Event()
        self.error: ProtocolError | None = None
        self.last_frame_at = time.monotonic()

    def add(self, frame: Frame) -> None:
        if self.stopped.is_set():
            return
        self.last_frame_at = time.monotonic()
        if frame.seq < self.next_seq:  # a duplicate or a frame overtaken by a later one
            self.late += 1
            return
        self.next_seq = frame.seq + 1
        try:
            self.pcm += self.decoder.decode(frame.packet)
        except AudioError as exc:
            self.error = ProtocolError(exc.code, exc.message)
            self.stopped.set()
            return
        if frame.last or self.decoder.decoded_ms >= self.max_ms:
            self.stopped.set()

    def stop(self) -> None:
        self.stopped.set()

    @property
    def ms(self) -> int:
        return int(self.decoder.decoded_ms)


@dataclass(slots=True)
class Stream:
    prefix: str
    request_id: str
    kind: str
    received: float  # perf_counter() when the request arrived
    stream_id: str | None = None  # set before admission: the sweeper knows it is ours
    admission: Admission | None = None
    task: asyncio.Task[Any] | None = None
    turn: VoiceTurn | None = None
    used: Units = field(default_factory=Units)
    reason: str | None = None  # why it was cancelled
    settling: bool = False
    settled: bool = False
    early_frames: list[Frame] = field(default_factory=list)  # audio that overtook `start`
    stop_early: bool = False  # `listen stop` that overtook `start`

    def cancel(self, reason: str) -> None:
        """Once: a second abort must not interrupt the settle the first one started. Before
        admission answered there is nothing to cancel yet: the reason is noted and acted on
        as soon as the stream starts."""
        if self.reason is not None or self.settling:
            return
        self.reason = reason
        if self.turn is not None and not self.turn.stopped.is_set():
            self.turn.stop()
        if self.task is not None:
            self.task.cancel()

    def add_frame(self, frame: Frame) -> None:
        if self.turn is not None:
            self.turn.add(frame)
        elif len(self.early_frames) < EARLY_FRAMES_MAX:
            self.early_frames.append(frame)

    def stop_turn(self) -> None:
        if self.turn is not None:
            self.turn.stop()
        else:
            self.stop_early = True

    def open_turn(self, turn: VoiceTurn) -> None:
        self.turn = turn
        for frame in self.early_frames:
            turn.add(frame)
        self.early_frames.clear()
        if self.stop_early or self.reason is not None:
            turn.stop()


class BudgetCut(Exception):
    """The hook refused more budget: the stream ends with ``quota_exhausted``."""


def hello_formats(hello: protocol.Hello) -> tuple[AudioFormat, AudioFormat]:
    """The uplink and downlink audio formats a hello asks for, or a ``bad_request``. Checked
    when the hello arrives, before anything is awaited, so its error keeps its place among the
    device's messages."""
    uplink, downlink = DEFAULT_UPLINK, DEFAULT_DOWNLINK
    try:
        if hello.audio is not None:
            uplink = AudioFormat.from_dict({**DEFAULT_UPLINK.as_dict(), **hello.audio})
        wanted = hello.features.get("audio_down")
        if isinstance(wanted, dict):
            downlink = AudioFormat.from_dict({**DEFAULT_DOWNLINK.as_dict(), **wanted})
    except AudioError as exc:
        raise ProtocolError(exc.code, exc.message) from exc
    return uplink, downlink


class StreamRunner:
    def __init__(self, broker: InferenceBroker) -> None:
        self.broker = broker
        self.settings = broker.settings
        self.tag = 0

    async def serve(self, prefix: str, tenant_id: str, device_id: str,
                    message: protocol.Message, stream: Stream | None = None) -> None:
        """A hello, or a request / voice turn whose :class:`Stream` the broker registered."""
        broker = self.broker
        # Each task runs in its own context copy: log lines of this stream carry its id.
        request_log_id.set(f"{device_id[:8]}/{getattr(message, 'id', 'hello')[:12]}")
        try:
            if isinstance(message, protocol.Hello):
                await self._hello(prefix, tenant_id, device_id, message)
            elif stream is not None:
                try:
                    await self._request(tenant_id, device_id, message, stream)  # type: ignore[arg-type]
                finally:
                    self.broker.forget(device_id, stream)
        except Refused as exc:
            if exc.repeated:
                metrics.DROPPED.labels(exc.code).inc()
            else:
                broker.send_error(prefix, exc)
        except ProtocolError as exc:
            broker.send_error(prefix, exc)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis unavailable while admitting: %s", exc)
            broker.send_error(prefix, ProtocolError(
                "internal", "the platform is briefly unavailable; retry",
                request_id=getattr(message, "id", None), retry_after=1.0))
        except Exception:
            log.exception("serving %s failed", prefix)
            request_id = getattr(message, "id", None)
            broker.send_error(prefix, ProtocolError("internal", request_id=request_id))

    # --- hello ------------------------------------------------------------------------------

    async def _hello(self, prefix: str, tenant_id: str, device_id: str,
                     hello: protocol.Hello) -> None:
        from inference.broker import profile_refusal

        broker = self.broker
        profile = await broker.directory.get(tenant_id, device_id)
        refusal = profile_refusal(profile, None)
        if refusal is not None:
            raise refusal
        assert profile is not None
        uplink, downlink = hello_formats(hello)
        session = f"{broker.process_id}-{secrets.token_hex(6)}"
        await broker.redis.set(self._session_key(tenant_id, device_id),
                               protocol.dumps({"audio": uplink.as_dict(),
                                               "audio_down": downlink.as_dict()}),
                               ex=7 * 86400)
        answer = {
            "type": "hello", "version": protocol.VERSION, "session": session,
            "audio": uplink.as_dict(), "audio_down": downlink.as_dict(),
            "dedup_window_s": self.settings.dedup_seconds,
            "limits": {
                "max_request_bytes": protocol.MAX_REQUEST_BYTES,
                "max_control_bytes": protocol.MAX_CONTROL_BYTES,
                "max_text_chars": protocol.MAX_TEXT_CHARS,
                "max_images": protocol.MAX_IMAGES,
                "max_image_bytes": protocol.MAX_IMAGE_BYTES,
                "max_output_tokens": protocol.MAX_OUTPUT_TOKENS,
                "max_turn_ms": protocol.MAX_TURN_MS,
                "requests_per_minute": profile.requests_per_minute,
                "concurrent_streams": profile.concurrent_streams,
                "daily_request_cap": profile.daily_request_cap,
            },
        }
        broker.publish(prefix, protocol.DOWN, protocol.dumps(answer), qos=1)

    def _session_key(self, tenant_id: str, device_id: str) -> str:
        return f"{self.settings.prefix}:inference:{{t:{tenant_id}}}:session:{device_id}"

    async def _formats(self, tenant_id: str, device_id: str) -> tuple[AudioFormat, AudioFormat]:
        raw = await self.broker.redis.get(self._session_key(tenant_id, device_id))
        if raw is None:
            return DEFAULT_UPLINK, DEFAULT_DOWNLINK
        data = json.loads(raw)
        return AudioFormat.from_dict(data["audio"]), AudioFormat.from_dict(data["audio_down"])

    # --- requests and voice turns ----------------------------------------------------------

    async def _request(self, tenant_id: str, device_id: str,
                       message: protocol.Request | protocol.Listen, stream: Stream) -> None:
        from inference.broker import profile_refusal

        broker = self.broker
        prefix = stream.prefix
        voice = isinstance(message, protocol.Listen)
        profile = await broker.directory.get(tenant_id, device_id)
        refusal = profile_refusal(profile, message.id)
        if refusal is not None:
            raise refusal
        assert profile is not None
        images = [] if voice else message.images  # type: ignore[union-attr]
        kind = stream.kind
        text = None if voice else message.text  # type: ignore[union-attr]
        estimate = Units(input_tokens=estimate_tokens(text or "") + 85 * len(images),
                         images=len(images))
        self.tag = tag = (self.tag % 65535) + 1  # read after awaits: keep this request's own
        stream.stream_id = stream_id = f"{broker.process_id}-{secrets.token_hex(8)}"
        conversation = message.conversation
        provider = broker.providers.for_profile(profile.provider)
        admitted = time.perf_counter()
        # Memory and audio formats, when needed, are read while the admission script runs.
        history_load = broker.memory.load(tenant_id, device_id, conversation) \
            if conversation else None
        formats_load = self._formats(tenant_id, device_id) if voice or message.speak else None
        pending = [c for c in (history_load, formats_load) if c is not None]
        extras = asyncio.gather(*pending, return_exceptions=True) if pending else None
        try:
            admission = await broker.hook.admit(profile, message.id, kind, estimate,
                                                stream_id=stream_id,
                                                owner=broker.process_id)
        except BaseException:
            if extras is not None:
                extras.cancel()
                with contextlib.suppress(BaseException):
                    await extras
            raise
        results: list[Any] = list(await extras) if extras is not None else []
        loaded_history = results.pop(0) if history_load is not None else None
        loaded_formats = results.pop(0) if formats_load is not None else None
        metrics.ADMISSION_SECONDS.observe(time.perf_counter() - admitted)
        history = [] if isinstance(loaded_history, BaseException) else loaded_history or []
        uplink, downlink = (DEFAULT_FORMATS if isinstance(loaded_formats, BaseException)
                            or loaded_formats is None else loaded_formats) \
            if voice or message.speak else (None, None)
        admission.state.update(provider=provider.name, model=provider.model,
                               conversation_id=conversation)
        request_log_id.set(stream_id)
        stream.admission = admission
        stream.used = Units(input_tokens=estimate.input_tokens, images=len(images))
        stream.task = asyncio.current_task()
        metrics.IN_FLIGHT.inc()
        start: dict[str, Any] = {"type": "start", "id": message.id, "stream": stream_id,
                                 "route": broker.route, "tag": tag,
                                 "model": provider.model}
        if admission.budget is not None:
            start["budget"] = admission.budget.as_dict()
        try:
            if voice:
                assert uplink is not None
                stream.open_turn(VoiceTurn(uplink, protocol.MAX_TURN_MS))
                # Before `start`: a frame sent after it may reach another process, which
                # finds the turn's owner under this key.
                k = keys(self.settings.prefix, tenant_id)
                try:
                    await broker.redis.set(f"{k['seen']}:{device_id}:turn", stream_id,
                                           ex=protocol.MAX_TURN_MS // 1000 + 10)
                except Exception as exc:  # only forwarding needs it
                    log.warning("could not record the turn's owner: %s", exc)
                start["listening"] = True
            broker.publish(prefix, protocol.DOWN, protocol.dumps(start), qos=1)
            await self._run(stream, provider, history, message, images, text, downlink,
                            tag)
        finally:
            metrics.IN_FLIGHT.dec()

    async def _run(self, stream: Stream, provider: Any, history: list[dict[str, str]],
                   message: Any, images: list[Any], text: str | None,
                   downlink: AudioFormat | None, tag: int) -> None:
        broker = self.broker
        admission = stream.admission
        assert admission is not None
        finish = "stop"
        error: ProtocolError | None = None
        transcript: str | None = None
        answer: list[str] = []
        timing: dict[str, float | None] = {"ttft_ms": None, "first_delta_ms": None}
        reported = ProviderUsage()
        forwarder = DeltaForwarder(broker, stream, self.settings.coalesce_ms / 1000,
                                   self.settings.coalesce_bytes)
        speech = SpeechSender(broker, stream, downlink, tag) if downlink else None
        started = time.perf_counter()
        provider_started = started
        events = None
        try:
            if stream.reason is not None:  # aborted (or the device left) before `start`
                raise asyncio.CancelledError
            async with asyncio.timeout(self.settings.request_timeout):
                if stream.turn is not None:
                    await self._listen(stream, stream.turn)
                request = ProviderRequest(
                    request_id=stream.request_id, messages=history, text=text,
                    images=[ImageInput(i.mime, i.data, i.width, i.height) for i in images],
                    audio_pcm=bytes(stream.turn.pcm) if stream.turn is not None else None,
                    audio_rate=stream.turn.rate if stream.turn is not None else 16000,
                    speak=bool(message.speak), max_output_tokens=message.max_output_tokens,
                    speech_rate=downlink.sample_rate if downlink else 24000)
                provider_started = time.perf_counter()
                events = provider.stream(request)
                async for event in events:
                    if isinstance(event, TextDelta):
                        if timing["ttft_ms"] is None:
                            now = time.perf_counter()
                            timing["ttft_ms"] = (now - provider_started) * 1000
                        answer.append(event.text)
                        stream.used.output_tokens += estimate_tokens(event.text)
                        await self._extend(stream)
                        forwarder.add(event.text)
                        if timing["first_delta_ms"] is None:
                            first = time.perf_counter()
                            timing["first_delta_ms"] = (first - stream.received) * 1000
                            metrics.PLATFORM_SECONDS.observe(
                                first - stream.received - (first - provider_started))
                            metrics.PROVIDER_TTFT_SECONDS.labels(provider.name).observe(
                                first - provider_started)
                    elif isinstance(event, Transcript):
                        transcript = event.text
                        broker.publish(stream.prefix, protocol.DOWN, protocol.dumps(
                            {"type": "transcript", "id": stream.request_id,
                             "text": event.text}), qos=1)
                    elif isinstance(event, Speech) and speech is not None:
                        forwarder.flush()
                        speech.add(event)
                        stream.used.audio_out_ms = speech.sent_ms
                        await self._extend(stream)
                    elif isinstance(event, ProviderUsage):
                        reported = event
                    elif isinstance(event, ToolCall):
                        stream.used.tool_calls += 1
                if speech is not None:
                    speech.finish()
                    stream.used.audio_out_ms = speech.sent_ms
            if reported.output_tokens is not None and \
                    reported.output_tokens >= message.max_output_tokens:
                finish = "length"
        except asyncio.CancelledError:
            finish = "abort"
            if stream.reason in ("shutdown", None):
                finish, error = "error", ProtocolError(
                    "internal", "the broker is shutting down; retry", retry_after=1.0)
            elif stream.reason == "disconnect":
                finish = "abort"
        except TimeoutError:
            finish, error = "error", ProtocolError("timeout")
        except BudgetCut:
            finish = "quota_exhausted"
        except ProviderError as exc:
            finish, error = "error", ProtocolError(exc.code, exc.message,
                                                   retry_after=exc.retry_after)
        except ProtocolError as exc:
            finish, error = "error", exc
        except Exception:  # a bug must still end the stream, settled and answered
            log.exception("stream %s failed", admission.stream_id)
            finish, error = "error", ProtocolError("internal")
        finally:
            if events is not None:
                with contextlib.suppress(Exception):
                    await events.aclose()  # cancels the upstream request
        stream.settling = True
        forwarder.flush()
        if speech is not None and finish != "stop":
            speech.finish()
            stream.used.audio_out_ms = speech.sent_ms
        if reported.input_tokens is not None:
            stream.used.input_tokens = reported.input_tokens
        if reported.output_tokens is not None:
            stream.used.output_tokens = reported.output_tokens
        if finish != "error" and not stream.reason:
            # Before the terminal message: the device's next turn must find this one.
            asked = transcript or text or ""
            try:
                await broker.memory.remember(
                    admission.device.tenant_id, admission.device.device_id,
                    admission.state.get("conversation_id"), history, asked, "".join(answer),
                    admission.device.memory,
                    {"id": stream.request_id, "kind": stream.kind, "asked": asked[:2000],
                     "answer": "".join(answer)[:4000], "at": admission.admitted_at_ms})
            except Exception as exc:
                log.warning("remembering %s failed: %s", stream.request_id, exc)
        await self._settle(stream, finish, error, timing, started)

    async def _listen(self, stream: Stream, turn: VoiceTurn) -> None:
        """Until the turn stops: meter the audio as it flows (extending the budget) and end a
        turn whose device went quiet without ``listen stop``."""
        while not turn.stopped.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(turn.stopped.wait(), TURN_TICK_SECONDS)
            stream.used.audio_in_ms = turn.ms
            if not turn.stopped.is_set() and \
                    time.monotonic() - turn.last_frame_at > self.settings.turn_idle_seconds:
                raise ProtocolError("timeout", f"no audio for {self.settings.turn_idle_seconds:g}"
                                    " s and no listen stop")
            await self._extend(stream)
        stream.used.audio_in_ms = turn.ms  # also for a turn that stopped before it opened
        if turn.error is not None:
            raise turn.error

    async def _extend(self, stream: Stream) -> None:
        admission = stream.admission
        assert admission is not None
        if admission.budget is None or admission.budget.covers(stream.used):
            return
        try:
            more = await self.broker.hook.extend(admission, stream.used)
        except Refused as exc:
            raise BudgetCut() from exc
        if more is None:
            admission.budget = None
        else:
            admission.budget = more

    async def _settle(self, stream: Stream, finish: str, error: ProtocolError | None,
                      timing: dict[str, float | None], started: float) -> None:
        broker = self.broker
        admission = stream.admission
        assert admission is not None
        device = admission.device
        event = UsageEvent(
            tenant_id=device.tenant_id, device_id=device.device_id, product_id=device.product_id,
            request_id=stream.request_id, admitted_at_ms=admission.admitted_at_ms,
            settled_at_ms=int(time.time() * 1000), stream_id=admission.stream_id,
            kind=stream.kind, conversation_id=admission.state.get("conversation_id"),
            provider=admission.state.get("provider", ""), model=admission.state.get("model", ""),
            units=stream.used, credits=0, credit_split={}, rate_card_version=None,
            ttft_ms=timing["ttft_ms"], first_delta_ms=timing["first_delta_ms"],
            duration_ms=(time.perf_counter() - started) * 1000, finish=finish,
            error_code=error.code if error else None, broker=broker.process_id,
            settled_by="broker")
        attempt = 0
        while True:  # Redis may be restarting: the usage must not be lost
            try:
                settled_here = await broker.hook.settle(admission, event)
                break
            except Exception as exc:
                attempt += 1
                log.warning("settling %s failed (%s); retrying", admission.stream_id, exc)
                await asyncio.sleep(min(0.1 * attempt, 1.0))
        if not settled_here:  # a sweeper settled it meanwhile and told the device
            log.warning("stream %s was settled by a sweeper", admission.stream_id)
            stream.settled = True
            return
        stream.settled = True
        metrics.REQUESTS.labels(stream.kind, finish).inc()
        if error is not None:
            error.request_id = stream.request_id
            message: dict[str, Any] = {"type": "error", "id": stream.request_id,
                                       "code": error.code,
                       "message": error.message, "usage": event.as_public_dict()}
            if error.retry_after is not None:
                message["retry_after"] = round(error.retry_after, 3)
            metrics.ERRORS.labels(error.code).inc()
        else:
            message = {"type": "end", "id": stream.request_id, "finish": finish,
                       "usage": event.as_public_dict(),
                       "timing": {"first_delta_ms": _round(timing["first_delta_ms"]),
                                  "provider_ttft_ms": _round(timing["ttft_ms"])}}
        broker.publish(stream.prefix, protocol.DOWN, protocol.dumps(message), qos=1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class DeltaForwarder:
    """The first delta goes out at once; later ones wait at most ``window`` to be merged."""

    def __init__(self, broker: InferenceBroker, stream: Stream, window: float,
                 max_bytes: int) -> None:
        self.broker = broker
        self.stream = stream
        self.window = window
        self.max_bytes = max_bytes
        self.seq = 0
        self.pending: list[str] = []
        self.pending_bytes = 0
        self.last_sent = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, text: str) -> None:
        self.pending.append(text)
        self.pending_bytes += len(text)
        now = time.perf_counter()
        if now - self.last_sent >= self.window or self.pending_bytes >= self.max_bytes:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(
                self.window - (now - self.last_sent), self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        text = "".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        self.broker.publish(self.stream.prefix, protocol.DOWN, protocol.dumps(
            {"type": "delta", "id": self.stream.request_id, "seq": self.seq, "text": text}))
        self.seq += 1
        self.last_sent = time.perf_counter()
        metrics.DELTAS.inc()


class SpeechSender:
    """Speech PCM -> Opus frames on ``down/audio``, each with the request's tag and a seq."""

    def __init__(self, broker: InferenceBroker, stream: Stream, fmt: AudioFormat,
                 tag: int) -> None:
        from inference.audio import Resampler

        self.broker = broker
        self.stream = stream
        self.fmt = fmt
        self.tag = tag
        self.encoder = OpusEncoder(fmt)
        self.resampler: Resampler | None = None
        self.source_rate: int | None = None
        self.seq = 0
        self.frames = 0
        self.finished = False

    @property
    def sent_ms(self) -> int:
        return self.frames * self.fmt.frame_ms

    def add(self, speech: Speech) -> None:
        from inference.audio import Resampler

        pcm = speech.pcm
        if speech.rate != self.fmt.sample_rate:
            if self.resampler is None or self.source_rate != speech.rate:
                self.resampler = Resampler(speech.rate, self.fmt.sample_rate)
                self.source_rate = speech.rate
            pcm = self.resampler.process(pcm)
        self._send(self.encoder.encode(pcm))

    def finish(self) -> None:
        """The remainder, padded, and then an empty frame flagged last (decoders skip it)."""
        if self.finished:
            return
        self.finished = True
        self._send(self.encoder.flush())
        if self.frames:
            self.broker.publish(self.stream.prefix, protocol.DOWN_AUDIO,
                                pack_frame(b"", seq=self.seq, tag=self.tag, last=True))
            self.seq += 1

    def _send(self, packets: list[bytes]) -> None:
        for packet in packets:
            self.broker.publish(self.stream.prefix, protocol.DOWN_AUDIO,
                                pack_frame(packet, seq=self.seq, tag=self.tag))
            self.seq += 1
            self.frames += 1
