"""The model side of one realtime socket: a streaming conversation (edge/streaming.py) on a `Session` of its own.

The session keeps its content in the runtime's KV sequence between units; when an HTTP request or another socket
used the model in between, the session puts its sequence back from its own log (exact: same tokens, same
embeddings, no encoder run; edge/session.py). Entries record what each step added, for usage counts, input.clear
and tests. A socket calls these methods one at a time, in the order its messages arrived (edge/server/realtime.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import uuid
from dataclasses import dataclass

import numpy as np

from edge.errors import ContextLengthExceededError, InvalidInputError
from edge.events import Finished, PromptReady, Usage
from edge.server.engine import Engine, Job, forward
from edge.session import Session, Snapshot, SpeechOptions
from edge.streaming import StreamingOptions, StreamingSession
from edge.streaming_rules import UNIT_MARKER, RuleState


@dataclass(frozen=True)
class Entry:
    """One step of the session, as it sits in the KV sequence.

    Attributes:
        kind: "open" (the session's first message), "input" (a unit, still image or text) or "reply" (generation
            prompt + reply tokens).
        n: sequence positions it holds.
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
    """Where the open user turn started: entries before it, the session position and flags then, and whether the
    turn holds audio."""

    entries: int
    position: Snapshot
    rules: RuleState
    audio: bool = False


def _kind(item) -> str:
    if isinstance(item, str):
        return "unit" if item == UNIT_MARKER else "text"
    if isinstance(item, np.ndarray) and item.ndim == 1:
        return "audio"
    return "image"


def _context_full(e: ContextLengthExceededError) -> ContextLengthExceededError:
    return ContextLengthExceededError(e.n_tokens, e.n_ctx, f"the conversation would need {e.n_tokens} tokens but "
                                      f"the context holds {e.n_ctx}: send session.reset to start a new one (or "
                                      "load the model with a larger n_ctx).")


class LiveSession:
    """One socket's streaming conversation. `opening` is the content of its first message (the system prompt, with
    the voice-cloning clip); it is written at the first input, and rewritten by set_opening() later."""

    def __init__(self, engine: Engine, opening: list, options: StreamingOptions | None = None):
        self.engine = engine
        self.session = Session(engine.runtime)
        self.stream = StreamingSession(self.session, options)
        self._ids = (f"live-{uuid.uuid4().hex[:12]}-{k}" for k in itertools.count())
        self.session_id: str | None = None
        self.opening = list(opening)
        self.entries: list[Entry] = []
        self._opened = False
        self._turn: _Mark | None = None
        self._lock = threading.Lock()  # socket ops and the reply (an engine worker) never interleave
        self.closed = False

    @property
    def rebuilds(self) -> int:
        """How often the session put its KV sequence back after another job used the model."""
        return self.session.rebuilds

    def media_tokens(self) -> tuple[int, int]:
        return sum(e.image_tokens for e in self.entries), sum(e.audio_tokens for e in self.entries)

    def _prefill(self, content: list, kind: str, session_id: str) -> Entry:
        s = self.session
        start, img, aud = s.length, s.image_tokens, s.audio_tokens
        self.stream.streaming_prefill(session_id, [{"role": "user", "content": content}])
        if kind == "open":  # a new session id resets the counts
            start, img, aud = 0, 0, 0
        return Entry(kind, s.length - start, s.image_tokens - img, s.audio_tokens - aud,
                     tuple(_kind(x) for x in content))

    def _open(self) -> None:
        """Write the first message; a conversation already in the sequence is written again behind it (its
        embeddings are kept: only a new voice clip is encoded). The session flags carry over."""
        sid = next(self._ids)
        s, rules, before, turn = self.session, self.stream.rules, self.session.snapshot(), self._turn
        rest = self.entries[1:]
        split = len(rest) if turn is None else turn.entries - 1  # entries before the open turn
        n_open = self.entries[0].n if self._opened else 0
        n_split = n_open + sum(e.n for e in rest[:split])
        parts = [(s.tail(n_open, n_split), rest[:split]), (s.tail(n_split), rest[split:])]
        try:
            first = self._prefill(self.opening, "open", sid)  # a new session id: resets the sequence and caches
            if self._opened:
                self.stream.rules = dataclasses.replace(rules, session_id=sid)
                for i, (segments, entries) in enumerate(parts):
                    if i == 1 and turn is not None:  # the open turn now starts here
                        self._turn = dataclasses.replace(turn, position=s.snapshot(),
                                                         rules=dataclasses.replace(turn.rules, session_id=sid))
                    s.extend(segments, image_tokens=sum(e.image_tokens for e in entries),
                             audio_tokens=sum(e.audio_tokens for e in entries))
        except BaseException:  # e.g. the new first message does not fit: keep the session as it was
            s.restore(before)
            self.stream.rules, self._turn = rules, turn
            raise
        self.entries = [first] + rest
        self.session_id, self._opened = sid, True

    # --- ops (the socket's worker thread) ------------------------------------------------------------------------
    def prefill(self, content: list) -> None:
        """Append one input (a 1-s unit, a still image, typed text) to the open user turn."""
        with self._lock:
            if self.closed:
                return
            if not self._opened:
                self._open()
            mark = self._turn or _Mark(len(self.entries), self.session.snapshot(), self.stream.rules)
            try:
                entry = self._prefill(content, "input", self.session_id)
            except ContextLengthExceededError as e:
                raise _context_full(e) from e
            self.entries.append(entry)
            self._turn = dataclasses.replace(mark, audio=mark.audio or "audio" in entry.items)

    def set_opening(self, opening: list) -> None:
        """New instructions or voice: rewrite the first message (now if the session has started)."""
        with self._lock:
            self.opening = list(opening)
            if self.closed or not self._opened:
                return
            self._open()

    def clear(self) -> None:
        """Drop the open turn's input: the sequence and the flags go back to the turn's start. The Whisper cache is
        empty at every turn start (reset after the first message and at every reply), so it is reset."""
        with self._lock:
            if self.closed or self._turn is None:
                return
            mark, self._turn = self._turn, None
            self.session.restore(mark.position)
            del self.entries[mark.entries:]
            self.stream.rules = dataclasses.replace(mark.rules, session_id=self.session_id)
            if mark.audio:
                self.stream.audio_stream.reset()

    def reset(self) -> None:
        """Forget the conversation; the next input starts a new session with the current opening."""
        with self._lock:
            self.stream.reset_session()
            self.entries, self._opened, self._turn, self.session_id = [], False, None, None

    def close(self) -> None:
        self.closed = True  # ops still queued for the model return at once

    # --- a reply (an engine worker thread, through Job.live) -----------------------------------------------------
    def respond(self, job: Job, emit, cancel) -> Finished:
        """Append the generation prompt and stream the reply (text deltas, speech from the TTS fed 3-token pieces
        while decoding). A reply cancelled before it starts leaves the turn open."""
        with self._lock:
            if cancel.is_set() or self.closed:
                return Finished("", (), "interrupted", False, Usage(self.session.length))
            if not self._opened or self._turn is None:
                raise InvalidInputError("nothing to answer: the turn's input was not prefilled (see the earlier "
                                        "error); send input.audio, input.image or input.text again.")
            s, start = self.session, self.session.length
            room = s.llm.n_ctx - s.length
            speech = SpeechOptions(seed=job.tts_seed) if job.speak else None
            events = self.stream.reply(job.sampling, max_new_tokens=min(job.max_new_tokens or room, room),
                                       min_new_tokens=job.min_new_tokens, speech=speech, cancel=cancel)
            started = False

            def watched(ev):
                nonlocal started
                started = started or isinstance(ev, PromptReady)
                emit(ev)

            try:
                finished = forward(events, watched)
            except ContextLengthExceededError as e:
                raise _context_full(e) from e
            finally:
                if started:
                    self.entries.append(Entry("reply", s.length - start, tokens=tuple(s.last_reply.tokens),
                                              completed=s.last_reply.completed))
                    self._turn = None
        return finished
