"""Audio input: decode a file / bytes / array to float32 mono at 16 kHz, the only format Whisper accepts.

Decoding goes through soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, and MP3 with libsndfile >= 1.1).
Channels are averaged to mono. Other sample rates go through `resample`, a polyphase windowed-sinc resampler
(Kaiser window, beta 5, 10 zero crossings per side of the slower rate: the same design as
`scipy.signal.resample_poly`'s default, written in numpy because the runtime does not depend on scipy).

Policy for odd input (each raises `InvalidInputError` naming the fix, except where noted):
- empty audio (no samples) or an undecodable file (e.g. a text file renamed .wav): error;
- NaN or +-inf samples: error (they would turn every mel frame into NaN; silently zeroing them would hide a
  broken recording);
- samples beyond [-1, 1] (clipped or hot float files): kept as they are, since Whisper's log-mel has no
  amplitude limit and the official processor does not clip either;
- integer arrays are scaled to [-1, 1) by their type's full scale (int16 / 32768, uint8 (x - 128) / 128, ...).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import CancelledError, InputLimitError, InvalidInputError

# Whisper's input rate (preprocessor_config.json `sampling_rate`).
SAMPLE_RATE = AUDIO_SAMPLE_RATE

# Resampler design (scipy.signal.resample_poly defaults): Kaiser beta and zero crossings per side.
KAISER_BETA = 5.0
ZERO_CROSSINGS = 10
# Output samples computed per block, bounding the temporary (block x taps) gather matrix.
_RESAMPLE_BLOCK = 1 << 16
# A (channels, frames) array is recognised when it has at most this many rows and more columns than rows.
_MAX_CHANNELS_FIRST = 8



@dataclass(frozen=True)
class ResampleFilter:
    """Polyphase form of the anti-aliasing low-pass for one up/down ratio.

    Attributes:
        up, down: reduced ratio (out_rate / in_rate = up / down).
        half_len: half length of the prototype filter, in upsampled samples.
        phases: (up, taps) array; row r holds prototype taps r, r + up, r + 2 up, ...
    """

    up: int
    down: int
    half_len: int
    phases: np.ndarray

    @classmethod
    def design(cls, in_rate: int, out_rate: int) -> "ResampleFilter":
        g = math.gcd(in_rate, out_rate)
        up, down = out_rate // g, in_rate // g
        max_rate = max(up, down)
        half_len = ZERO_CROSSINGS * max_rate
        n = np.arange(2 * half_len + 1, dtype=np.float64) - half_len
        cutoff = 1.0 / max_rate  # fraction of the upsampled Nyquist frequency
        h = cutoff * np.sinc(cutoff * n) * np.kaiser(2 * half_len + 1, KAISER_BETA)
        h *= up / h.sum()  # unit DC gain after zero-stuffing by `up`
        taps = -(-h.size // up)
        padded = np.zeros(taps * up)
        padded[: h.size] = h
        return cls(up, down, half_len, padded.reshape(taps, up).T.copy())


def resample(x: np.ndarray, in_rate: int, out_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a 1-D signal by the rational factor out_rate / in_rate; returns float32.

    Output sample m is the zero-stuffed input filtered by the centred prototype h at upsampled position
    m * down: y[m] = sum_i x[i] h[m * down + half_len - i * up]; only every up-th tap meets a nonzero input, so
    each output needs `taps` multiply-adds (the polyphase trick). Zero padding at both ends, output length
    ceil(n * up / down), as scipy's resample_poly.
    """
    x = np.asarray(x, dtype=np.float64)
    if in_rate == out_rate:
        return x.astype(np.float32)
    if in_rate <= 0 or out_rate <= 0:
        raise InvalidInputError(f"sample rates must be positive, got {in_rate} -> {out_rate}.")
    f = ResampleFilter.design(int(in_rate), int(out_rate))
    n_in = x.shape[0]
    n_out = -(-n_in * f.up // f.down)
    taps = f.phases.shape[1]
    # Input index for tap j of output m is base[m] - j with base[m] = (m * down + half_len) // up; pad so every
    # index lands inside the array.
    last_base = ((n_out - 1) * f.down + f.half_len) // f.up if n_out else 0
    left = taps
    xp = np.concatenate([np.zeros(left), x, np.zeros(max(0, last_base + 1 - n_in))])
    j = np.arange(taps, dtype=np.int64)
    out = np.empty(n_out, dtype=np.float64)
    for s in range(0, n_out, _RESAMPLE_BLOCK):
        centre = np.arange(s, min(n_out, s + _RESAMPLE_BLOCK), dtype=np.int64) * f.down + f.half_len
        idx = (centre // f.up)[:, None] - j[None, :] + left
        out[s:s + centre.size] = np.einsum("mj,mj->m", xp[idx], f.phases[centre % f.up])
    return out.astype(np.float32)


def _to_float(a: np.ndarray) -> np.ndarray:
    """Integer PCM to float in [-1, 1); floats as float64."""
    if a.dtype == np.uint8:
        return (a.astype(np.float64) - 128.0) / 128.0
    if np.issubdtype(a.dtype, np.signedinteger):
        return a.astype(np.float64) / float(-np.iinfo(a.dtype).min)
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float64, copy=False)
    raise InvalidInputError(f"audio array has dtype {a.dtype}; pass float, signed integer or uint8 PCM samples.")


def _mono(a: np.ndarray, what: str) -> np.ndarray:
    """Average channels. 2-D arrays are (frames, channels) as soundfile returns them; a (channels, frames)
    array (torchaudio / librosa layout) is recognised by having <= 8 rows and more columns than rows."""
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise InvalidInputError(f"{what} has shape {a.shape}; pass a 1-D (frames,) or 2-D (frames, channels) array.")
    if a.shape[0] <= _MAX_CHANNELS_FIRST and a.shape[1] > a.shape[0]:
        a = a.T
    return a.mean(axis=1)


# Files are decoded in blocks of this many frames (about 4 s at 48 kHz): a duration limit stops the decoding at
# the limit even when the header under-states the length, and channels are averaged block by block.
DECODE_BLOCK_FRAMES = 1 << 18
# libsndfile reports SF_COUNT_MAX (2^63 - 1) frames when the header does not say (e.g. a FLAC stream with
# total_samples = 0); anything this large is "unknown", never a length (2^62 frames at 384 kHz is 380 kyears).
_UNKNOWN_FRAMES = 1 << 62


@dataclass(frozen=True)
class AudioInfo:
    """What the container header says, read without decoding (seconds None: the header does not say)."""

    seconds: float | None
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class AudioLimits:
    """Attributes:
    max_seconds: refuse longer audio (from the header before decoding, and again while decoding).
    should_stop: polled between decoded blocks; True stops the decoding with `CancelledError`.
    """

    max_seconds: float | None = None
    should_stop: Callable[[], bool] | None = None


def _handle(src: str | Path | bytes):
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise InvalidInputError(f"audio file {path} does not exist.")
        if path.stat().st_size == 0:
            raise InvalidInputError(f"audio file {path} is empty (0 bytes); record or export it again.")
        return str(path)
    if len(src) == 0:
        raise InvalidInputError("audio bytes are empty; pass the content of a WAV/FLAC/OGG/MP3 file.")
    return io.BytesIO(src)


def _undecodable(what: str, e: Exception) -> InvalidInputError:
    import soundfile as sf

    return InvalidInputError(
        f"cannot decode {what} as audio ({e}). Supported: WAV, FLAC, OGG/Vorbis/Opus and MP3 "
        f"(libsndfile {sf.__libsndfile_version__}); convert other formats first, e.g. "
        "`ffmpeg -i in.m4a -ar 16000 -ac 1 out.wav`.")


def probe_audio(src: str | Path | bytes) -> AudioInfo:
    """Duration, rate and channels from the container header (nothing is decoded)."""
    import soundfile as sf

    what = f"audio file {src}" if isinstance(src, (str, Path)) else f"{len(src)} audio bytes"
    try:
        info = sf.info(_handle(src))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise _undecodable(what, e) from None
    rate = int(info.samplerate)
    known = 0 <= info.frames < _UNKNOWN_FRAMES and rate > 0
    return AudioInfo(info.frames / rate if known else None, rate, int(info.channels))


def _too_long(what: str, seconds: float, limit: float, exact: bool) -> InputLimitError:
    size = f"{seconds:.1f} s" if exact else f"longer than {limit:.0f} s"
    return InputLimitError(f"{what} is {size}; the limit is {limit:.0f} s. Send a shorter clip (cut it, e.g. "
                           f"`ffmpeg -i IN -t {limit:.0f} OUT.wav`).")


def _decode_limited(src: str | Path | bytes, what: str, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Mono float64 samples and the rate, decoded block by block within `limits`."""
    import soundfile as sf

    try:
        with sf.SoundFile(_handle(src)) as f:
            sr = int(f.samplerate)
            cap = None if limits.max_seconds is None else int(limits.max_seconds * sr)
            if cap is not None and cap < f.frames < _UNKNOWN_FRAMES:
                raise _too_long(what, f.frames / sr, limits.max_seconds, exact=True)
            blocks, n = [], 0
            for block in f.blocks(DECODE_BLOCK_FRAMES, dtype="float64", always_2d=True):
                if limits.should_stop is not None and limits.should_stop():
                    raise CancelledError(f"decoding {what} was stopped: the request was cancelled.")
                n += block.shape[0]
                if cap is not None and n > cap:  # the header under-stated the length
                    raise _too_long(what, n / sr, limits.max_seconds, exact=False)
                blocks.append(block.mean(axis=1))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise _undecodable(what, e) from None
    return (np.concatenate(blocks) if blocks else np.zeros(0)), sr


def load_audio(src: str | Path | bytes | tuple[np.ndarray, int], limits: AudioLimits | None = None) -> np.ndarray:
    """Decode `src` (a path, the bytes of a file, or `(samples, sample_rate)`) to float32 mono at 16 kHz.

    With `limits`, files are decoded block by block and refused (`InputLimitError`) as soon as they pass
    `max_seconds`, from the header when it tells, else at the block that crosses the limit."""
    if isinstance(src, tuple):
        if len(src) != 2:
            raise InvalidInputError("pass audio arrays as (samples, sample_rate).")
        arr, sr = np.asarray(src[0]), src[1]
        what = "audio array"
        if not isinstance(sr, (int, np.integer)) or sr <= 0:
            raise InvalidInputError(f"sample rate must be a positive integer in Hz, got {sr!r}.")
        data = _mono(_to_float(arr), what)
    elif isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        what = f"audio file {src}" if isinstance(src, (str, Path)) else f"{len(src)} audio bytes"
        raw = bytes(src) if not isinstance(src, (str, Path)) else src
        data, sr = _decode_limited(raw, what, limits or AudioLimits())
    else:
        raise InvalidInputError(
            f"unsupported audio input of type {type(src).__name__}; pass a path, file bytes or (samples, rate).")
    if data.size == 0:
        raise InvalidInputError(f"{what} has no samples; pass at least 20 ms of audio.")
    bad = ~np.isfinite(data)
    if bad.any():
        first = int(np.argmax(bad))
        raise InvalidInputError(
            f"{what} has {int(bad.sum())} NaN/inf sample(s) (first at {first / sr:.3f} s); fix the recording or "
            "replace them (e.g. np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)) before passing it.")
    return resample(data, int(sr), SAMPLE_RATE)
