"""One conversation: its LLM KV sequence, its Whisper cache, and the only decode -> speech loop of the package.

Every caller (the official `chat()` and streaming API, the HTTP server, the realtime socket, live mode, the demo,
the terminal chat) runs a turn the same way: write content into the session (`prefill` appends, a `reply(prompt=,
replace=True)` rewrites the sequence reusing its cached prefix), then iterate `reply()`'s typed events (prompt
ready, text deltas, audio chunks, finished). Cancel with the `cancel` event or by closing the iterator.

The session keeps a log of what it wrote (token runs and the media embeddings), so that its position can be
snapshot and restored, and so that its sequence can be put back exactly (no encoder runs) when another session
used the runtime's single llama.cpp sequence in between (`Runtime.kv_owner`).
"""

from __future__ import annotations

import dataclasses
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from edge import keys
from edge.constants import UNIT_SAMPLES
from edge.errors import ContextLengthExceededError, InvalidInputError
from edge.events import AudioChunk, Event, Finished, PromptReady, TextDelta, Timing, Usage
from edge.prompt import Prompt
from edge.runtime import Runtime
from edge.sampling import SamplingOptions

LLM_PIECE_TOKENS = 3  # official `llm_generate_chunk`: the TTS is fed the reply 3 LLM tokens at a time
PIECE_QUEUE = 8  # text pieces between decode and an overlapped TTS: the LLM runs ahead at most ~24 tokens
POLL_SECONDS = 0.05  # how often a blocked worker looks at the cancel flag (bounds the reaction to a barge-in)
JOIN_SECONDS = 5.0  # an overlapped TTS thread that does not stop within this is reported
_WORD = re.compile(r"\S+\s*|\s+")  # how a fixed text is fed to the streaming TTS (word by word)
_END = object()
SPEECH_MODES = ("interleaved", "overlap", "after", "whole")


@dataclass(frozen=True)
class SpeechOptions:
    """Attributes:
    mode: how speech and decoding interleave. "interleaved": one thread, the TTS reads the reply's pieces as they
        are decoded (the official streaming loop); "overlap": the TTS runs on a thread of its own beside decoding
        (llama.cpp and onnxruntime release the GIL: live mode); "after": the reply is decoded first, then spoken as
        a stream (for comparison); "whole": one waveform synthesized after the text (official non-streamed chat()).
    seed: seed of the speech-code sampler (None = the TTS's own options).
    piece_tokens: LLM tokens per text piece handed to the TTS (official 3).
    text: speak this text instead of generating one (the speech endpoint).
    """

    mode: str = "interleaved"
    seed: int | None = None
    piece_tokens: int = LLM_PIECE_TOKENS
    text: str | None = None

    def __post_init__(self):
        if self.mode not in SPEECH_MODES:
            raise InvalidInputError(f"speech mode must be one of {SPEECH_MODES}, got {self.mode!r}.")


@dataclass(frozen=True)
class ReplyOptions:
    """Attributes:
    sampling: the LLM sampler (seed included).
    max_new_tokens: generation cap (None = until a terminator or the context is full).
    min_new_tokens: terminators are masked before this many tokens.
    stop_ids: tokens that end the reply (None = the bundle's terminators, `keys.TERMINATORS`).
    stop: stop strings; the text up to the first match is the reply, finish_reason "stop".
    speech: speak the reply (None = text only). The speaker is the hidden state at the last `<|spk|>` written.
    keep_terminator: leave the sampled terminator in the KV sequence (False = the official streaming loop, whose
        last token is never fed back: the next turn's `<|im_end|>` prefix follows the reply text).
    lend_cores: decode on the prefill thread count (`LLM.n_threads_batch`) while no TTS computes beside it: the
        whole of a text-only reply, and with "overlap" speech until the TTS's first step (it waits for 10 text
        tokens; live mode splits the cores between decode and TTS, and those idle cores speed up decoding).
    """

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    speech: SpeechOptions | None = None
    keep_terminator: bool = True
    lend_cores: bool = False


@dataclass
class PrefillReport:
    """Attributes: tokens appended, media encoded, seconds spent encoding and in the LLM."""

    n_tokens: int
    n_media: int
    encode_seconds: float
    llm_seconds: float


@dataclass(frozen=True)
class Snapshot:
    """A session's position: what its sequence holds and the state read from it (restore() goes back here)."""

    log: tuple
    length: int
    last_logits: np.ndarray | None
    speaker: np.ndarray | None
    image_tokens: int
    audio_tokens: int


@dataclass
class ReplyRecord:
    """The last reply as it entered the sequence (kept however the reply ended)."""

    tokens: list[int] = field(default_factory=list)
    completed: bool = False
    finish_reason: str = "running"


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.buf) + 1))
                    if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class _Tok:
    """One decoded token as the speech loop sees it: its shown text and its spoken text (None after tts_eos)."""

    text: str
    spoken: str | None
    token: int | None = None


def _put(q: queue.Queue, item, cancel: threading.Event) -> bool:
    while True:
        try:
            q.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            if cancel.is_set():
                return False


def _drain(q: queue.Queue, cancel: threading.Event) -> Iterator:
    while not cancel.is_set():
        try:
            item = q.get(timeout=POLL_SECONDS)
        except queue.Empty:
            continue
        if item is _END:
            return
        yield item


class Session:
    """One conversation on a `Runtime`. Its methods may be called from any thread, one call at a time."""

    def __init__(self, runtime: Runtime, *, tts=None):
        self.rt = runtime
        self._tts = tts  # a TTS of this conversation's own (other options); None = the runtime's
        self._log: list = []  # token-id lists and (n, hidden) float32 arrays, in sequence order
        self.length = 0
        self.last_logits: np.ndarray | None = None  # after the latest prefill (the official listen/speak logits)
        self.speaker: np.ndarray | None = None  # hidden state at the last `<|spk|>` written
        self.image_tokens = 0
        self.audio_tokens = 0
        self.last_reply = ReplyRecord()
        self._audio_stream = None
        self._broken = False  # a call failed part-way: the sequence may not hold the log
        self.rebuilds = 0  # times the sequence was put back after another session used the LLM
        self.encoder_calls = {"image": 0, "audio_step": 0, "audio_whole": 0}  # re-encoding would show here

    @property
    def llm(self):
        return self.rt.llm

    @property
    def tts(self):
        return self._tts if self._tts is not None else self.rt.tts

    # --- the sequence ------------------------------------------------------------------------------------------
    def _claim(self) -> None:
        """Make the runtime's sequence hold this session's log (call with the LLM lock held)."""
        llm = self.rt.llm
        if self.rt.kv_owner is self and not self._broken and llm.n_past == self.length:
            return
        self._broken = True
        llm.reset()
        if self._log:
            llm.prefill(self._log, reuse=False)
            self.rebuilds += 1
            self.rt.rebuilds += 1
        self.rt.kv_owner = self
        self._broken = False

    def reset(self) -> None:
        """Forget the conversation (KV sequence, Whisper cache, speaker)."""
        with self.rt.llm_lock:
            if self.rt.kv_owner is self:
                self.rt.llm.reset()
            self._log, self.length, self.last_logits, self.speaker = [], 0, None, None
            self.image_tokens = self.audio_tokens = 0
            self._broken = False
        if self._audio_stream is not None:
            self._audio_stream.reset()

    def snapshot(self) -> Snapshot:
        return Snapshot(tuple(s if isinstance(s, np.ndarray) else list(s) for s in self._log), self.length,
                        self.last_logits, self.speaker, self.image_tokens, self.audio_tokens)

    def restore(self, snap: Snapshot) -> None:
        """Go back to a snapshot (the sequence is cut, or rebuilt at the next call when it was not a prefix)."""
        with self.rt.llm_lock:
            prefix = snap.length <= self.length and self._keys(self._log)[:snap.length] == self._keys(list(snap.log))
            if self.rt.kv_owner is self and not self._broken and prefix:
                self.rt.llm.truncate(snap.length)
            else:
                self._broken = True
            self._log = [s if isinstance(s, np.ndarray) else list(s) for s in snap.log]
            self.length, self.last_logits, self.speaker = snap.length, snap.last_logits, snap.speaker
            self.image_tokens, self.audio_tokens = snap.image_tokens, snap.audio_tokens

    def tail(self, start: int, end: int | None = None) -> list:
        """The logged segments of positions [start, end) (to write them again behind new content)."""
        end = self.length if end is None else end
        out, pos = [], 0
        for seg in self._log:
            lo, hi = max(start, pos), min(end, pos + len(seg))
            if hi > lo:
                out.append(seg[lo - pos:hi - pos])
            pos += len(seg)
        return out

    def extend(self, segments: list, *, image_tokens: int = 0, audio_tokens: int = 0) -> None:
        """Append already encoded segments (token runs, embedding blocks) taken from a log, e.g. by `tail()`."""
        with self.rt.llm_lock:
            self._claim()
            self._broken = True
            self.last_logits, _ = self.rt.llm.prefill(segments, reuse=False)
            for seg in segments:
                self._append_log(seg)
            self._broken = False
            self.image_tokens += image_tokens
            self.audio_tokens += audio_tokens

    @staticmethod
    def _keys(segs: list) -> list:
        out: list = []
        for s in segs:
            out.extend([id(s)] * len(s) if isinstance(s, np.ndarray) else list(s))
        return out

    def _append_log(self, seg) -> None:
        if len(seg) == 0:
            return
        if isinstance(seg, np.ndarray) and seg.ndim == 2:
            self._log.append(seg)
        elif self._log and isinstance(self._log[-1], list):
            self._log[-1].extend(int(t) for t in seg)
        else:
            self._log.append([int(t) for t in seg])
        self.length += len(seg)

    # --- content -----------------------------------------------------------------------------------------------
    @property
    def audio_stream(self):
        """The Whisper encoder's streaming cache of this conversation (official streaming rules)."""
        if self._audio_stream is None:
            self._audio_stream = self.rt.audio.stream()
        return self._audio_stream

    def encode(self, prompt: Prompt, *, streaming: bool = False) -> list[np.ndarray]:
        """Media embeddings of a prompt. `streaming`: audio goes through this session's Whisper cache (one 1-s
        unit per step; a longer clip with an empty cache is encoded whole, as the official first message)."""
        if not streaming:
            return self.rt.media_embeddings(prompt)
        out = []
        with self.rt.encoder_lock:
            for media in prompt.media:
                if media.kind == "image":
                    self.encoder_calls["image"] += 1
                    out.append(self.rt.vision(media.payload).reshape(-1, self.rt.llm.n_embd))
                else:
                    out.append(self._stream_audio(media.payload["wave"]))
        return out

    def _stream_audio(self, wave: np.ndarray) -> np.ndarray:
        stream = self.audio_stream
        if wave.size <= UNIT_SAMPLES:
            self.encoder_calls["audio_step"] += 1
            return stream.step_audio(wave)
        if stream.cache_length == 0:
            self.encoder_calls["audio_whole"] += 1
            return self.rt.audio.encode_audio(wave, chunked=False)
        parts = []
        for i in range(0, wave.size, UNIT_SAMPLES):
            self.encoder_calls["audio_step"] += 1
            parts.append(stream.step_audio(wave[i:i + UNIT_SAMPLES]))
        return np.concatenate(parts)

    def _media_counts(self, prompt: Prompt) -> tuple[int, int]:
        return (sum(s.end - s.start for s in prompt.spans if s.kind == "image"),
                sum(s.end - s.start for s in prompt.spans if s.kind == "audio"))

    def prefill(self, prompt: Prompt, embeds: list[np.ndarray] | None = None, *, speaker: bool = False,
                streaming: bool = False, context_hint: str = "") -> PrefillReport:
        """Append `prompt` (its media encoded here unless `embeds` are given) to the sequence."""
        t0 = time.perf_counter()
        if embeds is None:
            embeds = self.encode(prompt, streaming=streaming)
        t1 = time.perf_counter()
        with self.rt.llm_lock:
            self._claim()
            self._append(prompt, embeds, speaker, context_hint)
        return PrefillReport(len(prompt.ids), len(prompt.media), t1 - t0, time.perf_counter() - t1)

    def _append(self, prompt: Prompt, embeds: list[np.ndarray], speaker: bool, context_hint: str = "") -> None:
        llm = self.rt.llm
        if self.length + len(prompt.ids) > llm.n_ctx:
            raise ContextLengthExceededError(
                self.length + len(prompt.ids), llm.n_ctx,
                f"the session holds {self.length} tokens and this input needs {len(prompt.ids)} more, beyond the "
                f"context ({llm.n_ctx}): {context_hint or 'start a new session'} or load with a larger n_ctx.")
        spk = [self.length + b[0] for b in prompt.spk_bounds][-1:] if speaker else []
        segs = self.rt.segments(prompt, embeds)
        self._broken = True
        last, hidden = llm.prefill(segs, reuse=False, hidden_positions=spk)
        for seg in segs:
            self._append_log(seg)
        self._broken = False
        self.last_logits = last
        if spk:
            self.speaker = hidden.get(spk[0])
        img, aud = self._media_counts(prompt)
        self.image_tokens += img
        self.audio_tokens += aud

    def _replace(self, prompt: Prompt, embeds: list[np.ndarray], speaker: bool, reuse_prefix: bool) -> None:
        """The sequence becomes `prompt`; its longest cached prefix is kept (chat-style multi-turn reuse)."""
        llm = self.rt.llm
        if len(prompt.ids) + 1 > llm.n_ctx:
            raise ContextLengthExceededError(len(prompt.ids) + 1, llm.n_ctx)
        spk = [prompt.spk_bounds[-1][0]] if speaker and prompt.spk_bounds else []
        segs = self.rt.segments(prompt, embeds)
        self.rt.kv_owner = self
        self._broken = True
        if not reuse_prefix:
            llm.reset()
        last, hidden = llm.prefill(segs, hidden_positions=spk)
        self._log, self.length = [], 0
        for seg in segs:
            self._append_log(seg)
        self._broken = False
        self.last_logits = last
        self.speaker = hidden.get(spk[0]) if spk else None
        self.image_tokens, self.audio_tokens = self._media_counts(prompt)

    # --- a turn ------------------------------------------------------------------------------------------------
    def reply(self, options: ReplyOptions | None = None, *, prompt: Prompt | None = None,
              embeds: list[np.ndarray] | None = None, replace: bool = False, reuse_prefix: bool = True,
              context_hint: str = "", cancel: threading.Event | None = None) -> Iterator[Event]:
        """Events of one reply. `prompt` (optional) is written first, in the same hold of the LLM: appended, or
        with `replace` the whole sequence (reusing its cached prefix unless `reuse_prefix=False`). Errors (e.g.
        ContextLengthExceededError) are raised from the iterator where they happen."""
        return self._reply(options or ReplyOptions(), prompt, embeds, replace, reuse_prefix, context_hint,
                           cancel or threading.Event())

    def _reply(self, o: ReplyOptions, prompt, embeds, replace, reuse_prefix, context_hint,
               cancel: threading.Event) -> Iterator[Event]:
        t0 = time.perf_counter()
        marks: dict[str, float] = {}
        sp = o.speech
        prompt_tokens = self.length
        if prompt is not None and embeds is None:
            embeds = self.encode(prompt)
        if sp is not None:
            _ = self.tts
        record = self.last_reply = ReplyRecord()
        lock = self.rt.llm_lock
        lock.__enter__()
        held = True
        try:
            if cancel.is_set():  # cancelled while waiting for the LLM: nothing is written
                record.finish_reason = "interrupted"
                yield Finished("", (), "interrupted", False, Usage(self.length), Timing(total=time.perf_counter() - t0))
                return
            if prompt is not None and replace:
                self._replace(prompt, embeds, sp is not None, reuse_prefix)
            else:
                self._claim()
                if prompt is not None:
                    self._append(prompt, embeds, sp is not None, context_hint)
            prompt_tokens = self.length
            yield PromptReady(prompt_tokens, self.image_tokens, self.audio_tokens)
            spk = self.speaker
            if sp is not None and spk is None:
                raise InvalidInputError("speech needs the speaker embedding from the `<|spk|>` position: write the "
                                        "prompt with the TTS template (chat(generate_audio=True) does).")
            text: list[str] = []
            if sp is not None and sp.text is not None:  # speak a given text: no generation
                lock.__exit__(None, None, None)
                held = False
                text.append(sp.text)
                record.finish_reason = "stop"
                yield from self._speak(_WORD.findall(sp.text) if sp.mode != "whole" else [], sp.text, sp, spk,
                                       cancel, marks, t0)
            else:
                computing = threading.Event() if sp is not None and sp.mode == "overlap" else None
                if sp is not None and sp.mode == "interleaved":
                    o = dataclasses.replace(o, lend_cores=False)  # the TTS runs between tokens on the same cores
                toks = self._tokens(o, cancel, record, text, marks, t0, computing)
                if sp is None:
                    for t in toks:
                        yield TextDelta(t.text, t.token)
                elif sp.mode == "interleaved":
                    yield from self._interleaved(toks, sp, spk, cancel, marks, t0)
                elif sp.mode == "overlap":
                    yield from self._overlapped(toks, sp, spk, cancel, marks, t0, computing)
                else:  # "after" / "whole": the text first, then the speech without the LLM
                    pieces, shown = [], deque()
                    for group in self._group(toks, sp, shown):
                        pieces.append(group)
                        while shown:
                            yield shown.popleft()
                    while shown:
                        yield shown.popleft()
                    lock.__exit__(None, None, None)
                    held = False
                    full = "".join(text)
                    if full.strip() and not cancel.is_set():
                        yield from self._speak(pieces, "".join(pieces), sp, spk, cancel, marks, t0)
        finally:
            if held:
                lock.__exit__(None, None, None)
        reason = "interrupted" if cancel.is_set() else record.finish_reason
        record.finish_reason = reason
        timing = Timing(marks.get("first_token"), marks.get("first_audio"), marks.get("decode_end"),
                        time.perf_counter() - t0)
        yield Finished("".join(text), tuple(record.tokens), reason, record.completed,
                       Usage(prompt_tokens, len(record.tokens), self.image_tokens,
                             self.audio_tokens), timing)

    def _tokens(self, o: ReplyOptions, cancel, record: ReplyRecord, text: list[str], marks, t0,
                computing: threading.Event | None = None) -> Iterator[_Tok]:
        """Decode the reply (LLM lock held by the caller); the sequence and the log follow it however it ends.
        With `o.lend_cores`, decode on every prefill thread until `computing` (the overlapped TTS started)."""
        llm = self.rt.llm
        share, lent = llm.n_threads, llm.n_threads_batch
        boosted = o.lend_cores and lent > share and not (computing is not None and computing.is_set())
        if boosted:
            llm.set_threads(lent)
        stop_ids = list(o.stop_ids) if o.stop_ids is not None else self.rt.stop_ids()
        stops = set(stop_ids)
        tts_eos = self.rt.special.get(keys.TTS_EOS)
        room = llm.n_ctx - self.length
        limit = min(o.max_new_tokens or room, room)
        matcher = StopMatcher(o.stop)
        start, spoken, hit = self.length, True, False
        self._broken = True
        events = llm.generate(self.last_logits, o.sampling, max_new_tokens=limit, min_new_tokens=o.min_new_tokens,
                              stop_ids=stop_ids, should_stop=cancel.is_set)
        try:
            for ev in events:
                if boosted and computing is not None and computing.is_set():
                    llm.set_threads(share)
                    boosted = False
                if ev.token in stops:
                    record.completed = True
                    break
                record.tokens.append(ev.token)
                if "first_token" not in marks:
                    marks["first_token"] = time.perf_counter() - t0
                if ev.token == tts_eos:
                    spoken = False
                out, hit = matcher.push(ev.text) if ev.text else ("", False)
                if out:
                    text.append(out)
                yield _Tok(out, out if spoken else None, ev.token)
                if hit:
                    break
            if not hit:
                rest = matcher.flush()
                if rest:
                    text.append(rest)
                    yield _Tok(rest, rest if spoken else None)
        finally:
            events.close()
            if boosted:
                llm.set_threads(share)
            marks["decode_end"] = time.perf_counter() - t0
            if record.completed and not o.keep_terminator:
                llm.truncate(start + len(record.tokens))
            fed = llm.cached_tokens()[start:]
            self._append_log([t for t in fed if t is not None])
            self._broken = llm.n_past != self.length
            reason = getattr(llm, "last_finish_reason", "length")
            record.finish_reason = "stop" if (record.completed or hit) else {"context": "length"}.get(reason, reason)

    def _group(self, toks: Iterator[_Tok], sp: SpeechOptions, shown: deque) -> Iterator[str]:
        """Spoken pieces of `piece_tokens` tokens; each token's shown text goes to `shown` as a TextDelta."""
        buf, n = [], 0
        for t in toks:
            shown.append(TextDelta(t.text, t.token))
            if t.spoken is None:
                continue
            buf.append(t.spoken)
            n += 1
            if n >= sp.piece_tokens:
                yield "".join(buf)
                buf, n = [], 0
        if buf:
            yield "".join(buf)

    def _audio(self, chunk: np.ndarray, marks, t0) -> AudioChunk:
        if "first_audio" not in marks:
            marks["first_audio"] = time.perf_counter() - t0
        return AudioChunk(chunk, self.tts.sample_rate)

    def _sampling(self, sp: SpeechOptions):
        base = self.tts.options.sampling
        return base if sp.seed is None or base.seed == sp.seed else dataclasses.replace(base, seed=sp.seed)

    def _interleaved(self, toks, sp: SpeechOptions, spk, cancel, marks, t0) -> Iterator[Event]:
        shown: deque = deque()
        tts = self.tts
        with self.rt.tts_lock:
            chunks = tts.stream(self._group(toks, sp, shown), spk, sampling=self._sampling(sp))
            try:
                for chunk in chunks:
                    while shown:
                        yield shown.popleft()
                    if chunk.size:
                        yield self._audio(chunk, marks, t0)
                    if cancel.is_set():
                        break
            finally:
                chunks.close()
        while shown:
            yield shown.popleft()

    def _speak(self, pieces: list[str], text: str, sp: SpeechOptions, spk, cancel, marks, t0) -> Iterator[Event]:
        """Speech of a finished text: one waveform ("whole") or streamed from its pieces."""
        tts = self.tts
        with self.rt.tts_lock:
            if sp.mode == "whole":
                wave = tts.synthesize(text, spk, self._sampling(sp))
                if not cancel.is_set():
                    yield self._audio(wave, marks, t0)
                return
            chunks = tts.stream(iter(pieces), spk, sampling=self._sampling(sp))
            try:
                for chunk in chunks:
                    if cancel.is_set():
                        break
                    if chunk.size:
                        yield self._audio(chunk, marks, t0)
            finally:
                chunks.close()

    def _overlapped(self, toks, sp: SpeechOptions, spk, cancel, marks, t0,
                    computing: threading.Event) -> Iterator[Event]:
        """Decode here, speak on a thread of its own; audio is handed over between tokens."""
        tts = self.tts
        pieces_q: queue.Queue = queue.Queue(PIECE_QUEUE)
        audio_q: queue.Queue = queue.Queue()
        stop = threading.Event()  # cancel, or the consumer left

        def speak() -> None:
            try:
                with self.rt.tts_lock:
                    stream = tts.stream(_drain(pieces_q, stop), spk, on_compute=computing.set,
                                        sampling=self._sampling(sp))
                    try:
                        for chunk in stream:
                            if stop.is_set() or cancel.is_set():
                                break
                            if chunk.size:
                                audio_q.put(chunk)
                    finally:
                        stream.close()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                audio_q.put(e)
            finally:
                audio_q.put(_END)

        worker = threading.Thread(target=speak, name="edge-tts", daemon=True)
        worker.start()
        shown: deque = deque()
        done = False

        def audio_ready(block: bool) -> Iterator[Event]:
            nonlocal done
            while not done:
                try:
                    item = audio_q.get(timeout=POLL_SECONDS) if block else audio_q.get_nowait()
                except queue.Empty:
                    if not block or cancel.is_set():
                        return
                    continue
                if item is _END:
                    done = True
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._audio(item, marks, t0)

        try:
            for piece in self._group(toks, sp, shown):
                while shown:
                    yield shown.popleft()
                if not _put(pieces_q, piece, cancel):
                    break
                yield from audio_ready(False)
            while shown:
                yield shown.popleft()
            _put(pieces_q, _END, cancel)
            yield from audio_ready(True)
        finally:
            stop.set()
            toks.close()
            worker.join(JOIN_SECONDS)
            if worker.is_alive():
                raise RuntimeError(f"the speech thread did not stop within {JOIN_SECONDS} s")
