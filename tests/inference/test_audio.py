"""Opus frames, codec and resampling on the real libopus and libsoxr."""

from __future__ import annotations

import numpy as np
import pytest

from inference.audio import (
    FLAG_LAST,
    FRAME_HEADER_SIZE,
    MAX_FRAME_BYTES,
    AudioError,
    AudioFormat,
    OpusDecoder,
    OpusEncoder,
    Resampler,
    encode_pcm_to_frames,
    pack_frame,
    resample,
    synth_tone,
    unpack_frame,
)

VOICE = AudioFormat(sample_rate=16000, frame_ms=60)


def _dominant_hz(pcm: bytes, rate: int) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(spectrum.argmax())])


def test_tone_round_trip_decodes_the_input_duration() -> None:
    tone = synth_tone(960, 16000)  # 16 whole 60 ms packets
    packets = encode_pcm_to_frames(tone, VOICE)
    decoder = OpusDecoder(VOICE)

    pcm = b"".join(decoder.decode(packet) for packet in packets)

    assert len(packets) == 16
    assert decoder.decoded_ms == 960
    assert len(pcm) == len(tone)
    assert abs(_dominant_hz(pcm, 16000) - 440) < 5


def test_decoded_ms_counts_samples_not_packets() -> None:
    short = AudioFormat(sample_rate=16000, frame_ms=20)
    packets = encode_pcm_to_frames(synth_tone(100, 16000), short)
    decoder = OpusDecoder(VOICE)  # announced 60 ms, the device sends 20 ms packets

    for packet in packets:
        decoder.decode(packet)

    assert decoder.decoded_ms == 100


def test_encoder_buffers_chunks_and_flush_pads_the_last_packet() -> None:
    tone = synth_tone(1000, 16000)
    encoder = OpusEncoder(VOICE)

    packets = [p for i in range(0, len(tone), 1001) for p in encoder.encode(tone[i : i + 1001])]
    assert len(packets) == 16 and encoder.encoded_ms == 960  # 40 ms still pending
    packets += encoder.flush()
    assert len(packets) == 17 and encoder.encoded_ms == 1020
    assert encoder.flush() == []

    decoder = OpusDecoder(VOICE)
    for packet in packets:
        decoder.decode(packet)
    assert decoder.decoded_ms == 1020


def test_packets_fit_a_frame_at_the_highest_rate() -> None:
    fmt = AudioFormat(sample_rate=48000, frame_ms=60)
    noise = np.random.default_rng(1).integers(-32768, 32767, 48000, dtype=np.int16).tobytes()

    for seq, packet in enumerate(encode_pcm_to_frames(noise, fmt)):
        assert unpack_frame(pack_frame(packet, seq=seq)).packet == packet


def test_garbage_packet_is_bad_audio_and_the_decoder_goes_on() -> None:
    decoder = OpusDecoder(VOICE)

    with pytest.raises(AudioError) as excinfo:
        decoder.decode(b"\xff\xff\xff")
    assert excinfo.value.code == "bad_audio"

    assert decoder.decoded_ms == 0
    decoder.decode(encode_pcm_to_frames(synth_tone(60, 16000), VOICE)[0])
    assert decoder.decoded_ms == 60


def test_random_packets_decode_or_raise_bad_audio() -> None:
    rng = np.random.default_rng(7)
    decoder = OpusDecoder(VOICE)

    for size in rng.integers(1, 1500, 300):
        try:
            assert len(decoder.decode(rng.bytes(int(size)))) % 2 == 0
        except AudioError as exc:
            assert exc.code == "bad_audio"


def test_empty_packet_is_no_audio() -> None:
    decoder = OpusDecoder(VOICE)
    assert decoder.decode(b"") == b""
    assert decoder.decoded_ms == 0


def test_resample_24k_to_16k_length() -> None:
    out = resample(synth_tone(1000, 24000), 24000, 16000)
    assert len(out) == 16000 * 2
    assert abs(_dominant_hz(out, 16000) - 440) < 2


def test_resample_same_rate_is_identity() -> None:
    pcm = synth_tone(20, 16000)
    assert resample(pcm, 16000, 16000) is pcm


@pytest.mark.parametrize(("from_rate", "to_rate"), [(24000, 16000), (16000, 48000)])
def test_streaming_resampler_keeps_length_across_odd_chunks(from_rate: int, to_rate: int) -> None:
    pcm = synth_tone(1000, from_rate)
    resampler = Resampler(from_rate, to_rate)

    out = b"".join(resampler.process(pcm[i : i + 777]) for i in range(0, len(pcm), 777))
    out += resampler.flush()

    assert len(out) % 2 == 0
    assert abs(len(out) // 2 - to_rate) <= 1


def test_frame_header_round_trip() -> None:
    data = pack_frame(b"opus", seq=258, tag=7, last=True)

    assert data == b"\x01\x01\x00\x07\x00\x00\x01\x02opus"
    assert data[1] & FLAG_LAST
    frame = unpack_frame(data)
    assert (frame.version, frame.last, frame.tag, frame.seq, frame.packet) == (
        1,
        True,
        7,
        258,
        b"opus",
    )


def test_frame_defaults_and_largest_values() -> None:
    frame = unpack_frame(pack_frame(b"", seq=2**32 - 1, tag=2**16 - 1))
    assert (frame.last, frame.tag, frame.seq, frame.packet) == (False, 65535, 2**32 - 1, b"")
    assert unpack_frame(pack_frame(b"x", seq=0)).tag == 0


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x00\x00", b"\x01" * (FRAME_HEADER_SIZE - 1), b"\x02" + b"\x00" * 7 + b"opus"],
)
def test_short_header_or_unknown_version_is_bad_request(data: bytes) -> None:
    with pytest.raises(AudioError) as excinfo:
        unpack_frame(data)
    assert excinfo.value.code == "bad_request"


def test_oversize_frame_is_too_large() -> None:
    assert len(unpack_frame(pack_frame(b"\0" * (MAX_FRAME_BYTES - 8), seq=0)).packet) == 1500
    with pytest.raises(AudioError) as excinfo:
        unpack_frame(pack_frame(b"\0" * (MAX_FRAME_BYTES - 7), seq=0))
    assert excinfo.value.code == "too_large"


def test_audio_format_from_dict_and_back() -> None:
    fmt = AudioFormat.from_dict({"codec": "opus", "sample_rate": 24000, "frame_ms": 20})

    assert fmt.as_dict() == {"codec": "opus", "sample_rate": 24000, "channels": 1, "frame_ms": 20}
    assert fmt.samples_per_frame == 480
    assert AudioFormat.from_dict({}) == VOICE
    assert VOICE.samples_per_frame == 960


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"codec": "pcm"},
        {"sample_rate": 44100},
        {"sample_rate": "16000"},
        {"sample_rate": 16000.0},
        {"channels": 2},
        {"channels": True},
        {"frame_ms": 30},
        {"frame_ms": 2.5},
        {"samplerate": 16000},
    ],
)
def test_audio_format_validation(data: object) -> None:
    with pytest.raises(AudioError) as excinfo:
        AudioFormat.from_dict(data)
    assert excinfo.value.code == "bad_request"
