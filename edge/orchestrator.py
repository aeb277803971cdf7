"""The live pipeline: microphone (+ camera) -> VAD -> 1-s units prefilled while the user speaks -> reply with LLM
decoding and TTS running concurrently -> speaker; barge-in; a latency trace per turn.

Threads (all started and joined here; bounded queues between them):
- capture: reads 32-ms microphone packets, runs the VAD and the speech start/end rule, posts to `events`
  (bounded: a stalled consumer blocks capture instead of growing memory; the microphone's ring buffer absorbs it).
- control (the caller's thread in `run()`): the turn state machine (edge/turns.py); cuts the utterance into 1-s
  units and prefills each as it arrives (encoders + LLM), so at end of turn only the last partial unit and the
  generation prompt are left; starts, interrupts and finishes replies.
- reply thread: the session's turn loop (`Session.reply` with speech mode "overlap"): generation prompt prefill +
  decode here, the TTS on a thread of its own fed 3-token pieces through a bounded queue, audio handed back between
  tokens and pushed to the sink; then it waits for playback. With `overlap=False` the TTS starts only after the last
  token (stages in sequence, for measurement).
onnxruntime and llama.cpp release the GIL, so decode and TTS really run in parallel; their thread counts are set
apart (`edge.options.ThreadSplit`) so they do not fight over cores.

Barge-in: the VAD's speech start during a reply sets the stop event (checked before every LLM token and every
TTS piece), drops queued playback at once (`sink.interrupt()`), and joins the reply thread before the new
utterance is prefilled; the time from the decision to "both threads stopped" is traced (`stop_ms`).

Faults end or degrade the session with a message on `status` and in `result.errors`, never with a hanging
thread: camera gone -> audio-only units; speaker fails -> text-only replies; microphone silent for
`mic_timeout_seconds` or model files missing -> the session ends.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edge import turns as tt
from edge.events import AudioChunk, Finished, PromptReady, TextDelta
from edge.governor import RealtimeGovernor
from edge.io.microphone import PREROLL_MARGIN_SECONDS, UnitAssembler, VadSegmenter, make_vad
from edge.sampling import official_sampling
from edge.session import POLL_SECONDS, SpeechOptions
from edge.streaming import StreamingSession
from edge.voice import OMNI_INSTRUCTIONS

log = logging.getLogger("edge.orchestrator")

EVENT_QUEUE_PACKETS = 256  # ~8 s of 32-ms packets between capture and control
MIN_RATE_TOKENS = 8  # a system prompt shorter than this says too little about the LLM's prefill rate
JOIN_SECONDS = 5.0  # a reply thread that does not stop within this is reported (never silently leaked)


@dataclass(frozen=True)
class LiveOptions:
    """Attributes:
    speech: speak replies (False: text only).
    barge_in: user speech interrupts a reply.
    overlap: LLM decode and TTS concurrently (False: in sequence, for comparison).
    max_new_tokens, sampling, seed: reply generation (official streaming defaults otherwise).
    system_prompt: text of the session's first message; voice: optional 16-kHz reference voice for it.
    session_id: the streaming session id.
    mic_timeout_seconds: no microphone data for this long ends the session.
    trace_path: write one JSON line per turn here.
    """

    speech: bool = True
    barge_in: bool = True
    overlap: bool = True
    max_new_tokens: int = 128
    sampling: bool = True
    seed: int | None = None
    system_prompt: str = OMNI_INSTRUCTIONS
    voice: np.ndarray | None = None
    session_id: str = "live"
    mic_timeout_seconds: float = 2.0
    trace_path: str | Path | None = None


@dataclass
class TurnTrace:
    """Timestamps (seconds since the session started) of one user turn and its reply."""

    turn: int
    speech_end: float | None = None
    prefill_done: float | None = None
    first_token: float | None = None
    first_audio: float | None = None
    decode_end: float | None = None  # last token decoded (tokens / (decode_end - first_token) = decode rate)
    end: float | None = None
    interrupted: bool = False
    completed: bool = False
    units: int = 0
    tokens: int = 0
    audio_seconds: float = 0.0
    stop_ms: float | None = None
    text: str = ""


@dataclass
class SessionLog:
    """What was fed to the session, in order (for tests and debugging): ("prefill", content-kind list),
    ("reply", tokens, completed)."""

    items: list = field(default_factory=list)


@dataclass
class LiveResult:
    turns: list[TurnTrace]
    errors: list[str]
    log: SessionLog
    end_reason: str


class PacedSink:
    """Plays into another sink (e.g. a WavSink) at real-time pace, so a headless run behaves like a speaker:
    playback takes time, `pending_seconds` counts down, and `interrupt()` keeps only what was already played.
    `gaps` / `gap_seconds` count silences inside a reply (a chunk arrived after the previous one finished playing:
    what a listener hears as a stall); the pause before a reply's first chunk is not one."""

    def __init__(self, inner, sample_rate: int, *, speed: float = 1.0):
        self.inner, self.sample_rate, self.speed = inner, sample_rate, speed
        self._q: list[tuple[np.ndarray, float]] = []  # (chunk, playback start time)
        self._end = 0.0
        self._lock = threading.Lock()
        self.played_seconds = 0.0
        self._in_reply = False
        self.gaps = 0
        self.gap_seconds = 0.0

    def _dur(self, chunk: np.ndarray) -> float:
        return chunk.size / self.sample_rate / self.speed

    def _advance(self, now: float) -> None:
        while self._q and self._q[0][1] + self._dur(self._q[0][0]) <= now:
            chunk, _ = self._q.pop(0)
            self.inner.push(chunk)
            self.played_seconds += chunk.size / self.sample_rate

    def push(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, np.float32).reshape(-1)
        with self._lock:
            now = time.monotonic()
            self._advance(now)
            if self._in_reply and now > self._end:
                self.gaps += 1
                self.gap_seconds += now - self._end
            self._in_reply = True
            start = max(now, self._end)
            self._q.append((chunk, start))
            self._end = start + self._dur(chunk)

    @property
    def pending_seconds(self) -> float:
        with self._lock:
            now = time.monotonic()
            self._advance(now)
            return max(0.0, self._end - now) * self.speed

    def flush(self) -> None:
        self._in_reply = False  # the reply is complete: the next chunk starts a new one
        self.inner.flush()

    def interrupt(self) -> None:
        with self._lock:
            self._in_reply = False
            now = time.monotonic()
            self._advance(now)
            if self._q and self._q[0][1] < now:  # the chunk being played: keep its played part
                chunk, start = self._q[0]
                n = int((now - start) * self.speed * self.sample_rate)
                if n > 0:
                    self.inner.push(chunk[:n])
                    self.played_seconds += n / self.sample_rate
            self._q.clear()
            self._end = now

    def close(self) -> None:
        with self._lock:
            for chunk, _ in self._q:
                self.inner.push(chunk)
            self._q.clear()
        self.inner.close()


class _Reply:
    """One reply on a thread of its own: the session's turn loop (decode + overlapped TTS), then playback."""

    def __init__(self, orch: "Orchestrator", rid: int, trace: TurnTrace):
        self.o, self.id, self.trace = orch, rid, trace
        self.stop = threading.Event()
        self.completed = False
        self.tokens: list[int] = []
        self.speak = orch.speech_on
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"reply{self.id}", daemon=True)
        self.thread.start()

    def _speech(self) -> SpeechOptions | None:
        if not self.speak:
            return None
        return SpeechOptions(mode="overlap" if self.o.options.overlap else "after")

    def _run(self) -> None:
        o, t = self.o, self.trace
        text: list[str] = []
        start = o.now()
        events = o.session.reply(o.sampling, max_new_tokens=o.options.max_new_tokens, speech=self._speech(),
                                 lend_cores=True, cancel=self.stop)
        try:
            for ev in events:
                if isinstance(ev, PromptReady):
                    t.prefill_done = o.now()
                elif isinstance(ev, TextDelta):
                    if t.first_token is None:
                        t.first_token = o.now()
                        o.post(tt.ReplyProgress(self.id, "first_token"))
                    text.append(ev.text)
                    o.status(f"speaking: {''.join(text)[-60:]!r}")
                elif isinstance(ev, AudioChunk):
                    self._play(ev)
                elif isinstance(ev, Finished):
                    self.completed, self.tokens = ev.completed, list(ev.tokens)
                    if ev.timing.decode_end is not None:
                        t.decode_end = start + ev.timing.decode_end
        except Exception as e:  # noqa: BLE001 - reported; the control thread ends the session
            o.fault(f"reply generation failed: {e}", fatal=True)
        finally:
            events.close()
            t.text, t.tokens = "".join(text), len(self.tokens)
        self._finish()

    def _play(self, ev: AudioChunk) -> None:
        o, t = self.o, self.trace
        if not o.speech_on:
            return
        if t.first_audio is None:
            t.first_audio = o.now()
            o.post(tt.ReplyProgress(self.id, "first_audio"))
        t.audio_seconds += ev.pcm.size / ev.sample_rate
        try:
            o.sink.push(ev.pcm)
        except Exception as e:  # noqa: BLE001
            o.speaker_failed(e)

    def _finish(self) -> None:
        """Wait for playback, then report the reply done (an interrupted reply is collected by the control thread
        instead)."""
        o = self.o
        if self.speak and o.speech_on and not self.stop.is_set():
            try:
                o.sink.flush()
                while not self.stop.is_set() and getattr(o.sink, "pending_seconds", 0.0) > 0:
                    self.stop.wait(POLL_SECONDS / 5)
            except Exception as e:  # noqa: BLE001
                o.speaker_failed(e)
        if not self.stop.is_set():
            self.trace.end = o.now()
            o.post(tt.ReplyDone(self.id, self.completed))

    def interrupt(self) -> float:
        """Stop playback, decode and TTS; returns ms until every worker stopped."""
        t0 = time.perf_counter()
        self.stop.set()
        if self.speak and self.o.sink is not None:
            try:
                self.o.sink.interrupt()
            except Exception:  # noqa: BLE001
                pass
        self.join()
        return (time.perf_counter() - t0) * 1000

    def join(self) -> None:
        if self.thread is None:
            return
        self.thread.join(JOIN_SECONDS)
        if self.thread.is_alive():
            self.o.fault(f"thread {self.thread.name} did not stop within {JOIN_SECONDS} s", fatal=False)


class Orchestrator:
    """Runs one live conversation. `run()` blocks until the microphone ends, `stop()` is called, or a fatal fault."""

    def __init__(self, session: StreamingSession, mic, *, camera=None, sink=None, vad=None,
                 options: LiveOptions | None = None, on_status: Callable[[str], None] | None = None,
                 segmenter: VadSegmenter | None = None):
        self.session, self.mic, self.camera, self.sink = session, mic, camera, sink
        self.options = o = options or LiveOptions()
        self.vad = vad or make_vad("auto")
        self.segmenter = segmenter or VadSegmenter()
        self.assembler = UnitAssembler()
        self.on_status = on_status
        self.speech_on = o.speech and sink is not None
        self.sampling = official_sampling(o.sampling, o.seed)
        self.events: queue.Queue = queue.Queue(EVENT_QUEUE_PACKETS)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.state = tt.TurnState(options=tt.TurnOptions(barge_in=o.barge_in))
        self.traces: list[TurnTrace] = []
        self.errors: list[str] = []
        self.log = SessionLog()
        self._reply: _Reply | None = None
        self._fatal: str | None = None
        self._t0 = time.monotonic()
        self._camera_lost_reported = False
        self.governor = RealtimeGovernor()  # lowers the camera rate when units exceed their 1-s budget
        self._units_in_turn = 0
        self._utt_start = 0.0

    # --- helpers --------------------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self._t0

    def status(self, text: str) -> None:
        if self.on_status is not None:
            try:
                self.on_status(f"[{self.state.phase.value:9s}] {text}")
            except Exception:  # noqa: BLE001 - a broken terminal must not stop the pipeline
                pass

    def post(self, event) -> None:
        while not self._stop.is_set():
            try:
                self.events.put(event, timeout=POLL_SECONDS)
                return
            except queue.Full:
                continue

    def fault(self, message: str, *, fatal: bool) -> None:
        log.warning(message)
        self.errors.append(message)
        self.status(message)
        if fatal:
            self.post(tt.Stop(message))

    def stop(self) -> None:
        self.post(tt.Stop("stopped"))

    # --- capture thread ------------------------------------------------------------------------------------------
    def _capture(self) -> None:
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                packet = self.mic.read(POLL_SECONDS)
                if packet is None:
                    if getattr(self.mic, "ended", False):
                        self.post(("mic_end",))
                        return
                    if time.monotonic() - last > self.options.mic_timeout_seconds:
                        self.fault(f"the microphone delivered no audio for {self.options.mic_timeout_seconds:.1f} s "
                                   "(unplugged or muted?); ending the session", fatal=True)
                        return
                    continue
                last = time.monotonic()
                vad_events = self.segmenter.push(self.vad.is_speech(packet))
                self.post(("packet", packet, vad_events))
        except Exception as e:  # noqa: BLE001
            self.fault(f"microphone failed: {e}", fatal=True)

    # --- control ---------------------------------------------------------------------------------------------
    def run(self) -> LiveResult:
        """Open the session (system prompt), start capture, and run the turn loop until the end."""
        end_reason = "microphone ended"
        try:
            self._open_session()
            cap = threading.Thread(target=self._capture, name="capture", daemon=True)
            self._threads.append(cap)
            cap.start()
            self.status("listening")
            mic_ended = False
            while True:
                try:
                    ev = self.events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if mic_ended and not self.state.reply_active and self.state.phase is not tt.Phase.HEARING:
                        break
                    continue
                if isinstance(ev, tuple) and ev[0] == "mic_end":
                    mic_ended = True
                    if self.state.phase is tt.Phase.HEARING:  # the file ended mid-utterance: close the turn
                        self._dispatch(tt.SpeechEnd(self.now()))
                    continue
                if isinstance(ev, tuple) and ev[0] == "packet":
                    self._on_packet(ev[1], ev[2])
                else:
                    self._dispatch(ev)
                if self.state.phase is tt.Phase.STOPPED:
                    end_reason = self._fatal or "stopped"
                    break
        except Exception as e:  # noqa: BLE001 - setup faults (e.g. model files missing) end the session cleanly
            self.errors.append(f"session failed: {e}")
            self.status(f"session failed: {e}")
            end_reason = f"error: {e}"
        finally:
            self._shutdown()
        return LiveResult(self.traces, self.errors, self.log, end_reason)

    def _open_session(self) -> None:
        self.session.load_encoders(vision=self.camera is not None, speech=False)
        if self.speech_on:
            try:
                self.session.load_encoders(vision=False, speech=True)
            except Exception as e:  # noqa: BLE001 - no TTS is not fatal: replies go on as text
                self.speech_on = False
                self.fault(f"speech synthesis failed ({e}); continuing with text-only replies", fatal=False)
        timings = self.session.warm_up_encoders(vision=self.camera is not None)
        content: list = [self.options.system_prompt]
        if self.options.voice is not None:
            content.append(np.asarray(self.options.voice, np.float32))
        self.session.reset_session()
        report = self.session.streaming_prefill(self.options.session_id, [{"role": "user", "content": content}])
        self.log.items.append(("prefill", ["text"] + (["audio"] if self.options.voice is not None else []),
                               self.options.system_prompt))
        self._prime_governor(timings, report)

    def _prime_governor(self, timings, report) -> None:
        """Start the camera at the rate the measured costs allow: encoder warm-up times plus the LLM's prefill
        rate on the system prompt (a 7B prefill on 2 cores is ~20 tokens/s, so a frame's 64 rows cost seconds)."""
        if timings.image_seconds is None or report.n_tokens < MIN_RATE_TOKENS or report.llm_seconds <= 0:
            return
        per_token = report.llm_seconds / report.n_tokens
        audio_unit = timings.audio_seconds + timings.audio_tokens * per_token
        frame_unit = audio_unit + timings.image_seconds + timings.image_tokens * per_token
        change = self.governor.prime(frame_unit, audio_unit)
        if change:
            self.status(change)

    def _on_packet(self, packet: np.ndarray, vad_events: list) -> None:
        for unit in self.assembler.push(packet):
            self._dispatch(tt.UnitReady(unit))
        for ev in vad_events:
            if ev[0] == "start":
                self._utt_start = max(0.0, ev[1] - ev[2]) + PREROLL_MARGIN_SECONDS
                self._dispatch(tt.SpeechStart(self.now()))
            else:
                self._dispatch(tt.SpeechEnd(self.now()))

    def _dispatch(self, event) -> None:
        self.state, actions = tt.step(self.state, event)
        if isinstance(event, tt.ReplyProgress) and event.what == "first_token":
            self.status("speaking")
        for a in actions:
            self._act(a)

    def _act(self, a) -> None:
        if isinstance(a, tt.BeginUtterance):
            self._units_in_turn = 0
            self.assembler.begin(self._utt_start)
            self.status("hearing")
        elif isinstance(a, tt.PrefillUnit):
            self._prefill_unit(a.unit)
        elif isinstance(a, tt.EndUtterance):
            rest = self.assembler.flush()
            if rest is not None:
                self._prefill_unit(rest)
        elif isinstance(a, tt.StartReply):
            trace = TurnTrace(turn=self.state.turn, speech_end=self.now(), units=self._units_in_turn)
            self.traces.append(trace)
            self._reply = _Reply(self, a.reply, trace)
            self.status("thinking")
            self._reply.start()
        elif isinstance(a, tt.InterruptReply):
            self._end_reply(interrupted=True)
            self.status("interrupted")
        elif isinstance(a, tt.FinishReply):
            self._end_reply(interrupted=False)
            self.status("listening")
        elif isinstance(a, tt.Shutdown):
            self._fatal = a.reason

    def speaker_failed(self, e: Exception) -> None:
        if self.speech_on:
            self.speech_on = False
            self.fault(f"speaker failed ({e}); continuing with text-only replies", fatal=False)

    def _prefill_unit(self, audio: np.ndarray) -> None:
        frame = None
        if self.camera is not None and self.governor.take_frame():
            frame = self.camera.latest()
            if frame is None and self.camera.lost and not self._camera_lost_reported:
                self._camera_lost_reported = True
                self.fault(f"{self.camera.lost}; continuing audio-only", fatal=False)
        content = ["<unit>", frame, audio] if frame is not None else [audio]  # web demo: <unit> only with a frame
        t0 = time.perf_counter()
        self.session.streaming_prefill(self.options.session_id, [{"role": "user", "content": content}])
        change = self.governor.observe(time.perf_counter() - t0, frame is not None)
        if change:
            self.status(change)
        self._units_in_turn += 1
        self.log.items.append(("prefill", ["unit", "image", "audio"] if frame is not None else ["audio"],
                               audio.size))

    def _end_reply(self, *, interrupted: bool) -> None:
        r, self._reply = self._reply, None
        if r is None:
            return
        if interrupted:
            r.trace.stop_ms = r.interrupt()
            r.trace.interrupted = True
            r.trace.end = self.now()
        else:
            r.join()
        r.trace.completed = r.completed  # the LLM sampled a terminator (what the session's next prefix follows)
        r.trace.tokens = len(r.tokens)
        self.log.items.append(("reply", list(r.tokens), r.completed))
        self._write_trace(r.trace)

    def _write_trace(self, trace: TurnTrace) -> None:
        path = self.options.trace_path
        if path is None:
            return
        rec = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(trace).items()}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def _shutdown(self) -> None:
        self._stop.set()
        if self._reply is not None:
            self._end_reply(interrupted=True)
        try:
            self.mic.close()
        except Exception:  # noqa: BLE001
            pass
        for t in self._threads:
            t.join(JOIN_SECONDS)
        if self.camera is not None:
            self.camera.close()
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception as e:  # noqa: BLE001
                self.errors.append(f"closing the speaker failed: {e}")
        self.status("session ended")
