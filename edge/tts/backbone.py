"""TTS backbone at run time: the ConditionalChatTTS Llama decoder over onnxruntime, its KV cache, the text/code
embeddings and the streaming attention masks of the official code (the four code heads are inside the graph).

Why the cache lives here (numpy) and not inside the graph: the official streaming loop writes text chunks into the
*middle* of a pre-allocated 302-position cache (`prefill_text` at positions [begin, end)) while audio frames are
appended after it, so the cache is not append-only. The graph therefore takes the past keys/values (any length,
also 0) and returns only the new ones; this module places them.

The masks reproduce `make_streaming_chunk_mask_generation` and `_build_streaming_mask` of the official
`modeling_minicpmo.py` exactly, including the quirk that the `[Ptts]` slot (position 302, where the audio-bos
embedding is fed) is never visible (spec §10: with it visible the step logits drift to cosine ~0.986).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError, ModelFilesNotFoundError
from edge.onnx_session import OrtOptions, make_session

log = logging.getLogger("edge.tts")

# --- bundle roles and graph I/O names (written by converters/tts.py) ----------------------------------------------
ROLE_BACKBONE = "backbone"  # roles "backbone.fp32" / "backbone.int8"
ROLE_PROJECTOR = "projector"
ROLE_EMB_TEXT = "emb_text"  # (num_text_tokens, hidden) float32 .npy
ROLE_EMB_CODE = "emb_code"  # (num_vq, num_audio_tokens, hidden) float32 .npy
VARIANTS = ("fp32", "int8")

IN_EMBEDS = "inputs_embeds"  # (1, n, hidden) float32
IN_POSITIONS = "position_ids"  # (1, n) int64
IN_MASK = "attention_mask"  # (1, 1, n, past + n) float32, additive
OUT_HIDDEN = "last_hidden_state"  # (1, n, hidden), after the final RMSNorm
OUT_LOGITS = "logits"  # (1, num_vq, num_audio_tokens): the 4 weight-normed head_code of the last position
PROJ_IN = "llm_hidden"  # (1, n, llm_dim)
PROJ_OUT = "spk_emb"  # (1, n, hidden), L2-normalised


def past_names(layer: int) -> tuple[str, str]:
    """Graph inputs of one layer's past keys/values, each (1, heads, past, head_dim)."""
    return f"past_key.{layer}", f"past_value.{layer}"


def new_names(layer: int) -> tuple[str, str]:
    """Graph outputs of one layer's keys/values for the n new positions, each (1, heads, n, head_dim)."""
    return f"new_key.{layer}", f"new_value.{layer}"


# The official masks fill with torch.finfo(float32).min (not -inf), so a row is never all -inf.
MASK_MIN = float(np.finfo(np.float32).min)


def variant_role(name: str, variant: str) -> str:
    return f"{name}.{variant}"


def graph_path(bundle: Bundle, name: str, variant: str) -> Path:
    """Path of sub-graph `name` in `variant`; graphs without an int8 file (e.g. the projector) fall back to fp32."""
    if variant not in VARIANTS:
        raise InvalidInputError(f"TTS variant {variant!r} is unknown; use one of {', '.join(VARIANTS)}.")
    files = bundle.part(keys.PART_TTS).files
    role = variant_role(name, variant)
    if role not in files and variant != "fp32":
        log.info("tts: no %s file for %s, using fp32", variant, name)
        role = variant_role(name, "fp32")
    return bundle.file(keys.PART_TTS, role)


@dataclass(frozen=True)
class TtsDims:
    """The numbers of `ConditionalChatTTSConfig` the runtime needs (read from the bundle meta)."""

    hidden: int
    num_layers: int
    num_heads: int
    head_dim: int
    llm_dim: int
    num_vq: int
    num_audio_tokens: int
    num_text_tokens: int
    audio_bos_token_id: int
    spk_emb_token_id: int
    num_spk_embs: int
    use_speaker_embedding: bool
    reserved_len: int  # streaming_text_reserved_len
    text_chunk: int  # streaming_text_chunk_size
    audio_chunk: int  # streaming_audio_chunk_size

    @classmethod
    def from_meta(cls, meta: dict) -> "TtsDims":
        try:
            return cls(**{f: meta[f] for f in cls.__dataclass_fields__})
        except KeyError as e:
            raise ModelFilesNotFoundError(
                f"the bundle's tts meta lacks {e}; convert the checkpoint again with this version.") from e

    @property
    def eos_id(self) -> int:
        """The last audio code is EOS (num_code=626, eos_token=625 in the official code)."""
        return self.num_audio_tokens - 1

    @property
    def start_len(self) -> int:
        """`[Stts]` + speaker-embedding slots."""
        return 1 + self.num_spk_embs * int(self.use_speaker_embedding)

    @property
    def condition_length(self) -> int:
        """`[Stts][spk_emb]` + reserved text window + `[Ptts]` (303 with the official config)."""
        return self.start_len + self.reserved_len + 1


def build_text_mask(n_text_tokens: int, dims: TtsDims) -> np.ndarray:
    """`_build_streaming_mask`: 1 on `[Stts][spk_emb]`+text+`[Etts]` and on the last (`[Ptts]`) slot, 0 on padding.

    The official code hard-codes `1 + 1 + n + 1` (one speaker slot) for the visible prefix; kept as is."""
    m = np.zeros(dims.condition_length, dtype=np.int64)
    m[0: 1 + 1 + n_text_tokens + 1] = 1
    m[-1] = 1
    return m


def released_text(past_len: int, dims: TtsDims) -> int:
    """Text tokens the audio frame fed at cache position `past_len` may see (before the padding mask):
    `streaming_text_chunk_size` more per `streaming_audio_chunk_size` frames."""
    return min(math.ceil((past_len - dims.reserved_len) / dims.audio_chunk) * dims.text_chunk, dims.reserved_len)


def frames_determined_by(text_tokens: int, past_len: int, dims: TtsDims) -> int:
    """How many frames, fed from cache position `past_len` on, see no text beyond the first `text_tokens`: their
    codes are already fixed once those tokens are in the cache (later text is masked out for them)."""
    if text_tokens >= dims.reserved_len:
        return 1 << 30
    last = dims.reserved_len + dims.audio_chunk * (text_tokens // dims.text_chunk)  # ceil(x / A) <= k <=> x <= k A
    return max(0, last - past_len + 1)


def step_mask(past_len: int, n_new: int, text_mask: np.ndarray, dims: TtsDims) -> np.ndarray:
    """`make_streaming_chunk_mask_generation` as an additive (1, 1, n_new, past_len + n_new) float32 mask.

    Audio at `past_len` may see ceil((past_len - reserved)/audio_chunk) * text_chunk text tokens; the rest of the text
    window *and* the `[Ptts]` slot are hidden, then the padded text slots too. The official mask is one row
    broadcast over all new positions (no causal part among them); reproduced."""
    row = np.zeros(past_len + n_new, dtype=np.float32)
    start = released_text(past_len, dims) + dims.start_len
    end = dims.reserved_len + dims.start_len + 1
    row[start:end] = MASK_MIN
    n_cond = dims.condition_length
    if text_mask.shape != (n_cond,):
        raise InvalidInputError(f"text mask has shape {text_mask.shape}, expected ({n_cond},); build it with "
                                "build_text_mask().")
    row[:n_cond][text_mask == 0] = MASK_MIN
    return np.broadcast_to(row, (1, 1, n_new, row.shape[0])).copy()


def causal_mask(past_len: int, n_new: int) -> np.ndarray:
    """Plain causal additive mask over [0, past_len + n_new): what `prefill_text` gets from `attention_mask=None`."""
    m = np.zeros((n_new, past_len + n_new), dtype=np.float32)
    m[:, past_len:][np.triu(np.ones((n_new, n_new), dtype=bool), k=1)] = MASK_MIN
    return m[None, None]


@dataclass
class KVCache:
    """Keys/values of every layer, (layers, 1, heads, capacity, head_dim); `length` positions are in use.

    The whole buffer of a layer (a contiguous array) is what the graph gets as "past", with the unused and
    not-yet-visible positions masked: onnxruntime then reads the numpy memory in place, whereas a [:length] slice
    would be copied at every step (123 KB per position per step with the real 20 x 768 model)."""

    keys: np.ndarray
    values: np.ndarray
    length: int

    GROW = 256  # positions added when full (a copy of the cache each time; the masked tail costs little)

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def ensure(self, n: int) -> None:
        """Grow so that n positions fit."""
        if n <= self.capacity:
            return
        old, shape = self.capacity, list(self.keys.shape)
        shape[3] = -(-n // self.GROW) * self.GROW
        for name in ("keys", "values"):
            new = np.zeros(shape, dtype=np.float32)
            new[:, :, :, :old] = getattr(self, name)
            setattr(self, name, new)


class TtsBackbone:
    """The ORT decoder + numpy tables. Stateless apart from the sessions: the KV cache is passed in."""

    # Room for generated audio frames before the cache first grows.
    INITIAL_AUDIO_CAPACITY = KVCache.GROW

    def __init__(self, bundle: Bundle, *, variant: str = "fp32", ort: OrtOptions | None = None):
        part = bundle.part(keys.PART_TTS)
        self.dims = TtsDims.from_meta(part.meta)
        self.variant = variant
        self.session = make_session(graph_path(bundle, ROLE_BACKBONE, variant), ort)
        self.projector = make_session(graph_path(bundle, ROLE_PROJECTOR, variant), ort)
        self.emb_text = np.load(bundle.file(keys.PART_TTS, ROLE_EMB_TEXT))
        self.emb_code = np.load(bundle.file(keys.PART_TTS, ROLE_EMB_CODE))
        self._out_names = [OUT_HIDDEN, OUT_LOGITS] + [n for i in range(self.dims.num_layers) for n in new_names(i)]

    # --- embeddings -----------------------------------------------------------------------------------------------
    def project_speaker(self, llm_hidden: np.ndarray) -> np.ndarray:
        """`projector` + L2 norm of the LLM's `<|spk|>` hidden state(s): (n, llm_dim) -> (n, hidden)."""
        h = np.asarray(llm_hidden, dtype=np.float32)
        if h.ndim == 1:
            h = h[None]
        if h.ndim != 2 or h.shape[1] != self.dims.llm_dim:
            raise InvalidInputError(
                f"speaker hidden state has shape {h.shape}; expected (n, {self.dims.llm_dim}) = the LLM's last-layer "
                "hidden state at <|spk|> (the TTS llm_dim must equal the LLM hidden size).")
        return self.projector.run([PROJ_OUT], {PROJ_IN: h[None]})[0][0]

    def text_embeds(self, ids: np.ndarray, spk_emb: np.ndarray | None = None) -> np.ndarray:
        """`merge_inputs_embeds`: text embeddings with the `[spk_emb]` slots replaced by `spk_emb` (n_spk, hidden)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= self.dims.num_text_tokens:
            raise InvalidInputError(f"TTS text ids must be in [0, {self.dims.num_text_tokens}); got "
                                    f"[{ids.min()}, {ids.max()}]. Tokenize with the bundle's ChatTTS tokenizer.")
        emb = self.emb_text[ids].copy()
        slots = np.flatnonzero(ids == self.dims.spk_emb_token_id)
        if slots.size:
            if spk_emb is None:
                raise InvalidInputError("the text chunk holds [spk_emb] but no speaker embedding was given; pass the "
                                        "projected <|spk|> hidden state with the first chunk.")
            if slots.size != self.dims.num_spk_embs:
                raise InvalidInputError(f"found {slots.size} [spk_emb] slots, the model has {self.dims.num_spk_embs}.")
            emb[slots.min(): slots.max() + 1] = spk_emb
        return emb

    def code_embeds(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the num_vq code embeddings of each frame: (n, num_vq) -> (n, hidden)."""
        codes = np.asarray(codes, dtype=np.int64).reshape(-1, self.dims.num_vq)
        out = self.emb_code[0][codes[:, 0]].copy()
        for q in range(1, self.dims.num_vq):
            out += self.emb_code[q][codes[:, q]]
        return out

    def audio_bos_embed(self) -> np.ndarray:
        return self.emb_text[[self.dims.audio_bos_token_id]]

    # --- decoder --------------------------------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        """Zero cache of condition_length - 1 = 302 positions, as `_generate_mel_spec*` allocate it."""
        d = self.dims
        n = d.condition_length - 1
        shape = (d.num_layers, 1, d.num_heads, n + self.INITIAL_AUDIO_CAPACITY, d.head_dim)
        return KVCache(np.zeros(shape, np.float32), np.zeros(shape, np.float32), n)

    def forward(self, cache: KVCache, embeds: np.ndarray, begin: int,
                mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run n positions [begin, begin + n) attending to cache[:begin] (`mask` is (1, 1, n, begin + n) over
        those); store their keys/values at [begin, begin + n); return the hidden states (n, hidden) and the
        last position's code logits (num_vq, num_audio_tokens)."""
        embeds = np.asarray(embeds, dtype=np.float32).reshape(1, -1, self.dims.hidden)
        n = embeds.shape[1]
        if mask.shape != (1, 1, n, begin + n):
            raise InvalidInputError(f"mask shape {mask.shape} != (1, 1, {n}, {begin + n}).")
        cache.ensure(begin + n)
        cap = cache.capacity
        full = np.full((1, 1, n, cap + n), MASK_MIN, dtype=np.float32)  # buffer positions >= begin: hidden
        full[..., :begin] = mask[..., :begin]
        full[..., cap:] = mask[..., begin:]
        feed = {IN_EMBEDS: embeds, IN_POSITIONS: np.arange(begin, begin + n, dtype=np.int64)[None], IN_MASK: full}
        for i in range(self.dims.num_layers):
            k, v = past_names(i)
            feed[k] = cache.keys[i]
            feed[v] = cache.values[i]
        outs = self.session.run(self._out_names, feed)
        for i in range(self.dims.num_layers):
            cache.keys[i, :, :, begin: begin + n] = outs[2 + 2 * i]
            cache.values[i, :, :, begin: begin + n] = outs[3 + 2 * i]
        cache.length = max(cache.length, begin + n)
        return outs[0][0], outs[1][0]

    def prefill_text(self, cache: KVCache, ids: np.ndarray, begin: int, spk_emb: np.ndarray | None = None) -> None:
        """Official `prefill_text`: causal attention over text positions [0, end) only, written at [begin, end)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size == 0:
            return
        end = begin + ids.size
        if end > self.dims.condition_length - 1:
            raise InvalidInputError(f"text chunk [{begin}, {end}) runs past the reserved text window "
                                    f"(ends at {self.dims.condition_length - 1}).")
        self.forward(cache, self.text_embeds(ids, spk_emb), begin, causal_mask(begin, ids.size))

    def prefill_audio(self, cache: KVCache, codes: np.ndarray, text_mask: np.ndarray) -> None:
        """Official `prefill_audio_ids` (segment roll-over): audio-bos + `codes` from position cache.length on, with
        the streaming mask row broadcast over all of them (no causal order among them, exactly as official)."""
        emb = np.concatenate([self.audio_bos_embed(), self.code_embeds(codes)])
        past = cache.length
        self.forward(cache, emb, past, step_mask(past, emb.shape[0], text_mask, self.dims))

    def step(self, cache: KVCache, embed: np.ndarray, text_mask: np.ndarray) -> np.ndarray:
        """One generation step at position cache.length with the streaming mask; returns (num_vq, codes) logits."""
        past = cache.length
        return self.forward(cache, embed, past, step_mask(past, 1, text_mask, self.dims))[1]
