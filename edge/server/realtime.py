"""WS /v1/realtime: a live session socket. JSON text frames only; audio travels base64-encoded.

Connect: `ws://HOST:PORT/v1/realtime`. With an API key: header `Authorization: Bearer KEY`, or (browsers cannot
set headers) the query `?api_key=KEY` or the subprotocol `openai-insecure-api-key.KEY` (OpenAI's browser form).

Client -> server (`type` field):
  session.update   {"session": {"instructions": str, "voice": "default" | "data:audio/wav;base64,...",
                    "output_audio": bool, "temperature": float, "top_p": float, "seed": int, "max_tokens": int}}
                   -> session.updated. Every field is optional; the voice clip clones that voice.
  input.audio      {"audio": base64 of 16 kHz mono 16-bit little-endian PCM, normally 1 s (32000 bytes, at most
                    2 s), "image": optional base64 JPEG/PNG (or data URL): the camera frame of that second}
                   -> input.received {"units", "audio_seconds", "frames"}
  input.image      {"image": base64 JPEG/PNG or data URL}: a still image for the next turn (non-live use)
  input.text       {"text": str}: typed text for the next turn
  input.clear      drop the input gathered for the next turn
  input.commit     the user's turn is complete: answer it (a reply in progress is interrupted first)
  response.cancel  interrupt the reply in progress (barge-in); its response.done has status "interrupted"
  session.reset    forget the conversation history
  ping             -> pong

Server -> client:
  session.created  {"session": {...}, "model", "random_weights", "audio": {"input_sample_rate": 16000,
                    "output_sample_rate": 24000, "unit_seconds": 1.0, "format": "pcm16"}}
  response.created {"response_id"}                          (thinking)
  response.text.delta  {"response_id", "delta"}
  response.audio.delta {"response_id", "audio": base64 24 kHz mono 16-bit LE PCM, "seq"}   (speaking)
  response.done    {"response_id", "status": "completed" | "interrupted" | "failed", "text",
                    "usage": {"prompt_tokens", "completion_tokens", "audio_tokens", "image_tokens"},
                    "timing": {"first_token_ms", "first_audio_ms", "total_ms"}}    (listening again)
  error            {"error": {"message", "type", "code", "param"}}: the socket stays open.

Each socket has its own streaming session (edge/server/live_session.py over edge/streaming.py: the official
streaming_prefill / streaming_generate rules, spec §4.2). Input is prefilled as it arrives, in arrival order: an
input.audio unit as `["<unit>", frame, audio]` (`[audio]` without a frame, as the official web demo does; audio over
1 s goes in as consecutive 1-s pieces), a still image or typed text as user content. So the LLM KV cache and the
Whisper cache grow unit by unit, nothing is encoded twice, and input.commit only appends the generation prompt and
streams the reply: a text delta per decoded token, speech from the TTS fed 3-token pieces while decoding.
- Interruption: response.cancel, or a commit during a reply, stops it; the next input follows the official rule for
  an interrupted reply (`<|tts_eos|><|im_end|>` + new user turn). So does a reply cut by max_tokens (officially
  only a sampled terminator completes a reply). A reply cancelled before it started leaves the user's turn open:
  later input continues it. Input sent during a reply waits and is prefilled after it.
- The session's first message is the system prompt: `instructions` (default: the official omni prompt) and, with a
  voice clip, the official cloning prompt (spec §3.3). Changing either rewrites that message and re-prefills the
  conversation behind it from kept embeddings (only a new clip is encoded). session.reset starts a new streaming
  session; input.clear takes the KV cache and the session flags back to where the open turn started.
- Usage: prompt_tokens is everything the reply reads (the session's whole cache after the generation prompt);
  image_tokens / audio_tokens count the media placeholders in it.

Sharing the one model (edge/server/engine.py, edge/runtime.py): prefills and replies take the LLM in FIFO order
with HTTP requests, and a reply is a request (admission slot, queue, /health). llama.cpp holds one KV sequence here,
so any other job (an HTTP request, another socket) overwrites the session's cache; the session (edge/session.py)
keeps a log of what it wrote and puts the cache back from it before its next step (exact; no encoder runs, but an
LLM prefill of the whole conversation). One live socket without HTTP traffic in between is the fast path; several
sockets work, each switch between them costing a rebuild.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge import keys
from edge.constants import AUDIO_SAMPLE_RATE as AUDIO_RATE
from edge.constants import TTS_SAMPLE_RATE, UNIT_SAMPLES, UNIT_SECONDS
from edge.content import FRAME_PROMPT
from edge.server import chat as chatlib
from edge.server.engine import AudioChunk, Engine, Finished, Job, PromptReady, TextDelta
from edge.server.errors import APIError, bad_request, format_validation, from_exception, key_matches
from edge.server.jsonbody import parse_json
from edge.server.live_session import LiveSession
from edge.server.media import MediaDecoder, decode_base64, decode_data_url
from edge.server.settings import ServerSettings
from edge.server.types import Seed
from edge.streaming_rules import UNIT_MARKER
from edge.voice import OMNI_INSTRUCTIONS, clone_message

MAX_UNIT_SECONDS = 2.0  # one input.audio message may carry up to this much
KEY_SUBPROTOCOL = "openai-insecure-api-key."
POLICY_VIOLATION = 1008  # WebSocket close code for a refused key (RFC 6455)
FRAME_PROMPT_KWARGS = {"omni_input": True, **FRAME_PROMPT}  # streaming frame layout


class SessionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instructions: str | None = None
    voice: str | None = None
    output_audio: bool | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: Seed = None  # -1 = random (edge.server.types.Seed)
    max_tokens: int | None = Field(default=None, ge=1)


def opening_content(instructions: str | None, voice: np.ndarray | None) -> list:
    """The session's first message (official get_sys_prompt layout, spec §3.3): the instructions (default: the
    official omni prompt); with a reference clip, the cloning prompt around it (audio_assistant mode, the
    instructions in front as the omni mode puts its prompt)."""
    if voice is None:
        return [instructions or OMNI_INSTRUCTIONS]
    return clone_message(voice, instructions)["content"]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and np.array_equal(x, y))
        or (isinstance(x, str) and x == y) for x, y in zip(a, b))


@dataclass
class _Turn:
    """What the client sent since the last commit (for the acks and the reply Job's description of the turn)."""

    units: list = field(default_factory=list)  # (frame or None, audio) per input.audio
    images: list = field(default_factory=list)
    texts: list = field(default_factory=list)

    @property
    def samples(self) -> int:
        return sum(len(a) for _, a in self.units)

    @property
    def frames(self) -> int:
        return sum(f is not None for f, _ in self.units)

    def content(self) -> list:
        """The turn as one `chat` message: images, the units (official omni layout, frame then its second, when
        they carry frames; else one clip), texts."""
        if self.frames:
            units = [x for f, a in self.units for x in ([f] if f is not None else []) + [a]]
        else:
            units = [np.concatenate([a for _, a in self.units])] if self.units else []
        return self.images + units + self.texts


@dataclass
class _Response:
    """A committed turn's reply: queued behind the socket's earlier input, then streaming (task), then done."""

    id: str
    job: Job
    t0: float
    task: asyncio.Task | None = None  # None until the socket's op queue reaches it
    done: bool = False


class RealtimeSession:
    """One socket: the protocol above; the model work goes to `self.live` through an in-order queue."""

    def __init__(self, ws, engine: Engine, settings: ServerSettings, decoder: MediaDecoder):
        self.ws, self.engine, self.s, self.decoder = ws, engine, settings, decoder
        self.config = SessionConfig(output_audio=engine.has_part(keys.PART_TTS), max_tokens=settings.max_tokens)
        self.voice: np.ndarray | None = None
        self.opening = opening_content(None, None)
        self.live = LiveSession(engine, self.opening)
        self._announce_opening = True  # the next turn's Job lists the first message (it is (re)written in that turn)
        self.turn = _Turn()
        self.response: _Response | None = None
        self._ops: asyncio.Queue = asyncio.Queue()  # model work of this socket, strictly in arrival order
        # its own thread: a step may wait long for the model (FIFO behind requests), never in the shared pool
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-live")
        self._worker: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    # --- plumbing ----------------------------------------------------------------------------------------------------
    async def send(self, msg: dict) -> None:
        if self._closed:
            return
        try:
            async with self._send_lock:
                await self.ws.send_text(json.dumps(msg, ensure_ascii=False))
        except Exception:  # noqa: BLE001 - the client is gone; the receive loop notices and ends the session
            self._closed = True

    async def send_error(self, e: BaseException) -> None:
        await self.send({"type": "error", **from_exception(e).body()})

    def _authorized(self) -> tuple[bool, str | None]:
        offered = [p.strip() for p in self.ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        chosen = next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL)), offered[0] if offered else None)
        if not self.s.api_key:
            return True, chosen
        given = [self.ws.headers.get("authorization", "").removeprefix("Bearer ").strip(),
                 self.ws.query_params.get("api_key", "")]
        given += [p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)]
        return any(key_matches(g, self.s.api_key) for g in given), chosen

    def _enqueue(self, fn, *args) -> None:
        """Queue model work (a LiveSession method, run in the socket's thread) behind its earlier work."""
        self._ops.put_nowait(lambda: asyncio.get_running_loop().run_in_executor(self._thread, fn, *args))

    async def _work(self) -> None:
        while True:
            op = await self._ops.get()
            try:
                await op()
            except Exception as e:  # noqa: BLE001 - e.g. a unit that does not fit the context: reported, the session goes on
                await self.send_error(e)

    # --- main loop ---------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        ok, subprotocol = self._authorized()
        await self.ws.accept(subprotocol=subprotocol)
        if not ok:
            await self.send_error(APIError(401, "missing or wrong API key: pass it as ?api_key=KEY, the "
                                           f"'{KEY_SUBPROTOCOL}KEY' subprotocol or an Authorization header.",
                                           code="invalid_api_key"))
            await self.ws.close(code=POLICY_VIOLATION)
            return
        await self.send({"type": "session.created", "session": self._session_info(), "model": self.s.model_name,
                         "random_weights": bool(self.engine.omni.random_weights),
                         "audio": {"input_sample_rate": AUDIO_RATE, "output_sample_rate": self._out_rate(),
                                   "unit_seconds": UNIT_SECONDS, "format": "pcm16"}})
        self._worker = asyncio.create_task(self._work())
        try:
            while not self._closed:
                msg = await self._receive_or_idle()
                if msg is None or msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is None:
                    await self.send_error(bad_request("binary frames are not supported; send JSON text messages "
                                                      "(audio as base64).", None, "invalid_message"))
                    continue
                try:
                    await self.handle(parse_json(msg["text"]))
                except Exception as e:  # noqa: BLE001 - one bad message must not end the session
                    await self.send_error(e)
        finally:
            self._closed = True
            self.live.close()
            await self._cancel_response()
            self._worker.cancel()
            self._thread.shutdown(wait=False, cancel_futures=True)  # a step in progress returns once it has the model

    async def _receive_or_idle(self):
        """The next client message; None (after a goodbye message and a close) when the client has been silent
        for `ws_idle_timeout` while no reply ran. Ping/pong (uvicorn) only finds dead peers, not idle ones."""
        while True:
            try:
                return await asyncio.wait_for(self.ws.receive(), self.s.ws_idle_timeout)
            except asyncio.TimeoutError:
                if self.response is not None and not self.response.done:
                    continue  # the client is listening to a reply
                await self.send_error(APIError(408, f"the socket was idle for {self.s.ws_idle_timeout:.0f} s and is "
                                               "closed; reconnect to go on.", code="idle_timeout"))
                await self.ws.close(code=1000)
                return None

    @staticmethod
    def _out_rate() -> int:
        return TTS_SAMPLE_RATE

    def _session_info(self) -> dict:
        info = self.config.model_dump()
        if info.get("voice") and info["voice"].startswith("data:"):
            info["voice"] = "reference clip"
        return info

    async def handle(self, msg: dict) -> None:
        kind = msg.get("type") if isinstance(msg, dict) else None
        handler = {
            "session.update": self._session_update, "input.audio": self._input_audio,
            "input.image": self._input_image, "input.text": self._input_text, "input.clear": self._input_clear,
            "input.commit": self._commit, "response.create": self._commit, "response.cancel": self._cancel,
            "session.reset": self._reset, "ping": self._ping,
        }.get(kind)
        if handler is None:
            raise bad_request(f"unknown message type {kind!r}; see the schema in GET /docs or edge/server/"
                              "realtime.py.", "type", "unknown_type")
        await handler(msg)

    # --- handlers ----------------------------------------------------------------------------------------------------
    async def _session_update(self, msg: dict) -> None:
        try:
            cfg = SessionConfig.model_validate(msg.get("session") or {})
        except ValidationError as e:
            raise format_validation(e) from e
        if cfg.max_tokens and cfg.max_tokens > self.s.max_tokens:
            raise bad_request(f"max_tokens {cfg.max_tokens} is above the server's limit {self.s.max_tokens}.",
                              "session.max_tokens")
        if cfg.output_audio and not self.engine.has_part(keys.PART_TTS):
            raise bad_request("this bundle has no TTS part; output_audio must be false.", "session.output_audio")
        voice = self.voice
        if cfg.voice is not None:
            msgs = await asyncio.to_thread(chatlib.voice_messages, cfg.voice, self.decoder, "session.voice")
            voice = msgs[0]["content"][1] if msgs else None
        self.config = self.config.model_copy(update=cfg.model_dump(exclude_unset=True))
        self.voice = voice
        opening = opening_content(self.config.instructions, voice)
        if not _same(opening, self.opening):
            self.opening = opening
            self._announce_opening = True
            self._enqueue(self.live.set_opening, opening)
        await self.send({"type": "session.updated", "session": self._session_info()})

    async def _input_audio(self, msg: dict) -> None:
        raw = decode_base64(str(msg.get("audio") or ""), "audio")
        if len(raw) % 2 or not raw:
            raise bad_request("audio must be non-empty 16-bit PCM (an even number of bytes).", "audio")
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if len(pcm) > MAX_UNIT_SECONDS * AUDIO_RATE:
            raise bad_request(f"one input.audio carries at most {MAX_UNIT_SECONDS:.0f} s "
                              f"({int(MAX_UNIT_SECONDS * AUDIO_RATE * 2)} bytes); send 1-s units.", "audio")
        t = self.turn
        if (t.samples + len(pcm)) / AUDIO_RATE > self.s.max_audio_seconds:
            raise bad_request(f"the turn exceeds {self.s.max_audio_seconds:.0f} s of audio; commit earlier.", "audio")
        frame = await self._image(msg["image"], "image") if msg.get("image") else None
        pieces = [pcm[i:i + UNIT_SAMPLES] for i in range(0, len(pcm), UNIT_SAMPLES)]
        self._enqueue(self.live.prefill, ([UNIT_MARKER, frame] if frame is not None else []) + pieces)
        t.units.append((frame, pcm))
        await self.send({"type": "input.received", "units": len(t.units),
                         "audio_seconds": round(t.samples / AUDIO_RATE, 3), "frames": t.frames})

    async def _image(self, data: str, param: str):
        raw = decode_data_url(data, param) if data.startswith("data:") else decode_base64(data, param)
        return await asyncio.to_thread(self.decoder.image, raw, param)

    async def _input_image(self, msg: dict) -> None:
        image = await self._image(str(msg.get("image") or ""), "image")
        self._enqueue(self.live.prefill, [image])
        self.turn.images.append(image)
        await self.send({"type": "input.received", "units": len(self.turn.units), "images": len(self.turn.images)})

    async def _input_text(self, msg: dict) -> None:
        text = msg.get("text")
        if not isinstance(text, str) or not text:
            raise bad_request("input.text needs a non-empty `text` string.", "text")
        self._enqueue(self.live.prefill, [text])
        self.turn.texts.append(text)
        await self.send({"type": "input.received", "units": len(self.turn.units), "texts": len(self.turn.texts)})

    async def _input_clear(self, msg: dict) -> None:
        self.turn = _Turn()
        self._enqueue(self.live.clear)
        await self.send({"type": "input.cleared"})

    async def _reset(self, msg: dict) -> None:
        await self._cancel_response()
        self.turn = _Turn()
        self._announce_opening = True
        self._enqueue(self.live.reset)
        await self.send({"type": "session.reset"})

    async def _ping(self, msg: dict) -> None:
        await self.send({"type": "pong"})

    async def _cancel(self, msg: dict) -> None:
        if self.response is None or self.response.done:
            raise bad_request("no reply is in progress.", None, "no_active_response")
        await self._cancel_response()

    async def _cancel_response(self) -> None:
        resp, self.response = self.response, None
        if resp is None or resp.done:
            return
        if resp.task is None:  # still queued behind this socket's earlier input: it never reaches the model
            resp.done = True
            await self._send_done(resp, "interrupted", "", {})
            return
        resp.task.cancel()
        await asyncio.wait({resp.task})

    async def _commit(self, msg: dict) -> None:
        if not (self.turn.units or self.turn.images or self.turn.texts):
            raise bad_request("nothing to answer: send input.audio, input.image or input.text before input.commit.",
                              None, "empty_turn")
        await self._cancel_response()  # barge-in: a new turn interrupts the reply in progress
        resp = _Response(f"resp_{uuid.uuid4().hex[:16]}", self._turn_job(), time.perf_counter())
        self.turn = _Turn()
        self.response = resp
        await self.send({"type": "response.created", "response_id": resp.id})
        self._ops.put_nowait(lambda: self._run_response(resp))

    # --- a turn ------------------------------------------------------------------------------------------------------
    def _turn_job(self) -> Job:
        """The reply's job. Its messages describe the turn (the first message when this turn (re)wrote it, then the
        user's input as `chat` would take it); the model already holds them, `live` answers from there."""
        c = self.config
        msgs = [{"role": "user", "content": list(self.opening)}] if self._announce_opening else []
        self._announce_opening = False
        msgs.append({"role": "user", "content": self.turn.content()})
        speak = bool(c.output_audio)
        return Job(messages=msgs, prompt_kwargs=dict(FRAME_PROMPT_KWARGS) if self.turn.frames else {},
                   sampling=chatlib.sampling_options(c), max_new_tokens=c.max_tokens or self.s.max_tokens,
                   speak=speak, stream_audio=speak, tts_seed=c.seed, live=self.live.respond)

    async def _run_response(self, resp: _Response) -> None:
        if resp.done:  # cancelled while queued
            return
        resp.task = asyncio.create_task(self._respond(resp))
        await asyncio.wait({resp.task})

    async def _respond(self, resp: _Response) -> None:
        timing = {"first_token_ms": None, "first_audio_ms": None}
        status, text, usage, seq = "completed", [], {}, 0

        def ms() -> float:
            return round((time.perf_counter() - resp.t0) * 1000.0, 1)

        events = None
        try:
            events = self.engine.run(resp.job)
            async for ev in events:
                if isinstance(ev, PromptReady):
                    usage = {"prompt_tokens": ev.prompt_tokens, "audio_tokens": ev.audio_tokens,
                             "image_tokens": ev.image_tokens}
                elif isinstance(ev, TextDelta):
                    timing["first_token_ms"] = timing["first_token_ms"] or ms()
                    text.append(ev.text)
                    await self.send({"type": "response.text.delta", "response_id": resp.id, "delta": ev.text})
                elif isinstance(ev, AudioChunk):
                    timing["first_audio_ms"] = timing["first_audio_ms"] or ms()
                    await self.send({"type": "response.audio.delta", "response_id": resp.id, "seq": seq,
                                     "audio": base64.b64encode(chatlib.pcm16(ev.pcm)).decode()})
                    seq += 1
                elif isinstance(ev, Finished):
                    usage["completion_tokens"] = ev.completion_tokens
                    status = "interrupted" if ev.finish_reason == "interrupted" else "completed"
        except asyncio.CancelledError:
            status = "interrupted"
        except Exception as e:  # noqa: BLE001 - reported to the client; the socket goes on
            status = "failed"
            await self.send_error(e)
        finally:
            if events is not None:
                await events.aclose()
        resp.done = True
        await self._send_done(resp, status, "".join(text), usage, timing)

    async def _send_done(self, resp: _Response, status: str, text: str, usage: dict, timing: dict | None = None):
        timing = {"first_token_ms": None, "first_audio_ms": None, **(timing or {}),
                  "total_ms": round((time.perf_counter() - resp.t0) * 1000.0, 1)}
        await self.send({"type": "response.done", "response_id": resp.id, "status": status, "text": text,
                         "usage": usage, "timing": timing})
