"""Audio loading, resampling and Whisper log-mel against the golden fixture, transformers and scipy.

Tolerances: mel 1e-4 absolute (golden README; transformers computes in float32, we in float64).
Resampler vs scipy.signal.resample_poly (same Kaiser-sinc design, float64 both): 1e-6 absolute.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from edge.audio_encoder import audio_placeholder, chunk_token_counts, pooled_tokens
from edge.audio_features import N_FRAMES, N_SAMPLES, LogMelExtractor, log_mel_pieces, mel_filter_bank, n_mel_frames
from edge.errors import InvalidInputError
from edge.io.audio import SAMPLE_RATE, load_audio, resample
from edge.keys import AUDIO_END, AUDIO_START, UNK

MEL_ATOL = 1e-4
RESAMPLE_ATOL = 1e-6
SR = SAMPLE_RATE


@pytest.fixture(scope="module")
def hf_extractor():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=SR, hop_length=160,
                                                chunk_length=30, n_fft=400)


@pytest.fixture(scope="module")
def extractor():
    return LogMelExtractor.create()


def official_mels(fe, wave: np.ndarray) -> list[np.ndarray]:
    """Mel pieces exactly as processing_minicpmo.audio_feature_extract calls the WhisperFeatureExtractor."""
    pieces = [wave[i:i + N_SAMPLES] for i in range(0, len(wave), N_SAMPLES)]
    out = fe(pieces, sampling_rate=SR, return_attention_mask=True, padding="max_length", return_tensors="np")
    lens = out["attention_mask"].sum(axis=1)
    return [f[:, :n] for f, n in zip(out["input_features"], lens)]


def assert_mel_parity(fe, wave: np.ndarray) -> float:
    ours = log_mel_pieces(wave)
    ref = official_mels(fe, wave)
    assert [m.shape for m in ours] == [r.shape for r in ref]
    worst = max(float(np.abs(o - r).max()) for o, r in zip(ours, ref))
    assert worst <= MEL_ATOL, worst
    return worst


# --- golden -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1])
def test_golden_mel(golden_dir, golden_ref, k):
    wave = load_audio(golden_dir / "inputs" / f"wav{k}.wav")
    (mel,) = log_mel_pieces(wave)
    ref = golden_ref[f"wav{k}_mel"]
    assert mel.shape == ref.shape
    d = float(np.abs(mel - ref).max())
    print(f"wav{k}_mel max|d| = {d:.2e}")
    assert d <= MEL_ATOL


@pytest.mark.parametrize("k", [0, 1])
def test_golden_placeholder(golden_dir, golden_ref, k):
    n = sf.info(str(golden_dir / "inputs" / f"wav{k}.wav")).frames
    golden = str(golden_ref[f"wav{k}_placeholder"])
    assert audio_placeholder(n, chunked=True) == golden
    # Non-chunked (chunk_input=False): one start/end pair around the same number of <unk> (spec §2.3).
    assert audio_placeholder(n, chunked=False) == AUDIO_START + UNK * golden.count(UNK) + AUDIO_END


# --- filterbank and transformers parity ------------------------------------------------------------------------

def test_mel_filter_bank_matches_transformers(hf_extractor):
    ours = mel_filter_bank()
    assert ours.shape == hf_extractor.mel_filters.shape == (201, 80)
    assert np.abs(ours - hf_extractor.mel_filters).max() <= 1e-12 * np.abs(hf_extractor.mel_filters).max()


def _tone(seconds: float, hz: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


SIGNALS = {
    "silence": lambda rng: np.zeros(2 * SR, np.float32),
    "tone": lambda rng: _tone(2.0, 1000.0),
    "clipping_noise": lambda rng: np.clip(3.0 * rng.standard_normal(2 * SR), -1, 1).astype(np.float32),
    "short_0.3s": lambda rng: (0.3 * rng.standard_normal(int(0.3 * SR))).astype(np.float32),
    "long_45s": lambda rng: (_tone(45.0, 300.0, 0.3) + 0.01 * rng.standard_normal(45 * SR)).astype(np.float32),
    "odd_length": lambda rng: (0.2 * rng.standard_normal(SR + 37)).astype(np.float32),
}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_mel_matches_transformers(hf_extractor, name):
    wave = SIGNALS[name](np.random.default_rng(0))
    worst = assert_mel_parity(hf_extractor, wave)
    print(f"{name}: max|d| = {worst:.2e}")


def test_long_audio_split_in_30s_pieces(extractor):
    wave = SIGNALS["long_45s"](np.random.default_rng(0))
    mels = log_mel_pieces(wave, extractor)
    assert [m.shape[1] for m in mels] == [N_FRAMES, n_mel_frames(15 * SR)]
    # The placeholder counts on the whole audio; the pieces' tokens must add up to it.
    assert sum(chunk_token_counts(len(wave))) == sum(pooled_tokens(m.shape[1]) for m in mels) == 45 * 25


@pytest.fixture(scope="module")
def espeak_wav(tmp_path_factory):
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng) - no synthetic speech available")
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([exe, "-w", str(path), "The quick brown fox jumps over the lazy dog."], check=True,
                   capture_output=True)
    return path


def test_speech_from_espeak(hf_extractor, espeak_wav):
    native, sr = sf.read(str(espeak_wav), dtype="float64")
    wave = load_audio(espeak_wav)
    np.testing.assert_allclose(wave, resample(native, sr), atol=0)
    worst = assert_mel_parity(hf_extractor, wave)
    print(f"espeak-ng speech ({sr} Hz, {len(native) / sr:.2f} s): max|d| = {worst:.2e}")


# --- resampling ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampler_matches_scipy_and_features_match(hf_extractor, tmp_path, rate):
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(rate)
    t = np.arange(int(2.3 * rate)) / rate
    x = 0.4 * np.sin(2 * np.pi * 700 * t) + 0.05 * rng.standard_normal(t.size)
    path = tmp_path / f"in_{rate}.wav"
    sf.write(str(path), x, rate, subtype="FLOAT")
    wave = load_audio(path)
    ref = signal.resample_poly(sf.read(str(path), dtype="float64")[0], SR, rate)
    assert wave.shape == ref.shape
    d = float(np.abs(wave - ref).max())
    print(f"{rate} Hz: resampler vs resample_poly max|d| = {d:.2e}")
    assert d <= RESAMPLE_ATOL
    assert_mel_parity(hf_extractor, wave)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampler_quality(rate):
    """Pass-band tones survive (max error 3e-3 away from the edges); tones above 8 kHz are removed (>= 40 dB)."""
    t = np.arange(2 * rate) / rate
    for hz in (440.0, 1000.0, 3000.0):
        y = resample(np.sin(2 * np.pi * hz * t), rate)
        ref = np.sin(2 * np.pi * hz * np.arange(y.size) / SR)
        assert np.abs(y - ref)[200:-200].max() < 3e-3, hz
    if rate > 2 * 10_000:
        y = resample(np.sin(2 * np.pi * 10_000.0 * t), rate)
        level_db = 20 * np.log10(np.sqrt(np.mean(y[200:-200] ** 2)) / np.sqrt(0.5))
        assert level_db < -40.0, level_db


# --- bad and edge-case inputs -------------------------------------------------------------------------------------

def test_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        load_audio(empty)
    no_frames = tmp_path / "no_frames.wav"
    sf.write(str(no_frames), np.zeros(0, np.float32), SR)
    with pytest.raises(InvalidInputError, match="no samples"):
        load_audio(no_frames)


def test_text_renamed_wav_is_rejected(tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is a text file, not audio\n" * 20)
    with pytest.raises(InvalidInputError, match="cannot decode"):
        load_audio(fake)
    with pytest.raises(InvalidInputError, match="cannot decode"):
        load_audio(fake.read_bytes())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_rejected(bad):
    x = np.zeros(SR, np.float32)
    x[1234] = bad
    with pytest.raises(InvalidInputError, match="NaN/inf"):
        load_audio((x, SR))


def test_stereo_8bit_wav(tmp_path):
    rng = np.random.default_rng(3)
    left, right = _tone(1.0, 440.0, 0.6), (0.3 * rng.uniform(-1, 1, SR)).astype(np.float32)
    path = tmp_path / "stereo_u8.wav"
    sf.write(str(path), np.stack([left, right], axis=1), SR, subtype="PCM_U8")
    assert sf.info(str(path)).subtype == "PCM_U8"
    wave = load_audio(path)
    # 8-bit quantisation step is 1/128; the mono mix must be the mean of the two channels within one step.
    np.testing.assert_allclose(wave, (left + right) / 2, atol=1.0 / 128)
    raw = sf.read(str(path), dtype="int16")[0]  # independent decode of the same bytes
    np.testing.assert_allclose(wave, raw.mean(axis=1) / 32768.0, atol=1e-7)
    assert load_audio(path.read_bytes()).tolist() == wave.tolist()


def test_integer_and_channels_first_arrays():
    rng = np.random.default_rng(5)
    x = rng.integers(-32768, 32767, size=(2, 4000), dtype=np.int16)  # (channels, frames) layout
    want = (x.astype(np.float64) / 32768.0).mean(axis=0)
    np.testing.assert_allclose(load_audio((x, SR)), want, atol=1e-7)
    np.testing.assert_allclose(load_audio((x.T.copy(), SR)), want, atol=1e-7)


def test_10ms_gives_one_frame_and_no_token(hf_extractor):
    wave = _tone(0.01)
    assert assert_mel_parity(hf_extractor, wave) <= MEL_ATOL
    (mel,) = log_mel_pieces(wave)
    assert mel.shape == (80, 1)
    assert pooled_tokens(mel.shape[1]) == 0
    assert audio_placeholder(wave.size) == ""  # the official processor emits no chunk for 0 tokens


def test_ten_minutes_split_not_dropped(tmp_path, hf_extractor):
    rng = np.random.default_rng(7)
    minutes = 10
    x = (0.1 * rng.standard_normal(minutes * 60 * SR)).astype(np.float32)
    x[-SR:] = _tone(1.0, 880.0)  # the last second must reach the features
    path = tmp_path / "ten_minutes.flac"
    sf.write(str(path), x, SR, subtype="PCM_16")
    wave = load_audio(path)
    mels = log_mel_pieces(wave)
    assert len(mels) == minutes * 2 and all(m.shape == (80, N_FRAMES) for m in mels)
    assert sum(chunk_token_counts(wave.size)) == minutes * 60 * 25
    # The last piece equals transformers' features of the last 30 s.
    ref = official_mels(hf_extractor, wave[-N_SAMPLES:])[0]
    assert np.abs(mels[-1] - ref).max() <= MEL_ATOL


def test_mp3_when_libsndfile_supports_it(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} was built without MP3")
    path = tmp_path / "tone.mp3"
    x = _tone(1.0, 440.0, 0.5)
    sf.write(str(path), x, SR, format="MP3")
    wave = load_audio(path)
    # MP3 adds encoder delay/padding; compare the spectra peak instead of samples.
    spec = np.abs(np.fft.rfft(wave[: SR // 2]))
    assert abs(np.argmax(spec) * SR / (SR // 2) - 440.0) <= 2.0
