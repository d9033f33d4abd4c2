"""Audio decoding (WAV, FLAC, OGG/Vorbis, OGG/Opus, MP3), mono downmix, resampling to 16 kHz, and log-mel
features equal to transformers' Qwen3ASRFeatureExtractor; corrupt input gives a clear AudioError."""
from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from asr_checkpoints import hf_features, speechlike, tone, wav_bytes
from qwenstack.audio.decode import AudioError, AudioLimits, decode_audio, from_samples, pcm16_to_float
from qwenstack.audio.features import MelSettings, log_mel, num_frames


def _features_match(samples: np.ndarray) -> None:
    want, mask = hf_features(samples)
    got = log_mel(samples)
    frames = got.shape[1]
    assert frames == num_frames(len(samples)) == int(mask.sum())
    assert mask[0, :frames].all() and not mask[0, frames:].any()  # the extractor's mask: valid frames first
    torch.testing.assert_close(got, want[0, :, :frames], atol=1e-4, rtol=0)
    assert not want[0, :, frames:].any()  # its chunk padding is zeros, which is what our encoder pads with


@pytest.mark.parametrize("n", [1, 159, 7999, 8000, 8001, 16161, 48007, 160 * 333 + 17])
def test_log_mel_equals_transformers_odd_lengths(n: int) -> None:
    _features_match(speechlike(n / 16000, seed=n)[:n] if n > 16 else np.full(n, 0.1, np.float32))


# Qwen3-Omni's preprocessor_config.json as released: Whisper's extractor, no min_length.
OMNI_PREPROCESSOR = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
                     "hop_length": 160, "n_fft": 400, "chunk_length": 300, "n_samples": 4800000,
                     "nb_max_frames": 30000, "padding_value": 0.0, "dither": 0.0, "return_attention_mask": True}


@pytest.mark.parametrize("n", [201, 3201, 7999, 8001])
def test_omni_short_clip_features_equal_whisper_extractor(n: int) -> None:
    """Qwen3-Omni's processor runs WhisperFeatureExtractor (padding=True): a clip under 0.5 s is not padded to
    0.5 s as Qwen3-ASR's is, so it has fewer frames (and audio tokens) than a padded one."""
    from transformers import WhisperFeatureExtractor

    samples = speechlike(n / 16000, seed=n)[:n]
    extractor = WhisperFeatureExtractor(**OMNI_PREPROCESSOR)
    want = extractor([samples], sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                     return_tensors="pt")
    settings = MelSettings.from_config(OMNI_PREPROCESSOR)
    got = log_mel(samples, settings)
    assert got.shape[1] == num_frames(n, settings) == int(want["attention_mask"].sum()) == n // 160
    torch.testing.assert_close(got, want["input_features"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [1, 159, 200])
def test_omni_clip_too_short_for_the_stft_still_has_a_frame(n: int) -> None:
    """Under n_fft // 2 samples transformers' extractor raises (reflect padding); we pad to one frame."""
    settings = MelSettings.from_config(OMNI_PREPROCESSOR)
    assert log_mel(np.full(n, 0.1, np.float32), settings).shape == (128, 1) and num_frames(n, settings) == 1


def test_log_mel_silence_clipping_and_loud() -> None:
    _features_match(np.zeros(12345, np.float32))
    clipped = np.clip(tone(1.3, 300.0, amplitude=3.0), -1.0, 1.0)
    _features_match(clipped)
    _features_match(speechlike(2.0) * 40.0)


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", None), ("OGG", "VORBIS"),
                                         ("OGG", "OPUS"), ("MP3", "MPEG_LAYER_III")])
def test_decode_formats_resample_and_downmix(fmt: str, subtype: str | None) -> None:
    rate = 48000 if subtype == "OPUS" else 44100
    t = np.arange(int(1.5 * rate)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, left * 0.5], axis=1).astype(np.float32)
    audio = decode_audio(wav_bytes(stereo, rate, fmt, subtype))
    assert audio.sample_rate == 16000 and audio.source_rate == rate and audio.source_channels == 2
    assert abs(audio.seconds - 1.5) < 0.1  # lossy codecs add a little priming/padding
    want = 0.75 * 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(audio.samples)) / 16000)
    # the 440 Hz tone survives: its spectrum peak, and its amplitude (the mean of both channels)
    spectrum = np.abs(np.fft.rfft(audio.samples))
    assert abs(np.argmax(spectrum) * 16000 / len(audio.samples) - 440) < 3
    assert abs(np.sqrt(np.mean(audio.samples[4000:-4000] ** 2)) - np.sqrt(np.mean(want ** 2))) < 0.02


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox is installed by scripts/test.sh")
def test_decode_sox_made_file(tmp_path: Path) -> None:
    out = tmp_path / "tone.flac"
    subprocess.run(["sox", "-n", "-r", "22050", "-c", "1", str(out), "synth", "0.8", "sine", "1000"], check=True)
    audio = decode_audio(out.read_bytes())
    assert audio.source_rate == 22050 and abs(audio.seconds - 0.8) < 1e-3


def test_corrupt_and_limits() -> None:
    with pytest.raises(AudioError, match="not audio"):
        decode_audio(b"this is plain text, not a sound file" * 10)
    with pytest.raises(AudioError, match="not audio"):
        decode_audio(wav_bytes(tone(0.5))[:30])  # a truncated header
    with pytest.raises(AudioError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="over the limit of 100"):
        decode_audio(wav_bytes(tone(0.5)), AudioLimits(max_bytes=100))
    with pytest.raises(AudioError, match="over the limit of 1 s"):
        decode_audio(wav_bytes(tone(1.5)), AudioLimits(max_seconds=1.0))
    with pytest.raises(AudioError, match="no samples"):
        from_samples(np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="not finite"):
        from_samples(np.array([0.0, np.nan], np.float32), 16000)
    # A float file may hold any float: an int16 range written as float is taken (its features are finite), but
    # samples loud enough to overflow the power spectrum are refused rather than turned into NaN features.
    loud = from_samples(tone(0.5) * 30000, 16000)
    assert torch.isfinite(log_mel(loud.samples)).all()
    with pytest.raises(AudioError, match="samples reach 5e\\+19: too loud"):
        from_samples(tone(0.5) * 1e20, 16000)
    float_wav = io.BytesIO()
    soundfile.write(float_wav, tone(0.5) * 1e20, 16000, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="samples reach 5e\\+19: too loud"):
        decode_audio(float_wav.getvalue())
    with pytest.raises(AudioError, match="even number"):
        pcm16_to_float(b"\x00\x01\x02")
    assert np.allclose(pcm16_to_float(np.array([16384, -32768], "<i2").tobytes()), [0.5, -1.0])


def test_many_frame_webm_decodes_in_linear_time() -> None:
    """A browser recording goes through PyAV frame by frame. The seconds limit summed every chunk so far at each
    frame: quadratic, so a 10-minute WebM/Opus (30000 frames of 20 ms) took minutes, holding a worker thread.
    Here 30 s of 2.5 ms Opus frames (12000 of them): well under a second now, over 10 s before."""
    import time

    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono", options={"frame_duration": "2.5"})
        samples = tone(30.0, rate=48000)
        frame = av.AudioFrame.from_ndarray(samples[None], format="flt", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    start = time.monotonic()
    audio = decode_audio(buffer.getvalue())
    assert abs(audio.seconds - 30.0) < 0.1 and time.monotonic() - start < 5.0


def test_wav_whose_header_was_never_finished_decodes_to_its_end() -> None:
    """A streaming WAV writer (a recorder piping to a socket) leaves the RIFF and data sizes at 0. libsndfile
    reads no frames from it and the upload was refused as empty; FFmpeg (OpenAI's decoder) reads to the end."""
    import struct

    data = bytearray(wav_bytes(tone(1.5)))
    at = data.find(b"data")
    data[4:8] = data[at + 4:at + 8] = struct.pack("<I", 0)
    audio = decode_audio(bytes(data))
    assert audio.seconds == 1.5
    np.testing.assert_allclose(audio.samples, decode_audio(wav_bytes(tone(1.5))).samples, atol=1e-4)
    with pytest.raises(AudioError, match="no samples"):  # a header and nothing else is still empty
        decode_audio(bytes(data[:at + 8]))


def test_cut_off_flac_decodes_up_to_the_cut() -> None:
    """An upload cut short ends in half a FLAC frame: libsndfile and FFmpeg's decoder reject that frame, and the
    whole file was a 400; the ffmpeg command line (OpenAI's decoder) skips it and keeps what came before."""
    data = wav_bytes(tone(2.0, rate=44100) * 0.5 + 0.01 * np.random.default_rng(0).standard_normal(88200),
                     44100, "FLAC")
    audio = decode_audio(data[:len(data) // 2])
    assert 0.5 < audio.seconds < 1.5 and audio.source_rate == 44100
    with pytest.raises(AudioError, match="not audio"):  # a file with nothing decodable is still refused
        decode_audio(data[:200])


@pytest.mark.parametrize("layout", ["preprocessor_config.json", "processor_config.json"])
def test_feature_extractor_settings_in_either_file(tmp_path: Path, layout: str) -> None:
    """transformers 5's processor.save_pretrained writes the extractor's settings nested in processor_config.json
    (and no preprocessor_config.json): both layouts configure the features alike."""
    import json

    body = OMNI_PREPROCESSOR if layout == "preprocessor_config.json" else {"feature_extractor": OMNI_PREPROCESSOR}
    (tmp_path / layout).write_text(json.dumps(body))
    settings = MelSettings.from_dir(tmp_path)
    assert settings == MelSettings.from_config(OMNI_PREPROCESSOR) and settings.min_length == 0
    assert MelSettings.from_dir(tmp_path / "elsewhere") == MelSettings()  # none: Qwen3-ASR's defaults
