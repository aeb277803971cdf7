"""Audio codes -> 24 kHz waveform: DVAE decoder (ONNX) -> Vocos backbone + ISTFT-head linear (ONNX) -> ISTFT (numpy).

The ISTFT is Vocos' "same"-padding ISTFT (irfft, window, overlap-add, divide by the squared-window envelope, trim
(win - hop) / 2 on both sides), done in numpy because ONNX has no inverse STFT op. The window comes from
`assets/Vocos.pt` (`head.istft.window`), never recomputed (spec §10).

Streaming: each chunk is decoded with 4 frames of left context and blended into the previous chunk with the
official `_linear_overlap_add2_wav` (triangular weights, 2048-sample overlap); the first chunk is held back until the
second arrives (`WavStreamJoiner`).
"""

from __future__ import annotations

import numpy as np

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError
from edge.onnx_session import OrtOptions, make_session
from edge.tts.backbone import graph_path

ROLE_DVAE = "dvae"  # roles "dvae.fp32" / "dvae.int8"
ROLE_VOCOS = "vocos"
ROLE_ISTFT_WINDOW = "istft_window"  # (n_fft,) float32 .npy

DVAE_IN = "codes"  # (1, num_vq, T) int64
DVAE_OUT = "mel"  # (1, num_mel_bins, 2T) float32 log-mel
VOCOS_IN = "mel"  # (1, num_mel_bins, F)
VOCOS_OUT_REAL = "spec_real"  # (1, n_fft/2 + 1, F): mag * cos(phase)
VOCOS_OUT_IMAG = "spec_imag"  # (1, n_fft/2 + 1, F): mag * sin(phase)


def istft_same(real: np.ndarray, imag: np.ndarray, window: np.ndarray, hop: int) -> np.ndarray:
    """Vocos `ISTFT(padding="same")` of one (bins, F) spectrogram -> F * hop samples."""
    n_fft = window.shape[0]
    frames = np.fft.irfft(real.astype(np.float64) + 1j * imag.astype(np.float64), n=n_fft, axis=0)
    frames = (frames * window[:, None]).T  # (F, n_fft)
    n_frames = frames.shape[0]
    if n_fft % hop:
        raise InvalidInputError(f"n_fft {n_fft} is not a multiple of hop {hop}.")
    per = n_fft // hop
    out = np.zeros((n_frames + per - 1, hop))
    env = np.zeros_like(out)
    blocks = frames.reshape(n_frames, per, hop)
    wsq = (window.astype(np.float64) ** 2).reshape(per, hop)
    for j in range(per):
        out[j: j + n_frames] += blocks[:, j]
        env[j: j + n_frames] += wsq[j]
    pad = (n_fft - hop) // 2
    y, env = out.ravel()[pad:-pad], env.ravel()[pad:-pad]
    if not (env > 1e-11).all():
        raise InvalidInputError("ISTFT window envelope has zeros (NOLA violated): the Vocos window is corrupt.")
    return (y / env).astype(np.float32)


def overlap_add2(prev: np.ndarray, cur: np.ndarray, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """Official `_linear_overlap_add2_wav`: blend the last `overlap` samples of `prev` with the first of `cur` with
    triangular weights; return (finished prev, rest of cur)."""
    n0, n1 = prev.shape[0], cur.shape[0]
    if overlap > min(n0, n1):
        raise InvalidInputError(f"overlap {overlap} is longer than a chunk ({n0}, {n1} samples).")
    total = n0 + n1 - overlap
    weight_len = max(n0, n1) + overlap
    t = np.linspace(0.0, 1.0, weight_len + 2)[1:-1].astype(np.float32)  # torch.linspace within 1 ulp
    weight = np.float32(0.5) - np.abs(t - np.float32(0.5))
    out = np.zeros(total, np.float32)
    wsum = np.zeros(total, np.float32)
    out[:n0] += weight[-n0:] * prev
    wsum[:n0] += weight[-n0:]
    off = n0 - overlap
    out[off: off + n1] += weight[:n1] * cur
    wsum[off: off + n1] += weight[:n1]
    out /= wsum
    return out[:n0], out[n0:]


class WavStreamJoiner:
    """Overlap-adds each new chunk into the previous one (official streaming).

    Official mode (`early=False`) holds each chunk back until the next one arrives, so the first audio waits for two
    TTS calls (spec §7, pain point 3). Only the last `overlap` samples of a held chunk are ever blended with the
    next one; everything before them is final as soon as the chunk is decoded. `early=True` emits that part at
    once and the blended tail later: the concatenated stream is the official one (samples differ by float32
    rounding of `w * x / w`), and the first audio comes after the first call."""

    def __init__(self, overlap: int, *, early: bool = False):
        self.overlap = overlap
        self.early = early
        self._prev: np.ndarray | None = None
        self._sent = 0  # samples of _prev already emitted (early mode)

    def _emit_final_part(self) -> np.ndarray:
        """(early mode) The held chunk's samples that no later overlap-add touches."""
        self._sent = max(self._prev.shape[0] - self.overlap, 0)
        return self._prev[:self._sent]

    def push(self, wav: np.ndarray) -> np.ndarray | None:
        """Feed one decoded chunk (its first `overlap` samples re-decode the previous chunk's tail); returns the
        audio that is final now, or None when there is none yet (the first chunk in official mode)."""
        if self._prev is None:
            self._prev = wav
            if not self.early:
                return None
            out = self._emit_final_part()
            return out if out.size else None
        done, self._prev = overlap_add2(self._prev, wav, self.overlap)
        if not self.early:
            return done
        done = done[self._sent:]
        return np.concatenate([done, self._emit_final_part()])

    def flush(self) -> np.ndarray | None:
        """The held-back tail, unsmoothed (as the official last yield)."""
        if self._prev is None:
            return None
        out, self._prev, self._sent = self._prev[self._sent:], None, 0
        return out if out.size else None


class TtsDecoder:
    """DVAE + Vocos sessions and the ISTFT window of one bundle."""

    def __init__(self, bundle: Bundle, *, variant: str = "fp32", ort: OrtOptions | None = None):
        meta = bundle.part(keys.PART_TTS).meta
        self.num_vq = int(meta["num_vq"])
        self.num_codes = int(meta["num_audio_tokens"]) - 1  # EOS (the last id) is not a DVAE code
        self.hop = int(meta["hop_length"])
        self.sample_rate = int(meta["sample_rate"])
        self.num_mel_bins = int(meta["num_mel_bins"])
        self.dvae = make_session(graph_path(bundle, ROLE_DVAE, variant), ort)
        self.vocos = make_session(graph_path(bundle, ROLE_VOCOS, variant), ort)
        self.window = np.load(bundle.file(keys.PART_TTS, ROLE_ISTFT_WINDOW)).astype(np.float32)

    @property
    def samples_per_code(self) -> int:
        """Each code frame is 2 mel frames of `hop` samples."""
        return 2 * self.hop

    def codes_to_mel(self, codes: np.ndarray) -> np.ndarray:
        """(T, num_vq) codes -> (num_mel_bins, 2T) log-mel (`decode_to_mel_specs`)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_vq or codes.shape[0] == 0:
            raise InvalidInputError(f"codes must have shape (T>0, {self.num_vq}); got {codes.shape}.")
        if codes.min() < 0 or codes.max() >= self.num_codes:
            raise InvalidInputError(f"audio codes must be in [0, {self.num_codes}); got [{codes.min()}, "
                                    f"{codes.max()}] (drop the EOS frame before decoding).")
        feed = {DVAE_IN: np.ascontiguousarray(codes.T[None], dtype=np.int64)}
        return self.dvae.run([DVAE_OUT], feed)[0][0]

    def mel_to_wav(self, mel: np.ndarray) -> np.ndarray:
        """(num_mel_bins, F) log-mel -> (F * hop,) float32 waveform (`vocos.decode`)."""
        mel = np.asarray(mel, dtype=np.float32)
        if mel.ndim != 2 or mel.shape[0] != self.num_mel_bins or mel.shape[1] == 0:
            raise InvalidInputError(f"mel must have shape ({self.num_mel_bins}, F>0); got {mel.shape}.")
        re, im = self.vocos.run([VOCOS_OUT_REAL, VOCOS_OUT_IMAG], {VOCOS_IN: mel[None]})
        return istft_same(re[0], im[0], self.window, self.hop)

    def codes_to_wav(self, codes: np.ndarray) -> np.ndarray:
        return self.mel_to_wav(self.codes_to_mel(codes))
