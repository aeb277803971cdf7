"""Text (+ the LLM's `<|spk|>` hidden state) -> 24 kHz speech, following the official MiniCPM-o 2.6 loops.

`TTS.stream(pieces, spk_hidden)` is `_generate_mel_spec_audio_streaming`: LLM text pieces arrive, are normalised
(numbers, "*") and re-tokenised into the 300-slot window; each time 10 more text tokens exist, that chunk is
prefilled and up to 25 code frames are generated; the new frames (+4 frames of left context) go through DVAE + Vocos
and are overlap-added (2048 samples) into the previous chunk; the part of a chunk that the next one cannot change
is yielded at once (`TTSOptions.early_audio`; the official loop holds the whole chunk back). When the text ends,
the rest of the text + `[Etts]` is prefilled and 25-frame calls continue until EOS or 2048 frames.
Long replies roll over as official: once the text has >= 120 tokens and a piece holds a sentence end, the text is
cut after it, the segment is finished, and a new segment starts from a fresh cache that re-prefills
`[Stts][spk_emb]` + the last 5 text ids and (through `prefill_audio_ids`) the last 50 code frames.

Official quirks kept: the roll-over audio prefill attends bidirectionally among the 50 carried frames (the mask row
is broadcast); the first chunk of a new segment re-decodes the 4 carried context frames that the previous segment
already played (about 85 ms heard twice); a new segment whose first piece is empty ends the reply, and text cut off
at the roll-over is only spoken if more pieces arrive.

`TTS.synthesize(text, spk_hidden)` is the non-streaming `_generate_mel_spec` (all 31 text chunks, then decode all
codes at once), what `chat(generate_audio=True)` does.

Not implemented: `enable_regenerate` (VoiceChecker roll-back). Deviation kept on purpose: the official final
prefill may reach position 302 (`[Ptts]`) when the text fills all 300 slots, which raises in torch; here it stops
at 302.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from edge import keys
from edge.bundle import Bundle
from edge.onnx_session import OrtOptions
from edge.tts.backbone import KVCache, TtsBackbone, build_text_mask, frames_determined_by
from edge.tts.decoder import TtsDecoder, WavStreamJoiner
from edge.tts.sampling import CodeSampler, SamplingOptions
from edge.tts.text import (
    SPK_EMB,
    STTS,
    NumberStyle,
    TtsTokenizer,
    detect_language,
    normalize_piece,
    prompt_ids,
    sentence_end,
)

log = logging.getLogger("edge.tts")

TTS_EOS = keys.TTS_EOS  # the LLM's end-of-speech token; text after it is not spoken
# Official constants of `_generate_mel_spec_audio_streaming` / `_generate_mel_spec`.
CODES_PER_CALL = 25  # output_chunk_size
CONTEXT_CODES = 4  # left context frames re-decoded per chunk
OVERLAP_SAMPLES = 512 * 4  # _linear_overlap_add2_wav overlap
MAX_CODES = 2048  # tts_max_new_tokens
LANG_DETECT_PIECES = 2  # language detected from the first two pieces
ROLLOVER_SHIFT = 180  # a new segment may start once the text reaches reserved_len - 180 = 120 tokens
ROLLOVER_TEXT_IDS = 5  # text ids carried into the new segment (tid_len)
ROLLOVER_CODES = 50  # code frames carried into the new segment (aid_len)


@dataclass(frozen=True)
class TTSOptions:
    """Attributes:
    sampling: per-step code sampling (temperatures, top-p/k, EOS rules, greedy, seed).
    codes_per_call: frames generated per text chunk (official 25).
    context_codes: frames of left context re-decoded with each streamed chunk (official 4).
    overlap_samples: overlap-add length between streamed chunks (official 2048 = 4 frames).
    max_codes: stop after this many frames without EOS (official 2048).
    number_style: how digits are spoken in streaming mode (official: digit by digit).
    eager_codes: after each text chunk, also generate the frames whose codes that text already fixes (the
        streaming mask lets audio see 10 more text tokens per 50 frames; the official loop makes only 25 per chunk)
        in grid-aligned calls: the same codes in the same order, produced earlier. It matters when the LLM is slow
        (CPU): speech arrives at up to 50 frames (1.07 s) per 10 text tokens instead of 25. Chunks are still
        decoded on the official grid, so the streamed audio is the official one too, only sooner.
    early_audio: emit the final part of each streamed chunk at once instead of holding the chunk until the next
        one (WavStreamJoiner): the same waveform, but the first audio comes one TTS call (10 text tokens + 25
        frames) sooner. False = the official hold-back.
    """

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    codes_per_call: int = CODES_PER_CALL
    context_codes: int = CONTEXT_CODES
    overlap_samples: int = OVERLAP_SAMPLES
    max_codes: int = MAX_CODES
    number_style: NumberStyle = NumberStyle.DIGITS
    eager_codes: bool = True
    early_audio: bool = True


@dataclass(frozen=True)
class _Carry:
    """What a segment hands to the next one: its last text ids, last code frames and the text after the cut."""

    text_ids: np.ndarray
    codes: np.ndarray
    text_left: str


@dataclass
class TtsState:
    """One utterance: the KV cache, the codes generated so far (EOS frame excluded), whether EOS came, and the
    number of codes after each generate call (the streamed chunk boundaries)."""

    cache: KVCache
    codes: list[np.ndarray] = field(default_factory=list)
    finished: bool = False
    call_ends: list[int] = field(default_factory=list)


class TTS:
    """Runtime class of the `tts` bundle part.

    Its sessions never spin-wait (`OrtOptions.allow_spinning=False` is forced): every generation step is a small
    ORT run between numpy work, and spinning ORT threads starve that work (3.5-4.7x slower on 2 cores)."""

    def __init__(self, bundle: Bundle, *, variant: str = "fp32", ort: OrtOptions | None = None,
                 options: TTSOptions | None = None):
        ort = dataclasses.replace(ort or OrtOptions(), allow_spinning=False)
        self.options = options or TTSOptions()
        self.backbone = TtsBackbone(bundle, variant=variant, ort=ort)
        self.decoder = TtsDecoder(bundle, variant=variant, ort=ort)
        self.tokenizer = TtsTokenizer.from_bundle(bundle)
        self.meta = bundle.part(keys.PART_TTS).meta
        self.dims = self.backbone.dims
        self.sample_rate = self.decoder.sample_rate

    # --- building blocks ------------------------------------------------------------------------------------------
    def new_state(self) -> TtsState:
        return TtsState(self.backbone.new_cache())

    def new_sampler(self, sampling: SamplingOptions | None = None) -> CodeSampler:
        return CodeSampler(sampling or self.options.sampling, num_vq=self.dims.num_vq, eos_id=self.dims.eos_id,
                           config_top_p=self.meta.get("top_p"), config_top_k=self.meta.get("top_k"),
                           config_repetition_penalty=self.meta.get("repetition_penalty", 1.0))

    def speaker_embedding(self, spk_hidden: np.ndarray) -> np.ndarray:
        return self.backbone.project_speaker(spk_hidden)

    def prompt_ids(self, text: str) -> tuple[np.ndarray, int]:
        """(ids of the 303-slot prompt, number of text tokens)."""
        ids, n = prompt_ids(text, self.tokenizer, self.dims.reserved_len, self.dims.num_spk_embs)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape[0] != self.dims.condition_length:  # the official code carries on misaligned; so do we
            log.warning("the TTS prompt tokenised to %d ids instead of %d (ChatTTS control tokens in the text?)",
                        ids.shape[0], self.dims.condition_length)
        return ids, n

    def chunk_range(self, chunk_idx: int) -> tuple[int, int]:
        """[begin, end) of text chunk `chunk_idx` in the prompt (chunk 0 also covers `[Stts][spk_emb]`)."""
        d = self.dims
        begin = 0 if chunk_idx == 0 else chunk_idx * d.text_chunk + d.start_len
        end = min((chunk_idx + 1) * d.text_chunk + d.start_len, d.condition_length - 1)
        return begin, end

    def generate(self, state: TtsState, text_mask: np.ndarray, max_new: int, sampler: CodeSampler) -> np.ndarray:
        """Official `ConditionalChatTTS.generate`: up to `max_new` frames; returns the new frames (n, num_vq)."""
        if state.finished:
            return np.zeros((0, self.dims.num_vq), dtype=np.int64)
        start = len(state.codes)
        for i in range(max_new):
            audio_bos = len(state.codes) == 0
            emb = self.backbone.audio_bos_embed() if audio_bos else self.backbone.code_embeds(state.codes[-1])
            logits = self.backbone.step(state.cache, emb, text_mask)
            recent = state.codes[-sampler.options.repetition_window:]  # all the penalty looks at
            hist = np.stack(recent) if recent else np.zeros((0, self.dims.num_vq), np.int64)
            frame = sampler(logits, hist, i, audio_bos)
            if (frame == self.dims.eos_id).any():
                state.finished = True
                break
            state.codes.append(frame)
        state.call_ends.append(len(state.codes))
        new = state.codes[start:]
        return np.stack(new) if new else np.zeros((0, self.dims.num_vq), dtype=np.int64)

    # --- non-streaming --------------------------------------------------------------------------------------------
    def synthesize_codes(self, text: str, spk_hidden: np.ndarray,
                         sampling: SamplingOptions | None = None) -> np.ndarray:
        """`_generate_mel_spec`: every text chunk (padding included), 25 frames each, then until EOS/max. The text
        between `<|tts_bos|>` and `<|tts_eos|>` is spoken when those markers are present (as official)."""
        ids, n = self.prompt_ids(text.split(keys.TTS_BOS)[-1].split(keys.TTS_EOS)[0])
        mask = build_text_mask(n, self.dims)
        spk = self.speaker_embedding(spk_hidden)
        st, sampler, per = self.new_state(), self.new_sampler(sampling), self.options.codes_per_call
        for chunk in range(math.ceil(self.dims.condition_length / self.dims.text_chunk)):
            begin, end = self.chunk_range(chunk)
            if end > begin:
                self.backbone.prefill_text(st.cache, ids[begin:end], begin, spk if begin == 0 else None)
            self.generate(st, mask, per, sampler)
            if st.finished:
                break
        while not st.finished and len(st.codes) <= self.options.max_codes:
            self.generate(st, mask, per, sampler)
        return np.stack(st.codes) if st.codes else np.zeros((0, self.dims.num_vq), np.int64)

    def synthesize(self, text: str, spk_hidden: np.ndarray, sampling: SamplingOptions | None = None) -> np.ndarray:
        """Whole waveform (float32, `sample_rate` Hz) of `text` spoken with the speaker of `spk_hidden`."""
        codes = self.synthesize_codes(text, spk_hidden, sampling)
        if codes.shape[0] == 0:
            return np.zeros(0, np.float32)
        return self.decoder.codes_to_wav(codes)

    # --- streaming ------------------------------------------------------------------------------------------------
    def stream(self, pieces: Iterable[str], spk_hidden: np.ndarray,
               states: list[TtsState] | None = None,
               on_compute: Callable[[], None] | None = None,
               sampling: SamplingOptions | None = None) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz chunks while LLM text `pieces` arrive (see the module docstring).

        `pieces` is always read to the end: once the speech has ended (EOS code, or an empty piece opening a new
        segment) each further piece yields an empty chunk, so a caller that shows text between audio chunks loses
        none of it and a producer feeding a bounded queue never blocks.
        Pass a list as `states` to get each segment's state (codes, chunk boundaries) appended to it.
        `on_compute` is called once, just before the first TTS computation (the first text chunk needs 10 text
        tokens): until then the TTS only waits, and a caller can lend its cores to the LLM's decode.
        `sampling` replaces `options.sampling` for this utterance (e.g. a request's seed).
        While it waits for text, the stream yields an empty chunk per piece it has read, so a caller in the same
        thread can show the text as it arrives."""
        spk = self.speaker_embedding(spk_hidden)
        it, sampler, carry = iter(pieces), self.new_sampler(sampling), None

        def computing() -> None:
            nonlocal on_compute
            if on_compute is not None:
                callback, on_compute = on_compute, None
                callback()

        while True:
            st = self.new_state()
            if states is not None:
                states.append(st)
            carry = yield from self._segment(it, spk, st, sampler, carry, computing)
            if carry is None:
                break
        for _ in it:
            yield np.zeros(0, dtype=np.float32)

    def _chunk_calls(self, st: TtsState, chunks_prefilled: int, official_total: int) -> Iterator[int]:
        """Sizes of the generate calls after a text chunk. Official: one call of `codes_per_call`, reaching
        `official_total` frames. With `eager_codes`, on to every frame the prefilled text already determines
        (beyond the official count no further than `max_codes`, which the official text phase never checks), in
        calls that end on the official 25-frame grid so the final phase stops where the official loop stops."""
        o, per = self.options, self.options.codes_per_call
        if not o.eager_codes:
            yield per
            return
        determined = len(st.codes) + frames_determined_by(chunks_prefilled * self.dims.text_chunk, st.cache.length,
                                                          self.dims)
        target = max(official_total, min(determined, o.max_codes))
        while not st.finished and len(st.codes) < target:
            yield min(per - len(st.codes) % per, target - len(st.codes))

    def _segment(self, it: Iterator[str], spk: np.ndarray, st: TtsState, sampler: CodeSampler,
                 carry: _Carry | None, computing: Callable[[], None]):
        """One official `_generate_mel_spec_audio_streaming` call; returns the roll-over carry or None."""
        o, d = self.options, self.dims
        joiner = WavStreamJoiner(o.overlap_samples, early=o.early_audio)
        gen_text, lang, chunk_idx, decoded, n, ids = "", "english", 0, 0, 0, None
        if carry is not None:  # re-prefill the last text ids and audio frames of the previous segment
            computing()
            start = np.asarray(self.tokenizer.control_ids(STTS + SPK_EMB * d.num_spk_embs), dtype=np.int64)
            self.backbone.prefill_text(st.cache, np.concatenate([start, carry.text_ids]), 0, spk)
            self.backbone.prefill_audio(st.cache, carry.codes[:-1], build_text_mask(carry.text_ids.size, d))
            st.codes = list(carry.codes)
            chunk_idx = carry.text_ids.size // d.text_chunk
            gen_text = self.tokenizer.decode(carry.text_ids.tolist()) + carry.text_left
            decoded = len(st.codes)
        raw, rollover, stop, emitted = gen_text, False, False, False
        official = len(st.codes)  # frames the official loop would have made by now (eager_codes runs ahead)

        def decode_new() -> np.ndarray | None:
            nonlocal decoded
            lo = max(decoded - o.context_codes, 0)
            decoded = len(st.codes)
            return joiner.push(self.decoder.codes_to_wav(np.stack(st.codes[lo:]))) if decoded > lo else None

        for t, piece in enumerate(it, start=1):
            txt = piece.split(TTS_EOS)[0]
            raw += txt
            if t == 1 and txt == "" and carry is not None:
                log.warning("tts: new segment starts with an empty piece; generation finished (as official)")
                return None
            if t <= LANG_DETECT_PIECES:
                lang = detect_language(raw)
            gen_text += normalize_piece(txt, lang, o.number_style)
            ids, n = self.prompt_ids(gen_text)
            if n >= d.reserved_len - ROLLOVER_SHIFT and (mark := sentence_end(txt)):
                cut = gen_text.rfind(mark) + 1
                text_left, gen_text = gen_text[cut:], gen_text[:cut]
                ids, n = self.prompt_ids(gen_text)
                rollover = True
                break
            if n >= (chunk_idx + 1) * d.text_chunk:
                if not st.finished:  # (eager_codes may have met EOS before the official loop would)
                    computing()
                    begin, end = self.chunk_range(chunk_idx)
                    self.backbone.prefill_text(st.cache, ids[begin:end], begin, spk if chunk_idx == 0 else None)
                chunk_idx += 1
                official += o.codes_per_call
                for size in self._chunk_calls(st, chunk_idx, official):
                    self.generate(st, build_text_mask(n, d), size, sampler)
                    # decode on the official 25-frame grid only: the same chunks, hence the same audio
                    if st.finished or len(st.codes) % o.codes_per_call == 0 or not o.eager_codes:
                        if (out := decode_new()) is not None:
                            emitted = True
                            yield out
                if st.finished and official > len(st.codes):  # the official call would have met EOS by now
                    break
            if not emitted:
                yield np.zeros(0, dtype=np.float32)  # one item per piece read: callers show text as it comes
            emitted = False
        if not st.finished and ids is not None:
            computing()
            begin = self.chunk_range(chunk_idx)[0]
            end = min(n + d.start_len + 1, d.condition_length - 1)  # + 1 for [Etts]
            if end > begin:
                self.backbone.prefill_text(st.cache, ids[begin:end], begin, spk if chunk_idx == 0 else None)
            while not st.finished:
                # back on the official 25-frame grid (eager calls may have stopped between grid points)
                self.generate(st, build_text_mask(n, d), o.codes_per_call - len(st.codes) % o.codes_per_call,
                              sampler)
                if (out := decode_new()) is not None:
                    yield out
                if len(st.codes) > o.max_codes:
                    stop = True
                    break
        if (tail := joiner.flush()) is not None:
            yield tail
        if not rollover or stop:
            return None
        last = n + d.start_len  # index of [Etts]: the carried text ids exclude it
        return _Carry(ids[last - ROLLOVER_TEXT_IDS: last].copy(), np.stack(st.codes[-ROLLOVER_CODES:]), text_left)
