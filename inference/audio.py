"""Real audio for the MQTT inference broker: the binary frame header, Opus, resampling.

Devices stream microphone audio as Opus packets behind an 8-byte header and play the answer's
speech from packets in the same framing. The broker decodes to 16-bit little-endian mono PCM
for the speech-to-text provider and encodes the text-to-speech provider's PCM for the device,
resampling where the provider's rate is not the device's. Opus is libopus through
``opuslib_next`` (ctypes over Debian's ``libopus0``); resampling is libsoxr through ``soxr``.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import opuslib_next
import opuslib_next.api.decoder
import opuslib_next.api.encoder
import soxr
from numpy.typing import NDArray

from core.errors import EnsoulError

FRAME_VERSION = 1
FLAG_LAST = 0x01
FRAME_HEADER_SIZE = 8
MAX_PACKET_BYTES = 1500  # the largest Opus packet a frame may carry; the encoder is capped to it
MAX_FRAME_BYTES = MAX_PACKET_BYTES + FRAME_HEADER_SIZE
SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
FRAME_MS = (10, 20, 40, 60)
# libopus defaults to 10; 5 about halves the encoder's CPU (~640 -> ~340 us per 60 ms frame at
# 16 kHz here) for a small loss in speech quality, and encoding is the broker's dearest audio step.
ENCODER_COMPLEXITY = 5

_HEADER = struct.Struct(">BBHI")  # version, flags, tag, seq
_SAMPLE_BYTES = 2
_MAX_PACKET_MS = 120  # the longest audio one Opus packet may carry


class AudioError(EnsoulError):
    """A frame, packet or format the broker cannot use; ``code`` is the error sent back."""

    http_status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


@dataclass(frozen=True, slots=True)
class Frame:
    version: int
    last: bool  # FLAG_LAST: the last frame of this turn (device) or answer (broker)
    tag: int  # the request's tag from its ``start`` message; 0 from a device = current turn
    seq: int  # per turn, from 0
    packet: bytes  # one Opus packet; empty on a bare end-of-turn marker


def pack_frame(packet: bytes, *, seq: int, tag: int = 0, last: bool = False) -> bytes:
    return _HEADER.pack(FRAME_VERSION, FLAG_LAST if last else 0, tag, seq) + packet


def unpack_frame(data: bytes) -> Frame:
    if len(data) > MAX_FRAME_BYTES:
        raise AudioError("too_large", f"An audio frame is at most {MAX_FRAME_BYTES} bytes.")
    if len(data) < FRAME_HEADER_SIZE:
        raise AudioError("bad_request", f"An audio frame needs a {FRAME_HEADER_SIZE}-byte header.")
    version, flags, tag, seq = _HEADER.unpack_from(data)
    if version != FRAME_VERSION:
        raise AudioError("bad_request", f"Unknown audio frame version {version}.")
    return Frame(version, bool(flags & FLAG_LAST), tag, seq, bytes(data[FRAME_HEADER_SIZE:]))


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What a device announces it sends and plays; validated on construction."""

    codec: str = "opus"
    sample_rate: int = 16000
    channels: int = 1
    frame_ms: int = 60

    def __post_init__(self) -> None:
        # ``type(...) is int``: JSON's true and 16000.0 must not pass as 1 and 16000.
        if self.codec != "opus":
            raise AudioError("bad_request", "The audio codec must be 'opus'.")
        if type(self.sample_rate) is not int or self.sample_rate not in SAMPLE_RATES:
            raise AudioError("bad_request", f"sample_rate must be one of {SAMPLE_RATES}.")
        if type(self.channels) is not int or self.channels != 1:
            raise AudioError("bad_request", "Only mono audio (channels 1) is supported.")
        if type(self.frame_ms) is not int or self.frame_ms not in FRAME_MS:
            raise AudioError("bad_request", f"frame_ms must be one of {FRAME_MS}.")

    @classmethod
    def from_dict(cls, data: Any) -> AudioFormat:
        """Missing fields take the defaults; an unknown one is refused so a typo is not ignored."""
        if not isinstance(data, dict):
            raise AudioError("bad_request", "The audio format must be an object.")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            names = ", ".join(sorted(map(str, unknown)))
            raise AudioError("bad_request", f"Unknown audio format fields: {names}.")
        return cls(**data)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


class OpusDecoder:
    """One stream's decoder: Opus packets depend on the ones before, so streams never share."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._decoder = opuslib_next.Decoder(fmt.sample_rate, fmt.channels)
        self._max_samples = fmt.sample_rate * _MAX_PACKET_MS // 1000
        self._pcm = (ctypes.c_int16 * self._max_samples)()
        self._samples = 0

    @property
    def decoded_ms(self) -> int:
        """Counted from the samples, not the packets: a packet holds 2.5 to 120 ms whatever
        frame_ms the device announced, and this is what the turn is metered on."""
        return self._samples * 1000 // self.format.sample_rate

    def decode(self, packet: bytes) -> bytes:
        if not packet:
            return b""  # a bare FLAG_LAST frame; libopus would synthesise a lost packet
        # opus_decode straight into one reused buffer: Decoder.decode() copies the samples
        # through a Python list, which costs more than libopus's decoding itself.
        count = opuslib_next.api.decoder.libopus_decode(
            self._decoder.decoder_state, packet, len(packet), self._pcm, self._max_samples, 0
        )
        if count < 0:
            reason = opuslib_next.OpusError(count)
            raise AudioError("bad_audio", f"Undecodable Opus packet: {reason}.")
        self._samples += count
        return ctypes.string_at(self._pcm, count * _SAMPLE_BYTES)


class OpusEncoder:
    """Cuts a stream of PCM chunks into whole packets of ``frame_ms``, the only size a device
    has to handle; the remainder waits for the next chunk or :meth:`flush`."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self._encoder = opuslib_next.Encoder(
            fmt.sample_rate, fmt.channels, opuslib_next.APPLICATION_VOIP
        )
        self._encoder.complexity = ENCODER_COMPLEXITY
        self._frame_bytes = fmt.samples_per_frame * _SAMPLE_BYTES
        self._pending = b""
        self._packets = 0

    @property
    def encoded_ms(self) -> int:
        """Audio sent to the device, including the silence that pads the last packet."""
        return self._packets * self.format.frame_ms

    def encode(self, pcm: bytes) -> list[bytes]:
        data = self._pending + pcm
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        step = self._frame_bytes
        return [self._encode_frame(data[i : i + step]) for i in range(0, whole, step)]

    def flush(self) -> list[bytes]:
        """Pads what is left with silence into a last packet (none when nothing is left)."""
        if not self._pending:
            return []
        frame = self._pending.ljust(self._frame_bytes, b"\0")
        self._pending = b""
        return [self._encode_frame(frame)]

    def _encode_frame(self, frame: bytes) -> bytes:
        # The class-level encode() caps the packet at the PCM's size; the API call takes the cap.
        packet: bytes = opuslib_next.api.encoder.encode(
            self._encoder.encoder_state, frame, self.format.samples_per_frame, MAX_PACKET_BYTES
        )
        self._packets += 1
        return packet


def _samples(pcm: bytes) -> NDArray[np.int16]:
    return np.frombuffer(pcm, dtype=np.int16, count=len(pcm) // _SAMPLE_BYTES)


def resample(pcm: bytes, from_rate: int, to_rate: int) -> bytes:
    """16-bit mono PCM of a whole utterance at another rate (a trailing odd byte is dropped)."""
    if from_rate == to_rate:
        return pcm
    return soxr.resample(_samples(pcm), from_rate, to_rate).tobytes()


class Resampler:
    """Resamples a stream chunk by chunk. Resampling each chunk alone would restart the filter
    at every edge (clicks, and lengths off by a sample per chunk); this keeps its state and
    carries an odd byte over, since a provider's HTTP chunks need not end on a sample."""

    def __init__(self, from_rate: int, to_rate: int) -> None:
        self._stream = (
            soxr.ResampleStream(from_rate, to_rate, 1, dtype="int16")
            if from_rate != to_rate
            else None
        )
        self._carry = b""

    def process(self, pcm: bytes, *, last: bool = False) -> bytes:
        data = self._carry + pcm
        even = len(data) - len(data) % _SAMPLE_BYTES
        self._carry = data[even:]
        if self._stream is None:
            return data[:even]
        return self._stream.resample_chunk(_samples(data), last=last).tobytes()

    def flush(self) -> bytes:
        """The samples the filter still holds; call once at the end of the stream."""
        return self.process(b"", last=True)


def synth_tone(ms: int, rate: int, freq: float = 440.0) -> bytes:
    """A half-scale sine as 16-bit mono PCM: test input and the local provider's speech."""
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * np.pi * freq * t) * 16383).astype("<i2").tobytes()


def encode_pcm_to_frames(pcm: bytes, fmt: AudioFormat) -> list[bytes]:
    """Every packet of ``pcm``, the padded last one included."""
    encoder = OpusEncoder(fmt)
    return encoder.encode(pcm) + encoder.flush()
