"""Audio in: Whisper encoder + projector + AvgPool ONNX graphs (from converters/audio_encoder.py) on log-mel.

Two ways to run, as in the official code (spec §1.6, §4.2):
- `AudioEncoder.encode(mel, chunked=True)`: a whole piece (<= 30 s) at once, with the 1-s block-causal chunk
  mask (`chat()`'s default, `chunk_length=1.0`) or full attention (`chunked=False`). = `get_audio_embedding`.
- `AudioEncoder.stream()`: 1-s chunks, one after another, with the per-layer key/value cache carried between
  calls. = `get_audio_embedding_streaming`. Each chunk's convolutions see only that chunk (zero padding at its
  borders, as in the official streaming path), so the streamed output is close to, not equal to, the
  whole-utterance chunk-masked output (max relative difference 1.5e-2 to 3.2e-2 on random mel with the
  golden checkpoint); it equals block-causal attention over per-chunk conv features (3e-7).

25 embeddings per second: 100 mel frames -> 50 after conv2 (stride 2) -> 25 after AvgPool1d(2, 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from edge import keys
from edge.audio_features import HOP_LENGTH, N_FRAMES, SAMPLE_RATE, LogMelExtractor, log_mel_pieces
from edge.bundle import Bundle
from edge.errors import CorruptModelFileError, InvalidInputError
from edge.onnx_session import OrtOptions, make_session

log = logging.getLogger("edge.audio")

# --- graph contract, shared with converters/audio_encoder.py ------------------------------------------------------
FILE_WHOLE = "audio_encoder.onnx"
FILE_STREAM = "audio_encoder_stream.onnx"
FILE_WHOLE_INT8 = "audio_encoder.int8.onnx"
FILE_STREAM_INT8 = "audio_encoder_stream.int8.onnx"
FILE_WEIGHTS = "audio_encoder.weights"  # external data of both fp32 graphs
FILE_WEIGHTS_INT8 = "audio_encoder.int8.weights"
ROLE_WHOLE = {"fp32": "whole_fp32", "int8": "whole_int8"}
ROLE_WEIGHTS = {"fp32": "weights_fp32", "int8": "weights_int8"}
ROLE_STREAM = {"fp32": "stream_fp32", "int8": "stream_int8"}
IN_MEL = "mel"
IN_MASK = "attn_mask"
OUT_HIDDEN = "apm_hidden"
OUT_EMBEDS = "audio_embeds"


def past_name(kind: str, layer: int) -> str:
    return f"past_{kind}_{layer}"


def present_name(kind: str, layer: int) -> str:
    return f"present_{kind}_{layer}"


# --- official constants ---------------------------------------------------------------------------------------
MEL_FRAMES_PER_SECOND = 100  # hop 160 at 16 kHz
CONV_STRIDE = 2  # conv2 stride: 100 mel frames -> 50 encoder positions per second
POOL_STEP = 2  # processing_minicpmo.get_audio_placeholder `pool_step = 2` (config audio_pool_step)
CHUNK_SECONDS = 1.0  # config audio_chunk_length; chat(chunk_input=True) uses 1-s chunks
# Additive mask value. exp(-1e9) is exactly 0 in float32, so this equals the official -inf mask, but a row
# that is wholly masked gives a uniform softmax instead of NaN.
MASK_NEG = -1e9
N_SAMPLES_PER_CHUNK = int(CHUNK_SECONDS * SAMPLE_RATE)


def encoder_frames(n_mel: int) -> int:
    """Positions after conv2 (kernel 3, stride 2, padding 1): `_get_feat_extract_output_lengths`."""
    return (n_mel - 1) // CONV_STRIDE + 1


def pooled_tokens(n_mel: int, pool_step: int = POOL_STEP) -> int:
    """Audio embeddings for n_mel frames (0 when fewer than 3 frames)."""
    return max(0, (encoder_frames(n_mel) - pool_step) // pool_step + 1)


def chunk_token_counts(n_samples: int, chunked: bool = True, chunk_seconds: float = CHUNK_SECONDS,
                       pool_step: int = POOL_STEP) -> list[int]:
    """`<unk>` count per placeholder chunk, computed on the whole audio's length as the official
    `get_audio_placeholder` does (not per 30-s piece): [25, 25, ..., remainder] when chunked, else [total]."""
    total = pooled_tokens(-(-n_samples // HOP_LENGTH), pool_step)
    if not chunked:
        return [total]
    per_chunk = pooled_tokens(int(chunk_seconds * MEL_FRAMES_PER_SECOND), pool_step)
    counts = [per_chunk] * (total // per_chunk)
    return counts + ([total % per_chunk] if total % per_chunk else [])


def audio_placeholder(n_samples: int, chunked: bool = True, chunk_seconds: float = CHUNK_SECONDS) -> str:
    """Prompt text for one audio of n_samples (16 kHz): `<|audio_start|>` + `<unk>` * k + `<|audio_end|>`
    per 1-s chunk when chunked (spec §2.3), one pair around all tokens otherwise. Empty for < 3 mel frames
    in chunked mode, as the official processor."""
    return "".join(keys.AUDIO_START + keys.UNK * k + keys.AUDIO_END
                   for k in chunk_token_counts(n_samples, chunked, chunk_seconds))


def piece_frames(n_samples: int) -> int:
    """Mel frames of the longest 30-s piece of an audio of n_samples (the official batch pads to this)."""
    return min(N_FRAMES, -(-n_samples // HOP_LENGTH))


def chunk_mask(n_positions: int, chunk_positions: int) -> np.ndarray:
    """(n, n) additive mask: position i sees every position of its own and all earlier chunks
    (`subsequent_chunk_mask(n, chunk, num_left_chunks=-1)`)."""
    block = np.arange(n_positions) // chunk_positions
    return np.where(block[None, :] <= block[:, None], 0.0, MASK_NEG).astype(np.float32)


@dataclass
class AudioEncoding:
    """Attributes:
    embeds: (n_tokens, llm_hidden) embeddings for the `<unk>` slots.
    hidden: (n_positions, d_model) encoder output after the final layer norm (input of the projector).
    """

    embeds: np.ndarray
    hidden: np.ndarray


@dataclass
class _StreamState:
    """Per-layer key/value cache of the streaming encoder: [k0, v0, k1, v1, ...], each (1, heads, P, head_dim)."""

    empty: list[np.ndarray]
    past: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.past = list(self.empty)

    @property
    def length(self) -> int:
        return int(self.past[0].shape[2])


class AudioStream:
    """Incremental encoder for consecutive mel chunks (up to 100 frames = 1 s each) with a KV cache.

    Reset rules (official `get_audio_embedding_streaming` / `streaming_prefill`): the cache is dropped before a
    chunk when cache length + the chunk's positions >= the position table (1500 = 30 s), so the encoder always
    sees positions inside the table; callers also `reset()` after a session's first prefill, on system or
    assistant messages and when a reply is generated.
    """

    def __init__(self, encoder: "AudioEncoder"):
        self._enc = encoder
        m = encoder.meta
        zero = np.zeros((1, m["n_heads"], 0, m["head_dim"]), dtype=np.float32)
        self._state = _StreamState([zero] * (2 * m["n_layers"]))
        self.resets = 0  # automatic resets done because the cache reached the position table's end

    @property
    def cache_length(self) -> int:
        return self._state.length

    def reset(self) -> None:
        self._state.reset()

    def step_audio(self, wave_chunk: np.ndarray) -> np.ndarray:
        """Encode up to 1 s of 16-kHz audio. Its log-mel is computed on the chunk alone (padded to 30 s), as
        the official `streaming_prefill` runs the processor on each 1-s slice it receives."""
        wave_chunk = np.asarray(wave_chunk, dtype=np.float32)
        if wave_chunk.ndim != 1 or not 0 < wave_chunk.shape[0] <= N_SAMPLES_PER_CHUNK:
            raise InvalidInputError(f"streaming chunks are 1-D with 1..{N_SAMPLES_PER_CHUNK} samples (1 s at "
                                    f"16 kHz), got shape {wave_chunk.shape}; cut the stream into 1-s slices.")
        (mel,) = log_mel_pieces(wave_chunk, self._enc._mel)
        return self.step(mel)

    def step(self, mel_chunk: np.ndarray, *, return_hidden: bool = False):
        """Encode one chunk (80, T) with 1 <= T <= 100; returns (floor(S/2), llm_hidden) embeddings
        (and the (S, d_model) encoder output if return_hidden), S = (T - 1) // 2 + 1."""
        mel = self._enc._check_mel(mel_chunk, max_frames=int(CHUNK_SECONDS * MEL_FRAMES_PER_SECOND))
        n_new = encoder_frames(mel.shape[2])
        if self._state.length + n_new >= self._enc.meta["max_positions"]:
            log.info("audio KV cache %d + %d >= %d positions: reset", self._state.length, n_new,
                     self._enc.meta["max_positions"])
            self._state.reset()
            self.resets += 1
        sess = self._enc._stream_session()
        feeds = {IN_MEL: mel}
        n_layers = self._enc.meta["n_layers"]
        names = [past_name(kind, i) for i in range(n_layers) for kind in ("key", "value")]
        feeds.update(zip(names, self._state.past))
        out = sess.run(None, feeds)
        self._state.past = out[2:]
        # AvgPool of a single position: torch refuses it (the official code would raise), onnxruntime returns
        # one row; a 1-2 frame chunk has no audio token, its position stays in the cache as a key.
        embeds = out[1][0][: pooled_tokens(mel.shape[2], self._enc.meta["pool_step"])]
        return (embeds, out[0][0]) if return_hidden else embeds


class AudioEncoder:
    """Runs the audio part of a bundle. `variant` is "fp32" or "int8" (onnxruntime dynamic quantisation)."""

    def __init__(self, bundle: Bundle, *, variant: str = "fp32", ort: OrtOptions | None = None):
        if variant not in ROLE_WHOLE:
            raise InvalidInputError(f"audio variant must be one of {sorted(ROLE_WHOLE)}, got {variant!r}.")
        self.meta = bundle.part(keys.PART_AUDIO).meta
        self.variant = variant
        self._bundle = bundle
        self._ort = ort
        bundle.file(keys.PART_AUDIO, ROLE_WEIGHTS[variant])  # clear error if the shared weights are missing
        self._whole = make_session(bundle.file(keys.PART_AUDIO, ROLE_WHOLE[variant]), ort)
        self._stream = None
        self._mel = LogMelExtractor.create()
        names = {i.name for i in self._whole.get_inputs()}
        if names != {IN_MEL, IN_MASK}:
            raise CorruptModelFileError(f"audio graph inputs are {sorted(names)}, expected {IN_MEL}, {IN_MASK}: "
                                        "the bundle was written by another converter version; convert it again.")

    @property
    def hidden_size(self) -> int:
        return int(self.meta["llm_hidden"])

    def _stream_session(self):
        if self._stream is None:
            self._stream = make_session(self._bundle.file(keys.PART_AUDIO, ROLE_STREAM[self.variant]), self._ort)
        return self._stream

    def _check_mel(self, mel: np.ndarray, max_frames: int = N_FRAMES) -> np.ndarray:
        mel = np.asarray(mel, dtype=np.float32)
        if mel.ndim == 2:
            mel = mel[None]
        if mel.ndim != 3 or mel.shape[0] != 1 or mel.shape[1] != self.meta["n_mels"]:
            raise InvalidInputError(f"mel must be ({self.meta['n_mels']}, frames), got {mel.shape}; compute it "
                                    "with edge.audio_features.log_mel_pieces.")
        if not 1 <= mel.shape[2] <= max_frames:
            raise InvalidInputError(f"mel has {mel.shape[2]} frames; pass 1..{max_frames} per call (longer "
                                    "audio: split it with log_mel_pieces / into 1-s chunks).")
        return np.ascontiguousarray(mel)

    def forward(self, mel: np.ndarray, *, chunked: bool = True, batch_frames: int | None = None) -> AudioEncoding:
        """Encoder output and embeddings of one piece (80, T), T <= 3000 frames.

        batch_frames: frame count of the longest piece in the official processor's batch (all audio pieces of
        one prompt are zero-padded to the longest). Padding changes one thing: for an odd T, the last encoder
        position's conv2 window reaches one conv1 frame computed on padding instead of the conv's own zero
        padding. Pass it to reproduce that; None = the piece alone (a single audio <= 30 s in a prompt).
        """
        mel = self._check_mel(mel)
        n_mel = mel.shape[2]
        if batch_frames is not None and batch_frames > n_mel and n_mel % 2 == 1:
            mel = np.concatenate([mel, np.zeros_like(mel[:, :, :1])], axis=2)
        n_pos = encoder_frames(mel.shape[2])
        if pooled_tokens(n_mel, self.meta["pool_step"]) == 0:
            log.warning("audio piece of %d mel frames (< 30 ms) gives no audio token; it is skipped", n_mel)
            return AudioEncoding(np.zeros((0, self.hidden_size), np.float32),
                                 np.zeros((0, self.meta["d_model"]), np.float32))
        chunk_pos = encoder_frames(int(self.meta["chunk_seconds"] * MEL_FRAMES_PER_SECOND))
        mask = chunk_mask(n_pos, chunk_pos) if chunked else np.zeros((n_pos, n_pos), np.float32)
        hidden, embeds = self._whole.run([OUT_HIDDEN, OUT_EMBEDS], {IN_MEL: mel, IN_MASK: mask[None, None]})
        return AudioEncoding(embeds[0][: pooled_tokens(n_mel, self.meta["pool_step"])], hidden[0])

    def encode(self, mel: np.ndarray, chunked: bool = True) -> np.ndarray:
        """(n_tokens, llm_hidden) embeddings of one mel piece (80, T <= 3000)."""
        return self.forward(mel, chunked=chunked).embeds

    def encode_audio(self, wave: np.ndarray, chunked: bool = True, batch_frames: int | None = None) -> np.ndarray:
        """Embeddings of a whole 16-kHz wave: split in 30-s pieces, encoded with the official batch padding
        rule, concatenated (what `get_omni_embedding` pours into the `<unk>` runs of its placeholder).

        The official processor batches the pieces of *all* audios of a prompt together; pass
        batch_frames = max(`piece_frames(len(w))` over the prompt's audios) to reproduce that exactly."""
        mels = log_mel_pieces(wave, self._mel)
        longest = max([m.shape[1] for m in mels] + [batch_frames or 0])
        parts = [self.forward(m, chunked=chunked, batch_frames=longest).embeds for m in mels]
        return np.concatenate(parts, axis=0)

    def stream(self) -> AudioStream:
        """A fresh streaming encoder (empty KV cache)."""
        return AudioStream(self)
