"""Whisper 80-bin log-mel features in numpy, as the official MiniCPM-o processor computes them.

The official `MiniCPMOProcessor.audio_feature_extract` splits audio longer than 30 s into 30-s pieces, calls
transformers' `WhisperFeatureExtractor(padding="max_length", return_attention_mask=True)` on the pieces, and keeps
the first `attention_mask.sum()` = ceil(n / 160) frames of each. The extractor zero-pads every piece to 30 s
*before* the STFT, so the "max - 8" clamp sees the padded window (padding frames are log10(1e-10) = -10, which
only matters for near-silent input). Per piece:

    centred STFT (reflect pad 200, Hann 400 periodic, hop 160) -> |X|^2 -> drop the last of the 3001 frames
    -> Slaney mel (80 x 201) -> log10(max(., 1e-10)) -> max(., max - 8) -> (x + 4) / 4

Only the frames that touch the signal are transformed (a frame whose 400-sample window lies wholly in the
zero padding is exactly -10); the result equals the full 30-s computation. Computed in float64, returned as
float32 (transformers' torch path computes in float32; the two agree to ~1e-6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import InvalidInputError

# preprocessor_config.json of openbmb/MiniCPM-o-2_6 (WhisperFeatureExtractor settings).
SAMPLE_RATE = AUDIO_SAMPLE_RATE
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_SECONDS = 30  # `chunk_length`: every piece is padded to this, and longer audio is split at it
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 (`nb_max_frames`)

# transformers WhisperFeatureExtractor / audio_utils constants.
MEL_FLOOR = 1e-10  # clamp before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the maximum ("max - 8")
LOG_OFFSET = 4.0  # (x + 4) / 4
LOG_SCALE = 4.0

# Slaney mel scale (librosa / transformers `mel_scale="slaney"`): linear to 1 kHz, logarithmic above.
_SLANEY_F_SP = 200.0 / 3.0
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP  # 15
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    lin = f / _SLANEY_F_SP
    log = _SLANEY_MIN_LOG_MEL + np.log(np.maximum(f, _SLANEY_MIN_LOG_HZ) / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP
    return np.where(f >= _SLANEY_MIN_LOG_HZ, log, lin)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    lin = m * _SLANEY_F_SP
    log = _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (np.maximum(m, _SLANEY_MIN_LOG_MEL) - _SLANEY_MIN_LOG_MEL))
    return np.where(m >= _SLANEY_MIN_LOG_MEL, log, lin)


def mel_filter_bank(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                    f_min: float = 0.0, f_max: float | None = None) -> np.ndarray:
    """(n_freqs, n_mels) triangular Slaney-normalised filters (area ~ 1 per filter), float64.

    Triangles have corners at n_mels + 2 points equally spaced on the Slaney mel scale; each filter is
    scaled by 2 / (upper - lower corner in Hz), as librosa `norm="slaney"` and transformers' `mel_filter_bank`.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_freqs)
    corners = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))
    widths = np.diff(corners)
    offsets = corners[None, :] - fft_freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (corners[2:] - corners[:-2]))[None, :]


@dataclass(frozen=True)
class LogMelExtractor:
    """Whisper log-mel for one piece of at most 30 s. `filters` (201, 80) and `window` are computed once."""

    filters: np.ndarray
    window: np.ndarray

    @classmethod
    def create(cls) -> "LogMelExtractor":
        n = np.arange(N_FFT, dtype=np.float64)
        hann_periodic = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)
        return cls(mel_filter_bank(), hann_periodic)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        """float32 (80, ceil(n / 160)) log-mel of a 1-D 16-kHz piece with 1 <= n <= 480000 samples."""
        wave = np.asarray(wave)
        if wave.ndim != 1 or not 0 < wave.shape[0] <= N_SAMPLES:
            raise InvalidInputError(f"expected a 1-D piece of 1..{N_SAMPLES} samples, got shape {wave.shape}; "
                             "use `log_mel_pieces` for longer audio")
        n = wave.shape[0]
        n_keep = -(-n // HOP_LENGTH)
        # Frame t covers padded samples [t*hop, t*hop + n_fft) = original [t*hop - 200, t*hop + 200).
        n_touch = min(N_FRAMES, -(-(n + N_FFT // 2) // HOP_LENGTH))
        padded = np.zeros(N_SAMPLES, dtype=np.float64)
        padded[:n] = wave
        half = N_FFT // 2
        need = (n_touch - 1) * HOP_LENGTH + N_FFT
        ext = np.pad(padded, half, mode="reflect")[:need]
        frames = np.lib.stride_tricks.sliding_window_view(ext, N_FFT)[::HOP_LENGTH][:n_touch]
        power = np.abs(np.fft.rfft(frames * self.window, axis=1)) ** 2  # (n_touch, 201)
        log_spec = np.log10(np.maximum(power @ self.filters, MEL_FLOOR)).T  # (80, n_touch)
        peak = log_spec.max()
        if n_touch < N_FRAMES:  # frames wholly inside the 30-s zero padding are log10(MEL_FLOOR)
            peak = max(peak, math.log10(MEL_FLOOR))
        log_spec = np.maximum(log_spec[:, :n_keep], peak - DYNAMIC_RANGE)
        return ((log_spec + LOG_OFFSET) / LOG_SCALE).astype(np.float32)


def split_pieces(wave: np.ndarray) -> list[np.ndarray]:
    """Cut audio longer than 30 s into 30-s pieces (the last one shorter), as the official processor does."""
    n = wave.shape[0]
    if n <= N_SAMPLES:
        return [wave]
    return [wave[i * N_SAMPLES:(i + 1) * N_SAMPLES] for i in range(-(-n // N_SAMPLES))]


def log_mel_pieces(wave: np.ndarray, extractor: LogMelExtractor | None = None) -> list[np.ndarray]:
    """Log-mel of each 30-s piece of `wave` (1-D float, 16 kHz): a list of (80, frames) float32 arrays."""
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise InvalidInputError(f"expected non-empty 1-D 16-kHz audio, got shape {wave.shape}; load it with "
                         "edge.io.audio.load_audio")
    extractor = extractor or LogMelExtractor.create()
    return [extractor(p) for p in split_pieces(wave)]


def n_mel_frames(n_samples: int) -> int:
    """Frames kept for n samples: the processor's attention-mask length ceil(n / 160)."""
    return -(-n_samples // HOP_LENGTH)
