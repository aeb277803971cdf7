"""One model in memory, shared fairly by every request: admission slots, a FIFO wait queue, cancellation.

A request holds one of `concurrency` slots from admission to its last event. Inside a slot it decodes media, then
runs one turn on a `Session` of its own (edge/session.py): the encoders, the LLM and the TTS are shared by the
runtime's policy (edge/runtime.py: LLM work in arrival order, one ONNX run per stage at a time), so with
concurrency > 1 one request's encoding or non-streamed speech overlaps another's decoding. Requests beyond the
slots wait in a FIFO queue of `max_queue`; beyond that `QueueFullError` (HTTP 429).

Cancellation: the async iterator of `Engine.run` sets a threading.Event when it is closed (client gone,
barge-in); the session checks it before every token and between speech chunks, so the slot is freed within one
token / one speech chunk. The slot is released when the worker thread ends.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from edge.default_bundle import resolve_bundle
from edge.errors import ContextLengthExceededError
from edge.events import AudioChunk, Event, Finished, PromptReady, TextDelta
from edge.omni import Omni
from edge.onnx_session import OrtOptions
from edge.options import LLMOptions, OmniOptions
from edge.profiles import start_profile
from edge.sampling import SamplingOptions
from edge.server.errors import QueueFullError
from edge.server.settings import ServerSettings
from edge.session import ReplyOptions, Session, SpeechOptions

__all__ = ["AudioChunk", "Engine", "Event", "Finished", "Job", "PromptReady", "TextDelta", "forward"]

_END = object()
DEFAULT_N_CTX = 4096  # context when loaded without a device profile (the laptop profile's n_ctx)
WARMUP_TOKENS = 2  # one prefill + a decode step: the first llama.cpp calls allocate buffers


@dataclass(frozen=True)
class Job:
    """Attributes:
    messages: runtime messages (edge.omni content: str, PIL images, 16 kHz float32 arrays).
    prompt_kwargs: extra `Runtime.build_prompt` options (max_slice_nums, use_image_id, omni_input, ...).
    sampling: the sampler settings (seed included).
    max_new_tokens: generation cap (None = until a stop token or the context is full).
    min_new_tokens: stop tokens are masked before this many tokens.
    stop: stop strings; the text up to the first match is returned, finish_reason "stop".
    speak: speak the reply with the TTS (switches the prompt to the TTS template).
    stream_audio: speech chunks while the text is generated (else one wave after the text).
    speak_text: no generation: speak this text with the speaker state of `messages` (audio/speech endpoint).
    tts_seed: seed of the speech-code sampler (None = fresh entropy); with it, speech is reproducible too.
    live: a live socket's turn (edge/server/realtime.py): `live(job, emit, cancel) -> Finished` answers from its
        own streaming session, and `messages` only describe the turn's new input.
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

    def speech(self) -> SpeechOptions | None:
        if not (self.speak or self.speak_text is not None):
            return None
        return SpeechOptions(mode="interleaved" if self.stream_audio else "whole", seed=self.tts_seed,
                             text=self.speak_text)


@dataclass
class EngineStats:
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    completion_tokens: int = 0


# --- admission -----------------------------------------------------------------------------------------------------
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


# --- the engine ----------------------------------------------------------------------------------------------------
class Engine:
    def __init__(self, omni: Omni, settings: ServerSettings):
        self.omni = omni
        self.runtime = omni.runtime
        self.settings = settings
        self.admission = Admission(settings.concurrency, settings.max_queue)
        self.stats = EngineStats()
        self._pool = ThreadPoolExecutor(max_workers=settings.concurrency, thread_name_prefix="edge-gen")
        self._stats_lock = threading.Lock()

    @classmethod
    def load(cls, settings: ServerSettings, *, progress: bool = True) -> "Engine":
        bundle = resolve_bundle(settings.bundle, progress=progress)
        if settings.profile is None and not settings.overrides:
            opts = OmniOptions(llm=LLMOptions(n_ctx=settings.n_ctx or DEFAULT_N_CTX, n_threads=settings.threads),
                               ort=OrtOptions(intra_op_threads=settings.threads))
            omni = Omni.load(bundle, opts)
        else:
            prof, hw = start_profile(bundle, settings.profile, settings.overrides, threads=settings.threads,
                                     n_ctx=settings.n_ctx, echo=print if progress else None)
            omni = Omni.load(bundle, profile=prof, hardware=hw)
        engine = cls(omni, settings)
        engine.warmup()
        return engine

    # --- introspection -------------------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        return self.runtime.llm.n_ctx

    def has_part(self, part: str) -> bool:
        return part in self.runtime.bundle.parts

    def health(self) -> dict:
        s = self.stats
        return {"running": self.admission.running, "queued": self.admission.queued,
                "concurrency": self.admission.slots, "max_queue": self.admission.max_queue,
                "served": s.served, "cancelled": s.cancelled, "failed": s.failed, "rejected": s.rejected,
                "completion_tokens": s.completion_tokens, "cache_rebuilds": self.runtime.rebuilds}

    def warmup(self) -> None:
        """A tiny generation so that the first request does not pay llama.cpp's first-call allocations."""
        session = Session(self.runtime)
        prompt = self.runtime.build_prompt([{"role": "user", "content": "hi"}])
        for _ in session.reply(ReplyOptions(SamplingOptions.greedy_decoding(), max_new_tokens=WARMUP_TOKENS),
                               prompt=prompt, replace=True):
            pass
        session.reset()

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
        """Run a job in the calling thread, without the admission queue (tests, one-user tools)."""
        return self._generate(job, on_event, cancel or threading.Event())

    def _work(self, job: Job, emit, cancel: threading.Event) -> None:
        outcome = "failed"
        try:
            finished = self._generate(job, emit, cancel)
            outcome = "cancelled" if (cancel.is_set() or finished.finish_reason == "interrupted") else "served"
            with self._stats_lock:
                self.stats.completion_tokens += finished.completion_tokens
            emit(finished)
        except BaseException as e:  # noqa: BLE001 - handed to the request; the worker thread must survive
            emit(e)
        finally:
            with self._stats_lock:
                setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            emit(_END)

    def _generate(self, job: Job, emit, cancel: threading.Event) -> Finished:
        """One request's turn on a session of its own; its events go to `emit`, the Finished is returned."""
        if job.live is not None:
            return job.live(job, emit, cancel)
        rt = self.runtime
        speech = job.speech()
        prompt = rt.build_prompt(job.messages, **{**job.prompt_kwargs,
                                                  **({"use_tts_template": True} if speech else {})})
        if len(prompt.ids) + 1 > self.n_ctx:
            raise ContextLengthExceededError(len(prompt.ids) + 1, self.n_ctx)
        rt.load_stages({m.kind for m in prompt.media} | ({"speech"} if speech else set()))
        session = Session(rt)
        embeds = session.encode(prompt)
        options = ReplyOptions(sampling=job.sampling, max_new_tokens=job.max_new_tokens,
                               min_new_tokens=job.min_new_tokens, stop=job.stop, speech=speech)
        return forward(session.reply(options, prompt=prompt, embeds=embeds, replace=True,
                                     reuse_prefix=self.settings.prompt_cache, cancel=cancel), emit)


def forward(events, emit) -> Finished:
    """Hand a reply's events to `emit` (text deltas with text only: clients get no empty deltas) and return its
    Finished, closing the reply however this ends."""
    finished = None
    try:
        for ev in events:
            if isinstance(ev, Finished):
                finished = ev
            elif not (isinstance(ev, TextDelta) and not ev.text):
                emit(ev)
    finally:
        events.close()
    return finished
