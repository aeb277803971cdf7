"""One model in memory, shared fairly by every request: admission slots, a FIFO wait queue, cancellation.

Why this shape: llama.cpp's context here holds ONE sequence, so token generation is serialised. A request
holds one of `concurrency` slots from admission to its last event; inside a slot the request decodes media,
runs the ONNX encoders (one request at a time, `_encode_lock`), then takes the LLM in arrival order
(`FairLock`, a ticket lock) for prefill + decode (+ streamed speech), and speaks a non-streamed reply after
releasing the LLM. With concurrency > 1 one request's encoding or speech overlaps another's decoding.
Requests beyond the slots wait in a FIFO queue of `max_queue`; beyond that `QueueFullError` (HTTP 429).

Cancellation: the async iterator of `Engine.run` sets a threading.Event when it is closed (client gone,
barge-in); the worker passes it to `LLM.generate(should_stop=...)` and checks it between speech chunks, so the
slot is freed within one token / one speech chunk. The slot is released when the worker thread ends.

Why not `Omni.chat`: it holds one coarse lock across encoding, decoding and speech, has no stop callback and
does not report prompt token counts; the steps below are the same calls it makes (build_prompt ->
media_embeddings -> segments -> llm.prefill -> llm.generate -> tts).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import re
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

import numpy as np

from edge.errors import ContextLengthExceededError
from edge.sampling import SamplingOptions
from edge.server.errors import QueueFullError
from edge.server.settings import ServerSettings

_END = object()
DEFAULT_N_CTX = 4096  # context when loaded without a device profile (the laptop profile's n_ctx)
WARMUP_TOKENS = 2  # one prefill + a decode step: the first llama.cpp calls allocate buffers
_WORD = re.compile(r"\S+\s*|\s+")  # how a fixed text is fed to the streaming TTS (word by word)


# Official get_sys_prompt(mode="audio_assistant") with a reference clip (spec §3.3): a user message around the clip.
CLONE_PROMPT = ("Clone the voice in the provided audio prompt.",
                "As an assistant, you will speak using this voice style.")


def clone_voice_message(ref_wave: np.ndarray) -> dict:
    """The official voice-cloning prompt for a 16 kHz reference clip (put it before the conversation)."""
    return {"role": "user", "content": [CLONE_PROMPT[0], ref_wave, CLONE_PROMPT[1]]}


# --- job and events ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """Attributes:
    messages: runtime messages (edge.omni content: str, PIL images, 16 kHz float32 arrays).
    prompt_kwargs: extra `Omni.build_prompt` options (max_slice_nums, use_image_id, omni_input, ...).
    sampling: the sampler settings (seed included).
    max_new_tokens: generation cap (None = until a stop token or the context is full).
    min_new_tokens: stop tokens are masked before this many tokens.
    stop: stop strings; the text up to the first match is returned, finish_reason "stop".
    speak: speak the reply with the TTS (switches the prompt to the TTS template).
    stream_audio: speech chunks while the text is generated (else one wave after the text).
    speak_text: no generation: speak this text with the speaker state of `messages` (audio/speech endpoint).
    tts_seed: seed of the speech-code sampler (None = fresh entropy); with it, speech is reproducible too.
    live: a live socket's turn (edge/server/realtime.py): `live(job, emit, cancel) -> Finished` answers from its
        own streaming session's KV cache, and `messages` only describe the turn's new input.
    """

    messages: list
    prompt_kwargs: dict = field(default_factory=dict)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    speak: bool = False
    stream_audio: bool = False
    speak_text: str | None = None
    tts_seed: int | None = None
    live: Callable | None = None


@dataclass
class PromptReady:
    """The prompt is encoded. Token counts include every image and audio placeholder token."""

    prompt_tokens: int
    image_tokens: int
    audio_tokens: int


@dataclass
class TextDelta:
    text: str


@dataclass
class AudioDelta:
    pcm: np.ndarray  # float32 mono
    sample_rate: int


@dataclass
class Finished:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "interrupted"


Event = PromptReady | TextDelta | AudioDelta | Finished


@dataclass
class EngineStats:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    completion_tokens: int = 0


# --- scheduling primitives -----------------------------------------------------------------------------------------
class FairLock:
    """A FIFO (ticket) lock for threads: waiters get the lock in the order they asked for it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Admission:
    """`slots` concurrent requests, then a FIFO queue of `max_queue` waiters (event-loop side, not thread-safe)."""

    def __init__(self, slots: int, max_queue: int):
        self.slots = slots
        self.max_queue = max_queue
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        if self.running < self.slots and not self._waiters:
            self.running += 1
            return
        if self.queued >= self.max_queue:
            raise QueueFullError(self.running, self.queued)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over (running is not decremented in between)
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot arrived just as we were cancelled: pass it on
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
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


class _Reply:
    """The reply text as emitted pieces, with the token count and finish reason once exhausted."""

    def __init__(self, events, stop_ids: list[int], stops: tuple[str, ...], emit, llm):
        self.events, self.stop_ids, self.emit, self.llm = events, set(stop_ids), emit, llm
        self.matcher = StopMatcher(stops)
        self.parts: list[str] = []
        self.n_tokens = 0
        self.finish_reason = "length"

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def _out(self, text: str) -> Iterator[str]:
        if text:
            self.parts.append(text)
            self.emit(TextDelta(text))
            yield text

    def pieces(self) -> Iterator[str]:
        hit = False
        try:
            for ev in self.events:
                if ev.token in self.stop_ids:
                    break
                self.n_tokens += 1
                out, hit = self.matcher.push(ev.text) if ev.text else ("", False)
                yield from self._out(out)
                if hit:
                    break
        finally:
            self.events.close()
        if hit:
            self.finish_reason = "stop"
            return
        yield from self._out(self.matcher.flush())
        reason = getattr(self.llm, "last_finish_reason", "length")
        self.finish_reason = {"context": "length"}.get(reason, reason)


# --- the engine ----------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, omni, settings: ServerSettings):
        self.omni = omni
        self.settings = settings
        self.admission = Admission(settings.concurrency, settings.max_queue)
        self.stats = EngineStats()
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="edge-gen")
        self._llm_lock = FairLock()
        self._encode_lock = threading.Lock()
        self._tts_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._llm_owner: weakref.ref | None = None  # who filled the KV cache last: a live session, None = a request

    @classmethod
    def load(cls, settings: ServerSettings, *, progress: bool = True) -> "Engine":
        from edge.default_bundle import resolve_bundle
        from edge.llm import LLMOptions
        from edge.omni import Omni, OmniOptions
        from edge.onnx_session import OrtOptions

        bundle = resolve_bundle(settings.bundle, progress=progress)
        if settings.profile is None and not settings.overrides:
            opts = OmniOptions(llm=LLMOptions(n_ctx=settings.n_ctx or DEFAULT_N_CTX, n_threads=settings.threads),
                               ort=OrtOptions(intra_op_threads=settings.threads))
            omni = Omni.load(bundle, opts)
        else:
            from edge.profiles import start_profile

            prof, hw = start_profile(bundle, settings.profile, settings.overrides, threads=settings.threads,
                                     n_ctx=settings.n_ctx, echo=print if progress else None)
            omni = Omni.load(bundle, profile=prof, hardware=hw)
        engine = cls(omni, settings)
        engine.warmup()
        return engine

    # --- introspection -------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.omni.llm.n_ctx

    def has_part(self, part: str) -> bool:
        return part in self.omni.bundle.parts

    def health(self) -> dict:
        s = self.stats
        return {"running": self.admission.running, "queued": self.admission.queued,
                "concurrency": self.admission.slots, "max_queue": self.admission.max_queue,
                "served": s.served, "cancelled": s.cancelled, "failed": s.failed, "rejected": s.rejected,
                "completion_tokens": s.completion_tokens}

    def warmup(self) -> None:
        """A tiny generation so that the first request does not pay llama.cpp's first-call allocations."""
        o = self.omni
        prompt = o.build_prompt([{"role": "user", "content": "hi"}])
        with self._llm_lock:
            self._llm_owner = None
            last, _ = o.llm.prefill(o.segments(prompt, []))
            for _ in o.llm.generate(last, SamplingOptions.greedy_decoding(), max_new_tokens=WARMUP_TOKENS):
                pass
            o.llm.reset()

    # --- live sessions (edge/server/realtime.py) ------------------------------------------------------------------
    @property
    def llm_owner(self):
        """The live session whose state the KV cache holds (None after any other job used the LLM)."""
        return self._llm_owner() if self._llm_owner is not None else None

    @contextlib.contextmanager
    def exclusive(self, owner, *, encoders: bool = False) -> Iterator[bool]:
        """The LLM (in FIFO order with requests; with `encoders`, the ONNX encoders too) for a caller that keeps
        its own state in the KV cache. Yields True when the cache still holds what `owner` left there (no other job
        used the LLM since); otherwise the owner must rebuild it. Held across a whole op, so nothing interleaves."""
        with self._llm_lock, (self._encode_lock if encoders else contextlib.nullcontext()):
            resident = self.llm_owner is owner
            self._llm_owner = weakref.ref(owner)
            yield resident

    @contextlib.contextmanager
    def speaker(self, seed: int | None) -> Iterator:
        """The shared TTS seeded for one reply, held for the reply's speech."""
        with self._tts_lock:
            yield self._seeded_tts(seed)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.omni.close()

    # --- running a job -------------------------------------------------------------------------------------------
    async def run(self, job: Job) -> AsyncIterator[Event]:
        """Events of one job. Raises QueueFullError before the first event when the queue is full, and the
        job's error (e.g. InvalidInputError, ContextLengthExceededError) where it happens. Closing the iterator
        early cancels the generation."""
        try:
            await self.admission.acquire()
        except QueueFullError:
            with self._stats_lock:
                self.stats.rejected += 1
            raise
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                cancel.set()

        try:
            fut = loop.run_in_executor(self._pool, self._work, job, emit, cancel)
        except BaseException:
            self.admission.release()
            raise
        fut.add_done_callback(lambda _: self.admission.release())
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()

    def run_sync(self, job: Job, on_event, cancel: threading.Event | None = None) -> Finished:
        """Run a job in the calling thread (no admission queue): for one-user front ends such as `chat`."""
        return self._generate(job, on_event, cancel or threading.Event())

    def _work(self, job: Job, emit, cancel: threading.Event) -> None:
        outcome = "failed"
        try:
            finished = self._generate(job, emit, cancel)
            outcome = "cancelled" if (cancel.is_set() or finished.finish_reason == "interrupted") else "served"
            with self._stats_lock:
                self.stats.completion_tokens += finished.completion_tokens
            emit(finished)
        except BaseException as e:  # handed to the request; the worker thread must survive
            emit(e)
        finally:
            with self._stats_lock:
                setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            emit(_END)

    def _ensure_parts(self, kinds: set[str], speak: bool) -> None:
        """Create the lazily built encoders once (Omni's properties are not thread-safe on first use)."""
        with self._encode_lock:
            if "image" in kinds:
                _ = self.omni.vision
            if "audio" in kinds:
                _ = self.omni.audio
        if speak:
            with self._tts_lock:
                _ = self.omni.tts

    def _generate(self, job: Job, emit, cancel: threading.Event) -> Finished:
        if job.live is not None:
            return job.live(job, emit, cancel)
        o = self.omni
        speak = job.speak or job.speak_text is not None
        kwargs = {**job.prompt_kwargs, **({"use_tts_template": True} if speak else {})}
        prompt = o.build_prompt(job.messages, **kwargs)
        n = len(prompt.ids)
        if n + 1 > self.n_ctx:
            raise ContextLengthExceededError(n + 1, self.n_ctx)
        self._ensure_parts({m.kind for m in prompt.media}, speak)
        with self._encode_lock:
            embeds = o.media_embeddings(prompt)
        count = {k: sum(s.end - s.start for s in prompt.spans if s.kind == k) for k in ("image", "audio")}
        emit(PromptReady(n, count["image"], count["audio"]))
        spk_pos = [prompt.spk_bounds[-1][0]] if speak and prompt.spk_bounds else []
        with self._llm_lock:
            if cancel.is_set():
                return Finished("", 0, "interrupted")
            self._llm_owner = None  # a live session's KV state is overwritten below
            if not self.settings.prompt_cache:
                o.llm.reset()
            elif spk_pos:  # a reused prefix has no hidden states: re-decode from the speaker position
                o.llm.truncate(min(o.llm.n_past, spk_pos[0]))
            last, hidden = o.llm.prefill(o.segments(prompt, embeds), hidden_positions=spk_pos)
            spk = hidden.get(spk_pos[0]) if spk_pos else None
            if job.speak_text is not None:
                text, n_tok, reason, spoken = job.speak_text, 0, "stop", False
            else:
                limit = self.n_ctx - n
                max_new = min(job.max_new_tokens or limit, limit)
                events = o.llm.generate(last, job.sampling, max_new_tokens=max_new,
                                        min_new_tokens=job.min_new_tokens, stop_ids=o.stop_ids(),
                                        should_stop=cancel.is_set)
                reply = _Reply(events, o.stop_ids(), job.stop, emit, o.llm)
                spoken = speak and job.stream_audio
                if spoken:
                    self.speak_stream(reply.pieces(), spk, emit, cancel, job.tts_seed)
                else:
                    for _ in reply.pieces():
                        pass
                text, n_tok, reason = reply.text, reply.n_tokens, reply.finish_reason
        if cancel.is_set():
            return Finished(text, n_tok, "interrupted")
        if speak and not spoken and text.strip():
            if job.stream_audio:
                self.speak_stream(iter(_WORD.findall(text)), spk, emit, cancel, job.tts_seed)
            else:
                with self._tts_lock:
                    wave = self._seeded_tts(job.tts_seed).synthesize(text, spk)
                emit(AudioDelta(wave, o.tts.sample_rate))
        return Finished(text, n_tok, "interrupted" if cancel.is_set() else reason)

    def _seeded_tts(self, seed: int | None):
        """The shared TTS with this request's sampler seed (call with `_tts_lock` held: the options are shared;
        the TTS builds a fresh sampler, hence a fresh RNG, per utterance)."""
        tts = self.omni.tts
        if tts.options.sampling.seed != seed:
            tts.options = dataclasses.replace(tts.options,
                                              sampling=dataclasses.replace(tts.options.sampling, seed=seed))
        return tts

    def speak_stream(self, pieces: Iterator[str], spk: np.ndarray, emit, cancel: threading.Event,
                     seed: int | None = None) -> None:
        with self.speaker(seed) as tts:
            chunks = tts.stream(pieces, spk)
            try:
                for chunk in chunks:
                    if chunk.size:
                        emit(AudioDelta(chunk, tts.sample_rate))
                    if cancel.is_set():
                        break
            finally:
                chunks.close()

