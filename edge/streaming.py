"""Streaming sessions: the official `streaming_prefill` / `streaming_generate` / `reset_session` (spec §4.2).

A session keeps one growing LLM KV cache. Each `streaming_prefill` call appends one message's content (in live use
one 1-s unit: `["<unit>", frame, audio_1s]`, the web demo's time-division multiplexing); its audio goes through the
Whisper encoder with the encoder's own KV cache, so nothing already heard or seen is encoded again.
`streaming_generate` appends the generation prompt and decodes the reply (text, and speech through the TTS).

What text joins the pieces is decided by the official rules, kept here as a pure state machine (`plan_prefill`,
`plan_generate`, `finish_generate` on a frozen `RuleState`), testable without models:
- new session id: reset everything; the message is rendered with the TTS chat template without generation
  prompt, `<|im_start|>{role}\\n{content}<|im_end|>\\n` (the official "add BOS" adds nothing: the Qwen2 tokenizer
  has no BOS token);
- first user message after that: `<|im_start|>user\\n` + content; following units: content only;
- first user message after a completed reply: `<|im_end|>\\n<|im_start|>user\\n` + content;
- after an interrupted reply (barge-in, or max_new_tokens reached): `<|tts_eos|><|im_end|>\\n<|im_start|>user\\n`;
- system / assistant messages: content only, and they reset the Whisper cache;
- generation prompt: `<|im_end|>\\n<|im_start|>assistant\\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`.

Whisper cache rules (official): reset at a new session and after its first prefill, before encoding a system or
assistant message, and when a reply is generated; `AudioStream` also resets when the 30-s position table is full.
The TTS keeps its ONNX sessions for the whole session; its KV cache is per reply, as in the official code.

Deviations, on purpose and documented:
- The official reply loop calls HF generate 3 tokens at a time, so the last sampled token of the last chunk is
  never fed to the cache; here every generated token is in the cache (the terminator is not: it is dropped, so the
  next turn's `<|im_end|>` prefix follows the reply exactly as officially).
- Strings in a message are user text (special-token strings in them stay characters), except the exact string
  `<unit>`, the unit marker, which is template text. A vocabulary without a `<unit>` token (the golden fixture's)
  spells it in plain tokens, as the official tokenizer does.
- Audio longer than 1 s (a voice prompt) is encoded whole with full attention when the Whisper cache is empty (the
  official result) but does not fill the cache; with a non-empty cache it goes through it in 1-s steps.
- `<|tts_eos|>` ends the spoken text for the rest of the reply (officially only within the same 3-token piece).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from edge import keys
from edge.errors import InvalidInputError
from edge.llm import TokenEvent
from edge.prompt import AUDIO_MARK, IMAGE_MARK, Media, Piece, Prompt, TrustedText
from edge.sampling import SamplingOptions

AUDIO_RATE = 16000  # Whisper input rate (spec §2.3)
UNIT_SECONDS = 1.0  # one TDM unit (web demo: 5 x 200-ms packets)
UNIT_SAMPLES = int(AUDIO_RATE * UNIT_SECONDS)
UNIT_MARKER = keys.UNIT
STREAM_MAX_SLICE_NUMS = 1  # streaming_prefill forces one slice per frame unless told otherwise
WARMUP_FRAME_SIZE = (640, 480)  # a common camera frame; at one slice per frame every size costs the same
LLM_CHUNK_TOKENS = 3  # llm_generate_chunk: `generate(max_new_tokens=3)` per step; the TTS gets pieces of 3 tokens
DEFAULT_MAX_NEW_TOKENS = 512  # streaming_generate default
STREAM_TERMINATORS = (keys.IM_END, keys.ENDOFTEXT)  # MiniCPMO.terminators: `<|tts_eos|>` does NOT stop a reply
GENERATION_PROMPT = (f"{keys.IM_END}\n{keys.IM_START}assistant\n"
                     f"{keys.SPK_BOS}{keys.SPK}{keys.SPK_EOS}{keys.TTS_BOS}")
AFTER_COMPLETED = f"{keys.IM_END}\n{keys.IM_START}user\n"
AFTER_INTERRUPTED = f"{keys.TTS_EOS}{keys.IM_END}\n{keys.IM_START}user\n"
NEW_USER = f"{keys.IM_START}user\n"
ROLES = ("system", "user", "assistant")


# --- the official prompt rules, as a pure state machine ------------------------------------------------------------
@dataclass(frozen=True)
class RuleState:
    """The official session flags (`MiniCPMO.reset_session`)."""

    session_id: str | None = None
    new_user_msg: bool = True
    llm_generated: bool = False
    llm_generate_completed: bool = False


@dataclass(frozen=True)
class PrefillPlan:
    """What one `streaming_prefill` call does around the message content.

    Attributes:
        new_session: reset the LLM and Whisper caches before anything else.
        prefix, suffix: template text around the content.
        reset_audio_before: drop the Whisper cache before encoding (system / assistant messages).
        reset_audio_after: drop it after encoding (the session's first prefill).
    """

    new_session: bool
    prefix: str
    suffix: str
    reset_audio_before: bool
    reset_audio_after: bool


def plan_prefill(state: RuleState, session_id: str, role: str) -> tuple[RuleState, PrefillPlan]:
    """Official `streaming_prefill` bookkeeping for one message of `role` in `session_id`."""
    if role not in ROLES:
        raise InvalidInputError(f"message role must be one of {ROLES}, got {role!r}.")
    first = state.session_id is None or session_id != state.session_id
    prefix, s = "", state
    if not first and s.new_user_msg and role == "user":
        if s.llm_generated:
            prefix = AFTER_COMPLETED if s.llm_generate_completed else AFTER_INTERRUPTED
        else:
            prefix = NEW_USER
        s = dataclasses.replace(s, new_user_msg=False)
    reset_before = role in ("system", "assistant")
    if reset_before:
        s = dataclasses.replace(s, new_user_msg=True)
    if first:
        return (RuleState(session_id=session_id),
                PrefillPlan(True, f"{keys.IM_START}{role}\n", f"{keys.IM_END}\n", True, True))
    return s, PrefillPlan(False, prefix, "", reset_before, False)


def plan_generate(state: RuleState) -> tuple[RuleState, str]:
    """Official `streaming_generate` bookkeeping: the generation prompt to append."""
    if state.session_id is None:
        raise InvalidInputError("streaming_generate needs a session: call streaming_prefill(session_id, msgs) first.")
    return dataclasses.replace(state, new_user_msg=True, llm_generated=True, llm_generate_completed=False), \
        GENERATION_PROMPT


def finish_generate(state: RuleState, completed: bool) -> RuleState:
    """A reply ended: `completed` only when a terminator was sampled (not on interruption or max_new_tokens)."""
    return dataclasses.replace(state, llm_generate_completed=bool(completed))


def expected_prompt_text(events: Sequence[tuple]) -> str:
    """The template/marker text the rules produce for an event script, content rendered by the caller.

    events: ("prefill", session_id, role, content_text) | ("generate", reply_text, completed) | ("reset",).
    Used by tests and docs to show the rules end to end without a model."""
    state, out = RuleState(), []
    for ev in events:
        if ev[0] == "reset":
            state = RuleState()
        elif ev[0] == "prefill":
            state, plan = plan_prefill(state, ev[1], ev[2])
            if plan.new_session:
                out.clear()
            out.append(plan.prefix + ev[3] + plan.suffix)
        elif ev[0] == "generate":
            state, text = plan_generate(state)
            out.append(text + ev[1])
            state = finish_generate(state, ev[2])
    return "".join(out)


# --- the session --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamingOptions:
    """Attributes:
    max_slice_nums: slices per image in streaming_prefill (official default 1).
    llm_chunk_tokens: LLM tokens per text piece handed to the TTS (official 3).
    terminators: tokens that end a reply (official: `<|im_end|>`, `<|endoftext|>`). Random-weight test models
        rarely sample them; tests add a frequent token (string or id) to exercise the completed-reply rule.
    """

    max_slice_nums: int = STREAM_MAX_SLICE_NUMS
    llm_chunk_tokens: int = LLM_CHUNK_TOKENS
    terminators: tuple[str | int, ...] = STREAM_TERMINATORS


@dataclass
class PrefillReport:
    """Attributes: tokens appended, media encoded, seconds spent encoding and in the LLM."""

    n_tokens: int
    n_media: int
    encode_seconds: float
    llm_seconds: float


@dataclass(frozen=True)
class EncoderTimings:
    """One warm-up pass of the encoders: seconds and LLM rows of a camera frame (None without vision) and of
    one 1-s audio unit."""

    image_seconds: float | None
    image_tokens: int
    audio_seconds: float
    audio_tokens: int


@dataclass
class StreamChunk:
    """One piece of a streamed reply: new text, and (with speech) a 24 kHz audio chunk."""

    text: str
    audio: np.ndarray | None = None
    sampling_rate: int | None = None


@dataclass
class Reply:
    """A started reply: logits of the last prompt position and the speaker hidden state at `<|spk|>`."""

    last_logits: np.ndarray
    spk_hidden: np.ndarray | None
    start_n_past: int
    tokens: list[int] = field(default_factory=list)
    completed: bool = False
    finish_reason: str = "running"


class StreamingSession:
    """One streaming conversation on a loaded `Omni` (batch 1, like the official model object)."""

    def __init__(self, omni, options: StreamingOptions | None = None, *, tts=None):
        self.omni = omni
        self.options = options or StreamingOptions()
        self._tts = tts
        self.rules = RuleState()
        self._audio_stream = None
        self.last_logits: np.ndarray | None = None  # after the latest prefill (the official listen/speak logits)
        self.encoder_calls = {"image": 0, "audio_step": 0, "audio_whole": 0}  # re-encoding would show here
        self.terminator_ids = [self._token(t) for t in self.options.terminators]

    def _token(self, piece: str | int) -> int:
        if isinstance(piece, (int, np.integer)):
            return int(piece)
        if piece in self.omni.special:
            return self.omni.special[piece]
        return self.omni.llm.token_id(piece)

    @property
    def tts(self):
        """The TTS (ONNX sessions loaded once per session object; its KV cache is per reply)."""
        if self._tts is None:
            self._tts = self.omni.tts
        return self._tts

    # --- session ---------------------------------------------------------------------------------------------
    def reset_session(self) -> None:
        """Forget everything (LLM KV cache, Whisper cache, flags); the next prefill starts a session."""
        self.rules = RuleState()
        self.omni.llm.reset()
        if self._audio_stream is not None:
            self._audio_stream.reset()

    @property
    def session_id(self) -> str | None:
        return self.rules.session_id

    @property
    def audio_stream(self):
        if self._audio_stream is None:
            self._audio_stream = self.omni.audio.stream()
        return self._audio_stream

    def load_encoders(self, *, vision: bool = True, speech: bool = True) -> None:
        """Create the ONNX sessions now rather than at first use: loading the full-size vision graph takes seconds,
        which the first 1-s unit of a live conversation would otherwise pay (measured: 38 s for the fp32 graph
        on 2 busy cores, bench/results/e2e-full-q4_k_m-20261128T085814Z.json)."""
        _ = self.audio_stream
        if vision:
            _ = self.omni.vision
        if speech:
            _ = self.tts

    def warm_up_encoders(self, *, vision: bool) -> EncoderTimings:
        """Run the encoders once on neutral input (a grey frame, a silent second) and time them: the first
        onnxruntime run pays its allocations here instead of in the first live unit, and the live governor
        starts from these costs. Leaves no state behind (the Whisper cache is reset; nothing is prefilled)."""
        from PIL import Image

        image_s, image_rows = None, 0
        if vision:
            t0 = time.perf_counter()
            frame = Image.new("RGB", WARMUP_FRAME_SIZE, (128, 128, 128))
            pre = self.omni.preprocess_image(frame, self.options.max_slice_nums, use_image_id=False)
            image_rows = self.omni.vision(pre).reshape(-1, self.omni.llm.n_embd).shape[0]
            image_s = time.perf_counter() - t0
        stream = self.audio_stream
        t0 = time.perf_counter()
        audio_rows = stream.step_audio(np.zeros(UNIT_SAMPLES, np.float32)).shape[0]
        audio_s = time.perf_counter() - t0
        stream.reset()
        return EncoderTimings(image_s, image_rows, audio_s, audio_rows)

    # --- prefill ---------------------------------------------------------------------------------------------
    def streaming_prefill(self, session_id, msgs: Sequence[dict], *, max_slice_nums: int | None = None) -> PrefillReport:
        """Append one message (`msgs` holds exactly one, as officially) to the session's KV cache."""
        if session_id is None:
            raise InvalidInputError("streaming_prefill needs a session_id (a new id starts a new session).")
        if len(msgs) != 1:
            raise InvalidInputError(f"streaming_prefill takes exactly one message per call, got {len(msgs)}; "
                                    "call it once per 1-s unit.")
        msg = msgs[0]
        role = msg.get("role")
        state, plan = plan_prefill(self.rules, str(session_id), role)
        content = msg.get("content", "")
        items = content if isinstance(content, (list, tuple)) else [content]
        pieces = [Piece(plan.prefix, True)] if plan.prefix else []
        slices = self.options.max_slice_nums if max_slice_nums is None else max_slice_nums
        for item in items:
            pieces.append(self._piece(item, slices))
        if plan.suffix:
            pieces.append(Piece(plan.suffix, True))
        prompt = self.omni.prompts.build_pieces(pieces)
        llm = self.omni.llm
        if plan.new_session:
            llm.reset()
            if self._audio_stream is not None:
                self._audio_stream.reset()
        if llm.n_past + len(prompt.ids) > llm.n_ctx:
            from edge.errors import ContextLengthExceededError

            raise ContextLengthExceededError(llm.n_past + len(prompt.ids), llm.n_ctx,
                                             f"the session holds {llm.n_past} tokens and this unit needs "
                                             f"{len(prompt.ids)} more, beyond the context ({llm.n_ctx}): start a new "
                                             "session (new session_id) or load with a larger n_ctx.")
        t0 = time.perf_counter()
        if plan.reset_audio_before and self._audio_stream is not None:
            self._audio_stream.reset()
        embeds = self._encode(prompt)
        if plan.reset_audio_after and self._audio_stream is not None:
            self._audio_stream.reset()
        t1 = time.perf_counter()
        self.last_logits, _ = llm.prefill(self.omni.segments(prompt, embeds), reuse=False)
        self.rules = state
        return PrefillReport(len(prompt.ids), len(prompt.media), t1 - t0, time.perf_counter() - t1)

    def _piece(self, item, max_slice_nums: int) -> Piece:
        from edge.audio_encoder import audio_placeholder

        if isinstance(item, str):
            return Piece(item, item == UNIT_MARKER or isinstance(item, TrustedText))  # get_sys_prompt's voice
        if isinstance(item, np.ndarray) and item.ndim == 1:
            wave = np.asarray(item, dtype=np.float32)
            if wave.size == 0:
                raise InvalidInputError("an audio item of a streaming unit is empty; send up to 1 s of 16 kHz audio.")
            return Piece(AUDIO_MARK, True, Media("audio", audio_placeholder(wave.size), {"wave": wave}))
        if (isinstance(item, np.ndarray) and item.ndim == 3) or (hasattr(item, "convert") and hasattr(item, "size")):
            pre = self.omni.preprocess_image(item, max_slice_nums, use_image_id=False)
            return Piece(IMAGE_MARK, True, Media("image", pre.placeholder, pre))
        raise InvalidInputError(f"cannot stream a {type(item).__name__}: a unit holds text, a PIL image (frame) "
                                "and a 1-D float32 16 kHz numpy array (audio).")

    def _encode(self, prompt: Prompt) -> list[np.ndarray]:
        out = []
        for media in prompt.media:
            if media.kind == "image":
                self.encoder_calls["image"] += 1
                out.append(self.omni.vision(media.payload).reshape(-1, self.omni.llm.n_embd))
            else:
                out.append(self._encode_audio(media.payload["wave"]))
        return out

    def _encode_audio(self, wave: np.ndarray) -> np.ndarray:
        stream = self.audio_stream
        if wave.size <= UNIT_SAMPLES:
            self.encoder_calls["audio_step"] += 1
            return stream.step_audio(wave)
        if stream.cache_length == 0:
            self.encoder_calls["audio_whole"] += 1
            return self.omni.audio.encode_audio(wave, chunked=False)
        parts = []
        for i in range(0, wave.size, UNIT_SAMPLES):
            self.encoder_calls["audio_step"] += 1
            parts.append(stream.step_audio(wave[i:i + UNIT_SAMPLES]))
        return np.concatenate(parts)

    # --- generation ------------------------------------------------------------------------------------------
    def start_reply(self, *, want_speaker: bool = True) -> Reply:
        """Append the generation prompt; returns its last logits and the `<|spk|>` hidden state."""
        state, text = plan_generate(self.rules)
        llm = self.omni.llm
        prompt = self.omni.prompts.build_pieces([Piece(text, True)])
        spk = [llm.n_past + b[0] for b in prompt.spk_bounds][-1:] if want_speaker else []
        if self._audio_stream is not None:
            self._audio_stream.reset()
        start = llm.n_past
        last, hidden = llm.prefill([prompt.ids], reuse=False, hidden_positions=spk)
        self.rules = state
        return Reply(last, hidden.get(spk[0]) if spk else None, start + len(prompt.ids))

    def reply_tokens(self, reply: Reply, sampling: SamplingOptions, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     min_new_tokens: int = 0, should_stop: Callable[[], bool] | None = None) -> Iterator[TokenEvent]:
        """Decode the reply; the session flags are updated however the loop ends (stop, limit, interruption,
        or the consumer closing the generator)."""
        llm = self.omni.llm
        try:
            for ev in llm.generate(reply.last_logits, sampling, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, stop_ids=self.terminator_ids,
                                   should_stop=should_stop):
                if ev.token in self.terminator_ids:
                    reply.completed = True
                    break
                reply.tokens.append(ev.token)
                yield ev
        finally:
            # The sampled terminator was fed by LLM.generate; officially it is not in the cache.
            llm.truncate(reply.start_n_past + len(reply.tokens))
            reply.finish_reason = "stop" if reply.completed else (
                "length" if len(reply.tokens) >= max_new_tokens else "interrupted")
            self.rules = finish_generate(self.rules, reply.completed)

    def text_pieces(self, events: Iterator[TokenEvent], out_text: list[str] | None = None) -> Iterator[str]:
        """Group token texts into pieces of `llm_chunk_tokens` tokens (the official TTS feed); text after
        `<|tts_eos|>` is not spoken. `out_text` collects every token's text as it is decoded."""
        tts_eos = self.omni.special.get(keys.TTS_EOS)
        buf, n, spoken = [], 0, True
        for ev in events:
            if out_text is not None:
                out_text.append(ev.text)
            if ev.token == tts_eos:
                spoken = False
            if not spoken:
                continue
            buf.append(ev.text)
            n += 1
            if n >= self.options.llm_chunk_tokens:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)

    def streaming_generate(self, session_id=None, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                           min_new_tokens: int = 0, sampling: bool = True, generate_audio: bool = True,
                           should_stop: Callable[[], bool] | None = None, seed: int | None = None,
                           **overrides) -> Iterator[StreamChunk]:
        """Official `streaming_generate`, in sequence (the orchestrator overlaps LLM and TTS instead): yields
        StreamChunk(text) pieces, or with generate_audio StreamChunk(text since the last chunk, 24 kHz audio).
        sampling=False decodes greedily with repetition penalty 1.2 (officially 3-beam search)."""
        if session_id is not None and self.rules.session_id is not None and str(session_id) != self.rules.session_id:
            raise InvalidInputError(f"session {session_id!r} is not the current one ({self.rules.session_id!r}); "
                                    "prefill it first.")
        opts = stream_sampling(sampling, seed, **overrides)
        reply = self.start_reply(want_speaker=generate_audio)
        events = self.reply_tokens(reply, opts, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                   should_stop=should_stop)
        if not generate_audio:
            try:
                for ev in events:
                    if ev.text:
                        yield StreamChunk(ev.text)
            finally:
                events.close()
            return
        text: list[str] = []
        sent = 0
        tts = self.tts
        audio = tts.stream(self.text_pieces(events, text), reply.spk_hidden)
        try:
            for chunk in audio:
                new = "".join(text[sent:])
                sent = len(text)
                if chunk.size:
                    yield StreamChunk(new, chunk, tts.sample_rate)
                elif new:  # the speech has ended; the text goes on
                    yield StreamChunk(new)
            if sent < len(text):
                yield StreamChunk("".join(text[sent:]))
        finally:
            audio.close()
            events.close()


def stream_sampling(sampling: bool, seed: int | None = None, **overrides) -> SamplingOptions:
    """Official streaming_generate sampling: top-p 0.8, top-k 100, temperature 0.7, repetition penalty 1.05;
    sampling=False -> greedy with repetition penalty 1.2 (the official code does 3-beam search)."""
    from edge.omni import GREEDY_REPETITION_PENALTY

    if sampling:
        base = SamplingOptions(seed=seed)
    else:
        base = SamplingOptions(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=GREEDY_REPETITION_PENALTY,
                               greedy=True, seed=seed)
    allowed = {"temperature", "top_p", "top_k", "repetition_penalty"}
    bad = set(overrides) - allowed
    if bad:
        raise InvalidInputError(f"unknown sampling option(s) {sorted(bad)}; allowed: {sorted(allowed)}.")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
