"""`Omni`: the public face of the package, shaped like the official `MiniCPMO` model object.

It owns a `Runtime` (the loaded stages of one bundle) and two conversations on it: one for `chat()` (the whole
message list is written each call; the cached prefix is reused) and one for the official streaming API. New
conversations of their own: `new_session()`. The introspection methods (`preprocess_image`, `encode_image`,
`audio_features`, `encode_audio`, `build_prompt`, `prefill_logits`, `inputs_embeds`, TTS helpers) expose each
stage so that tests, benchmarks and curious users can compare any stage with the official implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edge.audio_features import log_mel_pieces
from edge.bundle import Bundle
from edge.constants import AUDIO_SAMPLE_RATE
from edge.content import slice_options, wave_16k
from edge.errors import InvalidInputError
from edge.events import AudioChunk, Finished, TextDelta
from edge.image_preprocess import preprocess_image
from edge.io.images import load_image
from edge.io.speaker import write_wav
from edge.options import OmniOptions
from edge.profiles import Hardware, profile_for_run
from edge.profiles import check_memory as check
from edge.prompt import Prompt
from edge.runtime import Runtime
from edge.sampling import official_sampling
from edge.session import ReplyOptions, Session, SpeechOptions
from edge.streaming import StreamChunk, StreamingSession
from edge.tts.backbone import build_text_mask
from edge.tts.sampling import SamplingOptions as CodeSampling
from edge.tts.text import prepare_tts_text
from edge.voice import load_reference_clip, sys_prompt

__all__ = ["ChatResult", "Omni", "OmniOptions", "StreamChunk"]


@dataclass
class ChatResult:
    text: str
    tokens: list[int]
    finish_reason: str
    spk_embed: np.ndarray | None = None
    audio: np.ndarray | None = None
    sampling_rate: int | None = None


class Omni:
    """A bundle loaded for chat. Calls on one conversation are serialised by the runtime's LLM lock."""

    def __init__(self, bundle: Bundle, options: OmniOptions | None = None):
        self.runtime = Runtime(bundle, options)
        self.profile = None  # the edge.profiles.Profile it was loaded under (Omni.load with a profile)
        self._chat = Session(self.runtime)
        self._streaming: StreamingSession | None = None

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
        hw = hardware or Hardware.detect()
        prof = profile_for_run(profile or "auto", overrides.items(), hw=hw).for_bundle(b)
        if options is not None:
            prof = prof.matching(options)
        if check_memory:
            check(b, prof, hw)
        omni = cls(b, options or prof.omni_options())
        omni.profile = prof
        return omni

    # --- what is loaded ----------------------------------------------------------------------------------------
    @property
    def bundle(self) -> Bundle:
        return self.runtime.bundle

    @property
    def options(self) -> OmniOptions:
        return self.runtime.options

    @property
    def llm(self):
        return self.runtime.llm

    @property
    def special(self) -> dict[str, int]:
        return self.runtime.special

    @property
    def prompts(self):
        return self.runtime.prompts

    @property
    def random_weights(self) -> bool:
        return self.runtime.random_weights

    @property
    def vision(self):
        return self.runtime.vision

    @property
    def audio(self):
        return self.runtime.audio

    @property
    def tts(self):
        return self.runtime.tts

    def new_session(self) -> Session:
        """A conversation of its own on this model (its own KV sequence state and Whisper cache)."""
        return Session(self.runtime)

    def stop_ids(self) -> list[int]:
        return self.runtime.stop_ids()

    # --- stage by stage --------------------------------------------------------------------------------------------
    def preprocess_image(self, image, max_slice_nums: int | None = None, *, use_image_id: bool = True,
                         image_idx: int = 0):
        if max_slice_nums is None:
            max_slice_nums = self.options.max_slice_nums
        return preprocess_image(load_image(image), slice_options(max_slice_nums, use_image_id), image_idx=image_idx)

    def encode_image(self, image, max_slice_nums: int | None = None) -> np.ndarray:
        """(n_slices, 64, hidden) embeddings of one image."""
        pre = image if hasattr(image, "tgt_sizes") else self.preprocess_image(image, max_slice_nums)
        return self.vision(pre)

    def audio_features(self, wave, sr: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
        """Whisper log-mel (80, frames) of the first 30-s piece (what the official processor computes)."""
        pieces = log_mel_pieces(self._wave16k(wave, sr))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)

    def encode_audio(self, wave, sr: int = AUDIO_SAMPLE_RATE, chunked: bool = True) -> np.ndarray:
        """(n_tokens, hidden) embeddings of a wave (25 per second)."""
        return self.audio.encode_audio(self._wave16k(wave, sr), chunked=chunked)

    @staticmethod
    def _wave16k(wave, sr: int) -> np.ndarray:
        return wave_16k((wave, sr) if isinstance(wave, np.ndarray) else wave)

    def build_prompt(self, msgs: Sequence[dict], **kwargs) -> Prompt:
        """Exactly what `chat()` feeds the LLM: prompt text, ids, image/audio spans, speaker bounds, media
        (keywords: max_slice_nums, use_image_id, chunk_input, omni_input, use_tts_template,
        add_generation_prompt)."""
        return self.runtime.build_prompt(msgs, **kwargs)

    def media_embeddings(self, prompt: Prompt) -> list[np.ndarray]:
        return self.runtime.media_embeddings(prompt)

    def segments(self, prompt: Prompt, embeds: list[np.ndarray] | None = None) -> list:
        """LLM input: token-id runs and media embedding blocks (computed here unless given)."""
        return self.runtime.segments(prompt, self.media_embeddings(prompt) if embeds is None else embeds)

    def inputs_embeds(self, msgs, **chat_kwargs) -> np.ndarray:
        """(S, hidden) LLM input embeddings (token embeddings with media written in), as `get_vllm_embedding`
        + `get_omni_embedding` build them. Token rows come from the GGUF's table (dequantized if needed)."""
        return self.token_embeddings(self.segments(self.build_prompt(msgs, **chat_kwargs)))

    def token_embeddings(self, segments) -> np.ndarray:
        """Segments (token-id runs and embedding blocks) -> (S, hidden) rows, as the LLM sees them."""
        return self.llm.input_rows(segments)

    def prefill_logits(self, msgs, *, all_positions: bool = False, **chat_kwargs) -> np.ndarray:
        """Logits of the prefill `chat()` runs: the last position (or every position with all_positions)."""
        prompt = self.build_prompt(msgs, **chat_kwargs)
        segs = self.segments(prompt)
        with self.runtime.llm_lock:
            self.runtime.kv_owner = None
            self.llm.reset()
            logits, _ = self.llm.prefill(segs, logits="all" if all_positions else "last")
            return logits

    # --- chat ----------------------------------------------------------------------------------------------------
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
        opts = official_sampling(sampling, seed, temperature=temperature, top_p=top_p, top_k=top_k,
                                 repetition_penalty=repetition_penalty)
        prompt = self.build_prompt(msgs, max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                   chunk_input=chunk_input, omni_input=omni_input,
                                   use_tts_template=use_tts_template or generate_audio)
        speech = None
        if generate_audio:
            speech = SpeechOptions(mode="interleaved" if stream else "whole")
        events = self._chat.reply(ReplyOptions(sampling=opts, max_new_tokens=max_new_tokens,
                                               min_new_tokens=min_new_tokens, speech=speech),
                                  prompt=prompt, replace=True)
        if stream and generate_audio:
            return self._speech_chunks(events)
        if stream and not return_dict:
            return (ev.text for ev in events if isinstance(ev, TextDelta) and ev.text)
        audio: list[np.ndarray] = []
        finished = None
        for ev in events:
            if isinstance(ev, AudioChunk):
                audio.append(ev.pcm)
            elif isinstance(ev, Finished):
                finished = ev
        result = ChatResult(finished.text, list(finished.tokens), finished.finish_reason)
        if generate_audio:
            result.spk_embed = self._chat.speaker
            result.audio = np.concatenate(audio) if audio else np.zeros(0, np.float32)
            result.sampling_rate = self.tts.sample_rate
            if output_audio_path:
                write_wav(output_audio_path, result.audio, result.sampling_rate)
        return result if (return_dict or generate_audio) else result.text

    @staticmethod
    def _speech_chunks(events) -> Iterator[StreamChunk]:
        """Text pieces and 24 kHz audio chunks as they become ready: the TTS reads the LLM's pieces lazily, so
        speech starts after the first 10 TTS text tokens, not after the whole reply."""
        for ev in events:
            if isinstance(ev, TextDelta) and ev.text:
                yield StreamChunk(ev.text)
            elif isinstance(ev, AudioChunk):
                yield StreamChunk("", ev.pcm, ev.sample_rate)

    def get_sys_prompt(self, ref_audio=None, mode: str = "audio_assistant", language: str = "en") -> dict:
        """The official voice system message (default voice, or cloning from a 16 kHz reference clip); put it
        first in `msgs` and call chat(..., generate_audio=True)."""
        if ref_audio is not None and not isinstance(ref_audio, np.ndarray):
            ref_audio = load_reference_clip(ref_audio)
        return sys_prompt(ref_audio, mode, language)

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

    # --- official streaming API (one edge.streaming.StreamingSession) ------------------------------------------------
    @property
    def session(self) -> StreamingSession:
        if self._streaming is None:
            self._streaming = StreamingSession(Session(self.runtime))
        return self._streaming

    def reset_session(self) -> None:
        self.session.reset_session()

    def streaming_prefill(self, session_id, msgs, **kwargs):
        """One 1-second unit (`["<unit>", frame?, audio_1s]`) or a system/user message into the session's cache."""
        return self.session.streaming_prefill(session_id, msgs, **kwargs)

    def streaming_generate(self, session_id, **kwargs):
        """Reply to what was prefilled: yields text and audio chunks (see StreamingSession)."""
        return self.session.streaming_generate(session_id, **kwargs)

    def close(self) -> None:
        self.runtime.close()
