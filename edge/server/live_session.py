"""The model side of one realtime socket: a streaming session (edge/streaming.py) on the server's shared model.

Why a journal: llama.cpp's context holds ONE sequence, shared by every request and socket (engine.py). A live
session keeps its conversation in that KV cache between units, so any other job (an HTTP request, another socket)
overwrites it. `KVJournal` records everything the session wrote to the cache (token ids and the media embeddings
the encoders produced), and `Engine.exclusive()` says whether another job used the LLM since the session's last op;
if so the session rebuilds its cache from the journal before going on. The rebuild is exact (same tokens, same
embeddings, no encoder run; only the LLM prefill is repeated) and costs a prefill of the whole conversation.

Every method that touches the model runs in a worker thread and holds the engine's LLM lock for its whole length;
a socket calls them one at a time, in the order its messages arrived (edge/server/realtime.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.errors import ContextLengthExceededError, InvalidInputError
from edge.server.engine import AudioDelta, Engine, Finished, Job, PromptReady, TextDelta
from edge.streaming import UNIT_MARKER, RuleState, StreamingOptions, StreamingSession


# --- the journal --------------------------------------------------------------------------------------------------
class KVJournal:
    """The shared LLM as one live session uses it, recording every cache position the session writes.

    Supports what StreamingSession calls: append-only `prefill(reuse=False)`, `generate`, `truncate`, `reset`; other
    attributes (n_ctx, n_past, n_embd, token_id, ...) are the LLM's."""

    def __init__(self, llm):
        self.llm = llm
        self.segments: list = []  # token-id lists and (n, n_embd) float32 arrays, in cache order
        self.length = 0
        self._broken = False  # a call failed part-way: the cache may not match the journal

    def __getattr__(self, name):
        return getattr(self.llm, name)

    def reset(self) -> None:
        self.llm.reset()
        self.segments, self.length, self._broken = [], 0, False

    def prefill(self, segments: Sequence, *, reuse: bool = True, **kw):
        if reuse:
            raise RuntimeError("a live session only appends to its KV cache: call prefill(..., reuse=False).")
        try:
            out = self.llm.prefill(segments, reuse=False, **kw)
        except BaseException:
            self._broken = True
            raise
        for seg in segments:
            self._append(seg)
        return out

    def generate(self, *args, **kw):
        events = self.llm.generate(*args, **kw)
        try:
            for ev in events:
                if self.llm.n_past == self.length + 1:  # fed to the cache (not when the context is full)
                    self._append([ev.token])
                yield ev
        finally:
            events.close()

    def truncate(self, n: int) -> None:
        self.llm.truncate(n)
        self.cut(n)

    def cut(self, n: int) -> None:
        """Forget journal positions >= n (the cache itself is left alone: rebuild() or truncate() it)."""
        keep, total = [], 0
        for seg in self.segments:
            if total >= n:
                break
            take = min(len(seg), n - total)
            keep.append(seg if take == len(seg) else seg[:take])
            total += take
        self.segments, self.length = keep, total

    def tail(self, start: int) -> list:
        """The segments of positions >= start."""
        out, pos = [], 0
        for seg in self.segments:
            if pos + len(seg) > start:
                out.append(seg[max(0, start - pos):])
            pos += len(seg)
        return out

    def snapshot(self) -> tuple[list, int]:
        return [s if isinstance(s, np.ndarray) else list(s) for s in self.segments], self.length

    def restore(self, snapshot: tuple[list, int]) -> None:
        """Go back to a snapshot; the cache no longer matches, so the next step rebuilds it."""
        self.segments, self.length = snapshot
        self._broken = True

    def embedding_rows(self) -> int:
        return sum(len(s) for s in self.segments if isinstance(s, np.ndarray))

    def in_sync(self) -> bool:
        """The cache holds the journal: same length, same token ids, embeddings where the journal has them."""
        if self._broken or self.llm.n_past != self.length:
            return False
        want: list = []
        for seg in self.segments:
            want.extend([None] * len(seg) if isinstance(seg, np.ndarray) else seg)
        return self.llm.cached_tokens() == want

    def rebuild(self) -> None:
        """Put the journal back into the cache (after another job used the LLM): one LLM prefill, no encoder."""
        self._broken = True
        self.llm.reset()
        if self.segments:
            self.llm.prefill(self.segments, reuse=False)
        self._broken = False

    def _append(self, seg) -> None:
        if len(seg) == 0:
            return
        if isinstance(seg, np.ndarray) and seg.ndim == 2:
            self.segments.append(seg)
        elif self.segments and isinstance(self.segments[-1], list):
            self.segments[-1].extend(int(t) for t in seg)
        else:
            self.segments.append([int(t) for t in seg])
        self.length += len(seg)


class _OmniView:
    """The shared Omni as the session's StreamingSession sees it: the same encoders and TTS, the LLM journaled."""

    def __init__(self, omni, llm: KVJournal):
        self._omni, self.llm = omni, llm

    def __getattr__(self, name):
        return getattr(self._omni, name)


# --- the session --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One step of the session, as it sits in the KV cache (for usage counts, input.clear and tests).

    Attributes:
        kind: "open" (the session's first message), "input" (a unit, still image or text) or "reply" (generation
            prompt + reply tokens).
        n: cache positions it holds.
        image_tokens, audio_tokens: media placeholder positions among them.
        items: kinds of the content items ("unit", "image", "audio", "text").
        tokens, completed: a reply's tokens, and whether it ended with a terminator (else the next turn follows
            the official interruption rule).
    """

    kind: str
    n: int
    image_tokens: int = 0
    audio_tokens: int = 0
    items: tuple = ()
    tokens: tuple = ()
    completed: bool = False


@dataclass(frozen=True)
class _Mark:
    """Where the open user turn started: entries before it, the session flags then, and whether it holds audio."""

    entries: int
    rules: RuleState
    audio: bool = False


def _kind(item) -> str:
    if isinstance(item, str):
        return "unit" if item == UNIT_MARKER else "text"
    if isinstance(item, np.ndarray) and item.ndim == 1:
        return "audio"
    return "image"


class LiveSession:
    """One socket's streaming session. `opening` is the content of its first message (the system prompt, with the
    voice-cloning clip); it is written at the first input, and rewritten by set_opening() later."""

    def __init__(self, engine: Engine, opening: list, options: StreamingOptions | None = None):
        self.engine = engine
        self.journal = KVJournal(engine.omni.llm)
        self.stream = StreamingSession(_OmniView(engine.omni, self.journal), options)
        self._ids = (f"live-{uuid.uuid4().hex[:12]}-{k}" for k in itertools.count())
        self.session_id: str | None = None
        self.opening = list(opening)
        self.entries: list[Entry] = []
        self._opened = False
        self._turn: _Mark | None = None
        self.rebuilds = 0  # cache rebuilds after another job used the LLM
        self.closed = False

    # --- state ---------------------------------------------------------------------------------------------------
    def media_tokens(self) -> tuple[int, int]:
        return sum(e.image_tokens for e in self.entries), sum(e.audio_tokens for e in self.entries)

    def _ready(self, resident: bool) -> None:
        if self._opened and not (resident and self.journal.in_sync()):
            self.journal.rebuild()
            self.rebuilds += 1

    def _context_full(self, e: ContextLengthExceededError) -> ContextLengthExceededError:
        return ContextLengthExceededError(e.n_tokens, e.n_ctx, f"the conversation would need {e.n_tokens} tokens "
                                          f"but the context holds {e.n_ctx}: send session.reset to start a new one "
                                          "(or load the model with a larger n_ctx).")

    def _prefill(self, content: list, kind: str, session_id: str) -> Entry:
        from edge.audio_encoder import chunk_token_counts

        start, rows = self.journal.length, self.journal.embedding_rows()
        self.stream.streaming_prefill(session_id, [{"role": "user", "content": content}])
        media = self.journal.embedding_rows() - rows
        audio = sum(sum(chunk_token_counts(x.size)) for x in content if _kind(x) == "audio")
        return Entry(kind, self.journal.length - start, media - audio, audio, tuple(_kind(x) for x in content))

    def _open(self) -> None:
        """Write the first message; a conversation already in the cache is re-prefilled behind it (its embeddings
        are kept: only a new voice clip is encoded). The session flags carry over."""
        sid = next(self._ids)
        old = self.entries[0].n if self._opened else 0
        tail, rest, rules = self.journal.tail(old), self.entries[1:], self.stream.rules
        before = self.journal.snapshot()
        try:
            self.journal.reset()
            first = self._prefill(self.opening, "open", sid)  # a new session id: resets the cache and Whisper cache
            if tail:
                self.journal.prefill(tail, reuse=False)
                self.stream.rules = dataclasses.replace(rules, session_id=sid)
        except BaseException:  # e.g. the new first message does not fit: keep the session as it was
            self.journal.restore(before)
            self.stream.rules = rules
            raise
        self.entries = [first] + rest
        self.session_id, self._opened = sid, True

    # --- ops (worker threads) ------------------------------------------------------------------------------------
    def prefill(self, content: list) -> None:
        """Append one input (a 1-s unit, a still image, typed text) to the open user turn."""
        with self.engine.exclusive(self, encoders=True) as resident:
            if self.closed:
                return
            self._ready(resident)
            if not self._opened:
                self._open()
            mark = self._turn or _Mark(len(self.entries), self.stream.rules)
            try:
                entry = self._prefill(content, "input", self.session_id)
            except ContextLengthExceededError as e:
                raise self._context_full(e) from e
            self.entries.append(entry)
            self._turn = dataclasses.replace(mark, audio=mark.audio or "audio" in entry.items)

    def set_opening(self, opening: list) -> None:
        """New instructions or voice: rewrite the first message (now if the session has started)."""
        with self.engine.exclusive(self, encoders=True):
            self.opening = list(opening)
            if self.closed or not self._opened:
                return
            self._open()  # rebuilds the whole cache from the journal: whether it was still resident does not matter

    def clear(self) -> None:
        """Drop the open turn's input: the cache and the flags go back to the turn's start. The Whisper cache is
        empty at every turn start (reset after the first message and at every reply), so it is reset."""
        with self.engine.exclusive(self) as resident:
            if self.closed or self._turn is None:
                return
            mark, self._turn = self._turn, None
            n = sum(e.n for e in self.entries[:mark.entries])
            if resident and self.journal.in_sync():
                self.journal.truncate(n)
            else:
                self.journal.cut(n)
                self.journal.rebuild()
                self.rebuilds += 1
            del self.entries[mark.entries:]
            self.stream.rules = dataclasses.replace(mark.rules, session_id=self.session_id)  # a reopen renames it
            if mark.audio:
                self.stream.audio_stream.reset()

    def reset(self) -> None:
        """Forget the conversation; the next input starts a new session with the current opening."""
        with self.engine.exclusive(self):
            self.stream.reset_session()
            self.entries, self._opened, self._turn, self.session_id = [], False, None, None

    def close(self) -> None:
        self.closed = True  # ops still queued for the model return at once

    # --- a reply (an engine worker thread, through Job.live) -----------------------------------------------------
    def respond(self, job: Job, emit, cancel) -> Finished:
        """Append the generation prompt and stream the reply: a TextDelta per token, speech from the TTS fed
        3-token pieces (the official feed) while decoding. A reply cancelled before it starts leaves the turn open."""
        with self.engine.exclusive(self) as resident:
            if cancel.is_set() or self.closed:
                return Finished("", 0, "interrupted")
            if not self._opened or self._turn is None:
                raise InvalidInputError("nothing to answer: the turn's input was not prefilled (see the earlier "
                                        "error); send input.audio, input.image or input.text again.")
            self._ready(resident)
            llm, start = self.journal, self.journal.length
            try:
                reply = self.stream.start_reply(want_speaker=job.speak)
            except ContextLengthExceededError as e:
                raise self._context_full(e) from e
            emit(PromptReady(llm.length, *self.media_tokens()))
            room = llm.n_ctx - llm.length
            events = self.stream.reply_tokens(reply, job.sampling, max_new_tokens=min(job.max_new_tokens or room, room),
                                              min_new_tokens=job.min_new_tokens, should_stop=cancel.is_set)
            text: list[str] = []

            def tokens():
                for ev in events:
                    if ev.text:
                        text.append(ev.text)
                        emit(TextDelta(ev.text))
                    yield ev

            try:
                if job.speak and reply.spk_hidden is not None:
                    self._speak(self.stream.text_pieces(tokens()), reply.spk_hidden, job.tts_seed, emit, cancel)
                for _ in tokens():  # text only, or what the speech left (it stops early when cancelled)
                    pass
            finally:
                events.close()  # the session flags and the cache follow the reply however it ended
                self.entries.append(Entry("reply", llm.length - start, tokens=tuple(reply.tokens),
                                          completed=reply.completed))
                self._turn = None
        reason = "interrupted" if cancel.is_set() else reply.finish_reason
        return Finished("".join(text), len(reply.tokens), reason)

    def _speak(self, pieces, spk: np.ndarray, seed: int | None, emit, cancel) -> None:
        self.engine.speak_stream(pieces, spk, emit, cancel, seed)
