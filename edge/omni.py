"""`Omni`: the loaded model and its chat API, shaped like the official `MiniCPMO.chat()`.

Data flows one way: content -> media loaders -> preprocessors -> ONNX encoders -> embeddings -> LLM (llama.cpp)
-> tokens -> (TTS -> audio). The introspection methods (`preprocess_image`, `encode_image`, `audio_features`,
`encode_audio`, `build_prompt`, `prefill_logits`, `inputs_embeds`, TTS helpers) expose each stage so that
tests, benchmarks and curious users can compare any stage with the official implementation.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError
from edge.llm import LLM, LLMOptions
from edge.onnx_session import OrtOptions
from edge.prompt import Media, Message, Prompt, PromptBuilder
from edge.sampling import SamplingOptions

AUDIO_SAMPLE_RATE = 16000  # what the Whisper encoder takes (spec §2.3)
# Official `chat(sampling=False)` is beam search (3 beams, repetition penalty 1.2, spec §10). We decode greedily
# with that penalty: same spirit (deterministic), a fraction of the cost on a CPU. Documented, not hidden.
GREEDY_REPETITION_PENALTY = 1.2


@dataclass(frozen=True)
class OmniOptions:
    """Attributes:
    llm: llama.cpp settings (context, threads, KV type, flash attention).
    ort: onnxruntime settings shared by the vision, audio and TTS sessions.
    encoder_ort: settings of the vision and audio encoders when they differ from `ort` (live mode: a unit is
        encoded while no TTS runs, so the encoders may use every core, as the prefill does).
    vision_variant, audio_variant, tts_variant: "fp32" or "int8" ONNX graphs.
    max_slice_nums: image slices when a call does not pass its own (None = the official default, 9).
    """

    llm: LLMOptions = field(default_factory=LLMOptions)
    ort: OrtOptions = field(default_factory=OrtOptions)
    encoder_ort: OrtOptions | None = None
    vision_variant: str = "fp32"
    audio_variant: str = "fp32"
    tts_variant: str = "fp32"
    max_slice_nums: int | None = None


@dataclass
class ChatResult:
    text: str
    tokens: list[int]
    finish_reason: str
    spk_embed: np.ndarray | None = None
    audio: np.ndarray | None = None
    sampling_rate: int | None = None


def _is_audio(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 1


class Omni:
    """A bundle loaded for chat. One conversation at a time (a lock serialises calls)."""

    def __init__(self, bundle: Bundle, options: OmniOptions | None = None):
        self.bundle = bundle
        self.options = options or OmniOptions()
        self.llm = LLM(bundle.file(keys.PART_LLM, "model"), self.options.llm,
                       skipped_in_text=bundle.skipped_in_text)
        self.special = dict(bundle.special_tokens)
        self.prompts = PromptBuilder(self.llm, self.special, bundle.chat_template, bundle.template_variables)
        self._vision = None
        self._audio = None
        self._tts = None
        self._lock = threading.RLock()
        self.profile = None  # the edge.profiles.Profile it was loaded under (Omni.load with a profile)

    @classmethod
    def load(cls, bundle: str | Path | Bundle, options: OmniOptions | None = None, *, profile=None,
             hardware=None, check_memory: bool = True, **overrides) -> "Omni":
        """Load a bundle. Without `profile` and field overrides: `options` as given (default OmniOptions()).
        With `profile` ("auto", a profile name, or an `edge.profiles.Profile`) and/or profile-field keywords
        (`n_ctx=2048, tts_variant="fp32"`, ...; they imply profile="auto"): the profile's settings, refused up front
        with `InsufficientMemoryError` (saying what to change) when the estimate exceeds the available memory of
        `hardware` (default: detected). Explicit `options` still take precedence over the profile."""
        b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
        if profile is None and not overrides:
            return cls(b, options)
        from edge.profiles import Hardware, check_memory as check, profile_for_run

        hw = hardware or Hardware.detect()
        prof = profile_for_run(profile or "auto", overrides.items(), hw=hw).for_bundle(b)
        if options is not None:
            prof = prof.matching(options)
        if check_memory:
            check(b, prof, hw)
        omni = cls(b, options or prof.omni_options())
        omni.profile = prof
        return omni

    @property
    def random_weights(self) -> bool:
        return self.bundle.random_weights

    # --- lazily created encoders (a text-only chat never loads them) ---------------------------------------------
    @property
    def vision(self):
        if self._vision is None:
            from edge.vision import VisionEncoder

            self._vision = VisionEncoder(self.bundle, variant=self.options.vision_variant,
                                         ort=self.options.encoder_ort or self.options.ort)
        return self._vision

    @property
    def audio(self):
        if self._audio is None:
            from edge.audio_encoder import AudioEncoder

            self._audio = AudioEncoder(self.bundle, variant=self.options.audio_variant,
                                       ort=self.options.encoder_ort or self.options.ort)
        return self._audio

    # --- stage by stage --------------------------------------------------------------------------------------------
    def preprocess_image(self, image, max_slice_nums: int | None = None, *, use_image_id: bool = True,
                         image_idx: int = 0):
        from edge.image_preprocess import SliceOptions, preprocess_image
        from edge.io.images import load_image

        if max_slice_nums is None:
            max_slice_nums = self.options.max_slice_nums
        opts = SliceOptions(use_image_id=use_image_id,
                            **({"max_slice_nums": max_slice_nums} if max_slice_nums is not None else {}))
        return preprocess_image(load_image(image), opts, image_idx=image_idx)

    def encode_image(self, image, max_slice_nums: int | None = None) -> np.ndarray:
        """(n_slices, 64, hidden) embeddings of one image."""
        pre = image if hasattr(image, "tgt_sizes") else self.preprocess_image(image, max_slice_nums)
        return self.vision(pre)

    def audio_features(self, wave, sr: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
        """Whisper log-mel (80, frames) of the first 30-s piece (what the official processor computes)."""
        from edge.audio_features import log_mel_pieces

        pieces = log_mel_pieces(self._wave16k(wave, sr))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def encode_audio(self, wave, sr: int = AUDIO_SAMPLE_RATE, chunked: bool = True) -> np.ndarray:
        """(n_tokens, hidden) embeddings of a wave (25 per second)."""
        return self.audio.encode_audio(self._wave16k(wave, sr), chunked=chunked)

    @staticmethod
    def _wave16k(wave, sr: int) -> np.ndarray:
        from edge.io.audio import load_audio

        if isinstance(wave, np.ndarray):
            return load_audio((wave, sr))
        return load_audio(wave)

    # --- prompt ------------------------------------------------------------------------------------------------
    def _content_parts(self, content, counters: dict, max_slice_nums, use_image_id, chunk_input) -> list:
        from edge.audio_encoder import audio_placeholder

        items = content if isinstance(content, (list, tuple)) else [content]
        parts: list = []
        for item in items:
            kind, value = self._classify(item)
            if kind == "text":
                parts.append(value)
            elif kind == "image":
                pre = self.preprocess_image(value, max_slice_nums, use_image_id=use_image_id,
                                            image_idx=counters["image"])
                counters["image"] += 1
                parts.append(Media("image", pre.placeholder, pre))
            elif kind == "audio":
                wave = self._wave16k(*value) if isinstance(value, tuple) else self._wave16k(value, AUDIO_SAMPLE_RATE)
                counters["audio"] += 1
                parts.append(Media("audio", audio_placeholder(len(wave), chunked=chunk_input),
                                   {"wave": wave, "chunked": chunk_input}))
            elif kind == "video":
                # Official video recipe: every sampled frame is one unsliced image without an image id.
                from edge.io.video import load_video, preprocess_frames

                for pre in preprocess_frames(load_video(value)):
                    parts.append(Media("image", pre.placeholder, pre))
        return parts

    @staticmethod
    def _classify(item):
        """(kind, value) of one content item: str, PIL.Image, 1-D numpy (16 kHz audio), HxWx3 numpy (image),
        or an OpenAI/official-style dict {"type": "text"|"image"|"audio"|"video", ...}."""
        if isinstance(item, str):
            return "text", item  # a TrustedText stays one (its special tokens are parsed)
        if isinstance(item, dict):
            t = item.get("type")
            if t == "text":
                return "text", item.get("text", "")
            if t in ("image", "video"):
                return t, item.get(t)
            if t == "audio":
                a = item.get("audio")
                return "audio", (a, int(item.get("sample_rate", AUDIO_SAMPLE_RATE))) if isinstance(a, np.ndarray) \
                    else a
            raise InvalidInputError(f"unknown content part type {t!r}; use text, image, audio or video.")
        if _is_audio(item):
            return "audio", (item, AUDIO_SAMPLE_RATE)
        if isinstance(item, np.ndarray) and item.ndim == 3:
            return "image", item
        if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image without importing PIL here
            return "image", item
        if isinstance(item, (bytes, Path)):
            suffix = Path(item).suffix.lower() if isinstance(item, Path) else ""
            if suffix in (".wav", ".flac", ".ogg", ".mp3"):
                return "audio", item
            if suffix in (".mp4", ".avi", ".mov", ".mkv", ".webm"):
                return "video", item
            return "image", item
        raise InvalidInputError(
            f"cannot use a {type(item).__name__} as message content: pass text, a PIL image, a 16 kHz float "
            "numpy array (audio) or a dict like {'type': 'image', 'image': 'photo.jpg'}.")

    def build_prompt(self, msgs: Sequence[dict], *, max_slice_nums: int | None = None,
                     use_image_id: bool | None = None, chunk_input: bool = True, omni_input: bool = False,
                     use_tts_template: bool = False, add_generation_prompt: bool = True) -> Prompt:
        """Exactly what `chat()` feeds the LLM: prompt text, ids, image/audio spans, speaker bounds, media."""
        if not msgs:
            raise InvalidInputError("msgs is empty: pass at least one {'role': 'user', 'content': ...} message.")
        if msgs[0].get("role") not in ("user", "system"):
            raise InvalidInputError("the first message must have role 'user' or 'system' (as the official chat()).")
        counters = {"image": 0, "audio": 0}
        messages = []
        for m in msgs:
            role = m.get("role")
            if role not in ("user", "assistant", "system"):
                raise InvalidInputError(f"message role must be user, assistant or system, got {role!r}.")
            parts = self._content_parts(m.get("content", ""), counters, max_slice_nums,
                                        True if use_image_id is None else use_image_id, chunk_input)
            messages.append(Message(role, tuple(parts)))
        # Any audio in the conversation switches chat() to the TTS template (spec §10).
        tts_template = use_tts_template or counters["audio"] > 0
        return self.prompts.build(messages, tts_template=tts_template, add_generation_prompt=add_generation_prompt,
                                  omni_input=omni_input)

    def media_embeddings(self, prompt: Prompt) -> list[np.ndarray]:
        """One (n_tokens, hidden) array per Media of the prompt, in prompt order.

        The official processor zero-pads the mel pieces of all audios of a prompt into one batch, which changes
        the last token of an odd-length piece; `batch_frames` reproduces that."""
        from edge.audio_encoder import piece_frames

        waves = [m.payload["wave"] for m in prompt.media if m.kind == "audio"]
        batch_frames = max((piece_frames(len(w)) for w in waves), default=None)
        out = []
        for media in prompt.media:
            if media.kind == "image":
                out.append(self.vision(media.payload).reshape(-1, self.llm.n_embd))
            else:
                out.append(self.audio.encode_audio(media.payload["wave"], chunked=media.payload["chunked"],
                                                   batch_frames=batch_frames))
        return out

    def segments(self, prompt: Prompt, embeds: list[np.ndarray] | None = None) -> list:
        """LLM input: token-id runs between media spans, and the media embeddings (computed here unless given)
        poured into the spans in order (an audio's chunks fill its consecutive spans)."""
        embeds = self.media_embeddings(prompt) if embeds is None else embeds
        used = [0] * len(embeds)
        segs: list = []
        pos = 0
        for span in prompt.spans:
            if span.start > pos:
                segs.append(prompt.ids[pos:span.start])
            e = embeds[span.media_index]
            n = span.end - span.start
            block = e[used[span.media_index]:used[span.media_index] + n]
            if block.shape[0] != n:
                raise RuntimeError(f"{span.kind} #{span.media_index}: {e.shape[0]} embeddings for "
                                   f"{sum(s.end - s.start for s in prompt.spans if s.media_index == span.media_index)}"
                                   " placeholder tokens")
            used[span.media_index] += n
            segs.append(np.ascontiguousarray(block, dtype=np.float32))
            pos = span.end
        if pos < len(prompt.ids):
            segs.append(prompt.ids[pos:])
        return segs

    def inputs_embeds(self, msgs, **chat_kwargs) -> np.ndarray:
        """(S, hidden) LLM input embeddings (token embeddings with media written in), as `get_vllm_embedding`
        + `get_omni_embedding` build them. Token rows come from the GGUF's table (dequantized if needed)."""
        prompt = self.build_prompt(msgs, **chat_kwargs)
        return self.token_embeddings(self.segments(prompt))

    def token_embeddings(self, segments) -> np.ndarray:
        """Segments (token-id runs and embedding blocks) -> (S, hidden) rows, as the LLM sees them."""
        return self.llm.input_rows(segments)

    def prefill_logits(self, msgs, *, all_positions: bool = False, **chat_kwargs) -> np.ndarray:
        """Logits of the prefill `chat()` runs: the last position (or every position with all_positions)."""
        with self._lock:
            prompt = self.build_prompt(msgs, **chat_kwargs)
            self.llm.reset()
            logits, _ = self.llm.prefill(self.segments(prompt), logits="all" if all_positions else "last")
            return logits

    # --- chat ----------------------------------------------------------------------------------------------------
    def stop_ids(self) -> list[int]:
        return [self.special[t] for t in keys.TERMINATORS if t in self.special]

    def chat(self, msgs, *, sampling: bool = True, max_new_tokens: int = 2048, min_new_tokens: int = 0,
             stream: bool = False, generate_audio: bool = False, output_audio_path: str | None = None,
             max_slice_nums: int | None = None, use_image_id: bool | None = None, chunk_input: bool = True,
             omni_input: bool = False, use_tts_template: bool = False, return_dict: bool = False,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int | None = None):
        """The official `chat()` contract: returns the reply text (or a generator of text pieces with
        stream=True, or a ChatResult with return_dict / generate_audio; stream=True with generate_audio=True
        yields `StreamChunk`s of text and 24 kHz audio as they are ready). Sampling defaults are the official
        ones (top-p 0.8, top-k 100, temperature 0.7, repetition penalty 1.05); sampling=False decodes greedily
        with repetition penalty 1.2 (the official code uses 3-beam search there)."""
        if sampling:
            base = SamplingOptions(seed=seed)
        else:
            base = SamplingOptions(temperature=0.0, top_p=1.0, top_k=0,
                                   repetition_penalty=GREEDY_REPETITION_PENALTY, greedy=True, seed=seed)
        overrides = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                             repetition_penalty=repetition_penalty).items() if v is not None}
        opts = SamplingOptions(**{**vars(base), **overrides})
        use_tts = use_tts_template or generate_audio
        gen = self._chat_stream(msgs, opts, max_new_tokens, min_new_tokens, generate_audio, output_audio_path,
                                dict(max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                     chunk_input=chunk_input, omni_input=omni_input, use_tts_template=use_tts),
                                stream_speech=stream and generate_audio)
        if stream and generate_audio:
            return self._speech_stream(gen)
        if stream and not return_dict:
            return (piece for piece in gen if isinstance(piece, str))
        result = None
        for piece in gen:
            if isinstance(piece, ChatResult):
                result = piece
        return result if (return_dict or generate_audio) else result.text

    def _speech_stream(self, gen: Iterator) -> Iterator:
        """Text pieces and 24 kHz audio chunks as they become ready (`StreamChunk`s): the TTS consumes the LLM's
        pieces lazily, so speech starts after the first 10 TTS text tokens, not after the whole reply.
        Sequential in one thread; `edge.orchestrator` overlaps the two on separate threads."""
        from edge.streaming import StreamChunk

        first = next(gen)  # the speaker hidden state, emitted before any text by _chat_stream(stream_speech=True)
        spk = first
        outbox: list = []
        result: list = []

        def pieces():
            for piece in gen:
                if isinstance(piece, ChatResult):
                    result.append(piece)
                    return
                outbox.append(piece)
                yield piece

        for chunk in self.tts.stream(pieces(), spk):
            while outbox:
                yield StreamChunk(outbox.pop(0))
            if chunk.size:
                yield StreamChunk("", chunk, self.tts.sample_rate)
        while outbox:
            yield StreamChunk(outbox.pop(0))

    def get_sys_prompt(self, ref_audio=None, mode: str = "audio_assistant", language: str = "en") -> dict:
        """The official voice system message (default voice, or cloning from a 16 kHz reference clip); put it
        first in `msgs` and call chat(..., generate_audio=True)."""
        from edge.voice import sys_prompt

        if ref_audio is not None and not isinstance(ref_audio, np.ndarray):
            from edge.voice import load_reference_clip

            ref_audio = load_reference_clip(ref_audio)
        return sys_prompt(ref_audio, mode, language)

    def _chat_stream(self, msgs, opts, max_new_tokens, min_new_tokens, generate_audio, output_audio_path,
                     prompt_kwargs, stream_speech: bool = False) -> Iterator[str | ChatResult]:
        with self._lock:
            prompt = self.build_prompt(msgs, **prompt_kwargs)
            want_spk = [b[0] for b in prompt.spk_bounds][-1:] if generate_audio else []
            last, hidden = self.llm.prefill(self.segments(prompt), hidden_positions=want_spk)
            if stream_speech:
                yield hidden[want_spk[0]] if want_spk else None
            tokens, text = [], []
            for ev in self.llm.generate(last, opts, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                        stop_ids=self.stop_ids()):
                if ev.token in self.stop_ids():
                    break
                tokens.append(ev.token)
                if ev.text:
                    text.append(ev.text)
                    yield ev.text
            result = ChatResult("".join(text), tokens, self.llm.last_finish_reason)
            if generate_audio and not stream_speech:
                spk = hidden[want_spk[0]] if want_spk else None
                result.spk_embed = spk
                result.audio, result.sampling_rate = self.speak(result.text, spk)
                if output_audio_path:
                    from edge.io.speaker import write_wav

                    write_wav(output_audio_path, result.audio, result.sampling_rate)
            yield result

    def speak(self, text: str, spk_embed: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Text -> (24 kHz float32 speech, sample rate) with the TTS part. The speaker is the LLM's last hidden
        state at `<|spk|>` (spec §3.2); build the prompt with the TTS template to get it."""
        if spk_embed is None:
            raise InvalidInputError("speech needs the speaker embedding from the `<|spk|>` position: call chat() "
                                    "with generate_audio=True (it switches to the TTS template).")
        return self.tts.synthesize(text, spk_embed), self.tts.sample_rate

    # --- TTS stage by stage (issue 8's introspection API) ---------------------------------------------------------
    def tts_prepare_text(self, text: str) -> tuple[str, np.ndarray, np.ndarray]:
        """(prompt text `[Stts][spk_emb]text[Etts][PAD]...[Ptts]`, its ChatTTS ids, the streaming text mask)."""
        from edge.tts.backbone import build_text_mask
        from edge.tts.text import prepare_tts_text

        t = self.tts
        prompt, n = prepare_tts_text(text, t.tokenizer, t.dims.reserved_len, t.dims.num_spk_embs)
        ids, _ = t.prompt_ids(text)
        return prompt, ids, build_text_mask(n, t.dims)

    def tts_schedule(self, text: str, n_codes_per_call: int | None = None) -> list[tuple[int, int, int]]:
        """The official streaming cadence as (text begin, text end, total codes after the call) per text chunk."""
        t = self.tts
        _, n = t.prompt_ids(text)
        per = n_codes_per_call or t.options.codes_per_call
        n_chunks = max(1, -(-n // t.dims.text_chunk))
        return [(*t.chunk_range(i), per * (i + 1)) for i in range(n_chunks)]

    def tts_step_logits(self, spk_embed: np.ndarray, text: str, codes: np.ndarray,
                        schedule: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
        """Teacher-forced (n_codes, num_vq, num_audio_tokens) code logits: at every step the given `codes` are
        fed back instead of sampled ones. `schedule` as `tts_schedule` (default: the official cadence)."""
        t = self.tts
        _, ids, mask = self.tts_prepare_text(text)
        spk = t.speaker_embedding(spk_embed)
        st, out = t.new_state(), []
        for begin, end, total in schedule or self.tts_schedule(text):
            t.backbone.prefill_text(st.cache, ids[begin:end], int(begin), spk if begin == 0 else None)
            while len(st.codes) < min(int(total), len(codes)):
                emb = t.backbone.audio_bos_embed() if not st.codes else t.backbone.code_embeds(st.codes[-1])
                out.append(t.backbone.step(st.cache, emb, mask))
                st.codes.append(np.asarray(codes[len(st.codes)]))
        return np.stack(out)

    def tts_greedy_codes(self, spk_embed: np.ndarray, text: str,
                         schedule: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
        """Greedy (argmax, eos masked during the official minimum length) codes, (n, num_vq)."""
        from edge.tts.sampling import SamplingOptions as CodeSampling

        t = self.tts
        _, ids, mask = self.tts_prepare_text(text)
        spk = t.speaker_embedding(spk_embed)
        st, sampler = t.new_state(), t.new_sampler(CodeSampling(greedy=True))
        for begin, end, total in schedule or self.tts_schedule(text):
            t.backbone.prefill_text(st.cache, ids[begin:end], int(begin), spk if begin == 0 else None)
            t.generate(st, mask, int(total) - len(st.codes), sampler)
        return np.stack(st.codes) if st.codes else np.zeros((0, t.dims.num_vq), np.int64)

    def decode_codes(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mel (100, 2n), 24 kHz wave) of audio codes (n, num_vq): DVAE decoder then Vocos + ISTFT."""
        mel = self.tts.decoder.codes_to_mel(np.asarray(codes))
        return mel, self.tts.decoder.mel_to_wav(mel)

    @property
    def tts(self):
        if self._tts is None:
            from edge.tts.generate import TTS

            self._tts = TTS(self.bundle, variant=self.options.tts_variant, ort=self.options.ort)
        return self._tts

    # --- official streaming API (delegates to one edge.streaming.StreamingSession) -----------------------------------
    @property
    def session(self):
        if getattr(self, "_session", None) is None:
            from edge.streaming import StreamingSession

            self._session = StreamingSession(self)
        return self._session

    def reset_session(self) -> None:
        self.session.reset_session()

    def streaming_prefill(self, session_id, msgs, **kwargs):
        """One 1-second unit (`["<unit>", frame?, audio_1s]`) or a system/user message into the session's cache."""
        return self.session.streaming_prefill(session_id, msgs, **kwargs)

    def streaming_generate(self, session_id, **kwargs):
        """Reply to what was prefilled: yields text and audio chunks (see StreamingSession)."""
        return self.session.streaming_generate(session_id, **kwargs)

    def close(self) -> None:
        self.llm.close()
