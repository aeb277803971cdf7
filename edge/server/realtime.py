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

A turn is answered turn by turn through the server's engine (queued fairly with HTTP requests): the units of a
turn become one audio clip, or, when units carry frames, the official omni layout (frame, 1-s audio, frame, ...
with omni_input, one unsliced image per frame). The last `MAX_HISTORY_TURNS` exchanges are kept as context.
The omni streaming session (edge/streaming.py, KV kept between units) is meant to replace `_turn_job` later.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge import keys
from edge.server import chat as chatlib
from edge.server.engine import AudioDelta, Engine, Finished, Job, PromptReady, TextDelta
from edge.server.errors import APIError, bad_request, from_exception
from edge.server.media import AUDIO_RATE, MediaDecoder, decode_base64, decode_data_url
from edge.server.settings import ServerSettings

UNIT_SECONDS = 1.0  # the official live mode feeds 1-s units (spec: streaming_prefill per second)
MAX_UNIT_SECONDS = 2.0  # one input.audio message may carry up to this much
MAX_HISTORY_TURNS = 4
KEY_SUBPROTOCOL = "openai-insecure-api-key."
POLICY_VIOLATION = 1008  # WebSocket close code for a refused key (RFC 6455)


class SessionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instructions: str | None = None
    voice: str | None = None
    output_audio: bool | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)


class RealtimeSession:
    def __init__(self, ws, engine: Engine, settings: ServerSettings, decoder: MediaDecoder):
        self.ws, self.engine, self.s, self.decoder = ws, engine, settings, decoder
        self.config = SessionConfig(output_audio=engine.has_part(keys.PART_TTS), max_tokens=settings.max_tokens)
        self.voice_msgs: list[dict] = []
        self.history: list[tuple[dict, dict]] = []
        self._clear_input()
        self.response: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False

    # --- plumbing ----------------------------------------------------------------------------------------------------
    def _clear_input(self) -> None:
        self.units: list[np.ndarray] = []
        self.frames: list = []  # one entry per unit: an image or None
        self.images: list = []
        self.texts: list[str] = []

    async def send(self, msg: dict) -> None:
        if self._closed:
            return
        try:
            async with self._send_lock:
                await self.ws.send_text(json.dumps(msg, ensure_ascii=False))
        except Exception:  # the client is gone; the receive loop notices and ends the session
            self._closed = True

    async def send_error(self, e: BaseException) -> None:
        await self.send({"type": "error", **from_exception(e).body()})

    def _authorized(self) -> tuple[bool, str | None]:
        offered = [p.strip() for p in self.ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        chosen = next((p for p in offered if not p.startswith(KEY_SUBPROTOCOL)), offered[0] if offered else None)
        if not self.s.api_key:
            return True, chosen
        from edge.server.app import key_matches

        given = [self.ws.headers.get("authorization", "").removeprefix("Bearer ").strip(),
                 self.ws.query_params.get("api_key", "")]
        given += [p[len(KEY_SUBPROTOCOL):] for p in offered if p.startswith(KEY_SUBPROTOCOL)]
        return any(key_matches(g, self.s.api_key) for g in given), chosen

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
        try:
            while not self._closed:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("text") is None:
                    await self.send_error(bad_request("binary frames are not supported; send JSON text messages "
                                                      "(audio as base64).", None, "invalid_message"))
                    continue
                try:
                    await self.handle(json.loads(msg["text"]))
                except json.JSONDecodeError as e:
                    await self.send_error(bad_request(f"message is not valid JSON ({e}).", None, "invalid_json"))
                except Exception as e:  # one bad message must not end the session
                    await self.send_error(e)
        finally:
            self._closed = True
            await self._cancel_response()

    @staticmethod
    def _out_rate() -> int:
        from edge.io.speaker import TTS_SAMPLE_RATE

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
            from edge.server.app import format_validation

            raise format_validation(e) from e
        if cfg.max_tokens and cfg.max_tokens > self.s.max_tokens:
            raise bad_request(f"max_tokens {cfg.max_tokens} is above the server's limit {self.s.max_tokens}.",
                              "session.max_tokens")
        if cfg.output_audio and not self.engine.has_part(keys.PART_TTS):
            raise bad_request("this bundle has no TTS part; output_audio must be false.", "session.output_audio")
        if cfg.voice is not None:
            self.voice_msgs = await asyncio.to_thread(chatlib.voice_messages, cfg.voice, self.decoder,
                                                      "session.voice")
        self.config = self.config.model_copy(update=cfg.model_dump(exclude_unset=True))
        await self.send({"type": "session.updated", "session": self._session_info()})

    async def _input_audio(self, msg: dict) -> None:
        raw = decode_base64(str(msg.get("audio") or ""), "audio")
        if len(raw) % 2:
            raise bad_request("audio must be 16-bit PCM (an even number of bytes).", "audio")
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        if len(pcm) > MAX_UNIT_SECONDS * AUDIO_RATE:
            raise bad_request(f"one input.audio carries at most {MAX_UNIT_SECONDS:.0f} s "
                              f"({int(MAX_UNIT_SECONDS * AUDIO_RATE * 2)} bytes); send 1-s units.", "audio")
        if (sum(map(len, self.units)) + len(pcm)) / AUDIO_RATE > self.s.max_audio_seconds:
            raise bad_request(f"the turn exceeds {self.s.max_audio_seconds:.0f} s of audio; commit earlier.", "audio")
        frame = await self._image(msg["image"], "image") if msg.get("image") else None
        self.units.append(pcm)
        self.frames.append(frame)
        await self.send({"type": "input.received", "units": len(self.units),
                         "audio_seconds": round(sum(map(len, self.units)) / AUDIO_RATE, 3),
                         "frames": sum(f is not None for f in self.frames)})

    async def _image(self, data: str, param: str):
        raw = decode_data_url(data, param) if data.startswith("data:") else decode_base64(data, param)
        return await asyncio.to_thread(self.decoder.image, raw, param)

    async def _input_image(self, msg: dict) -> None:
        self.images.append(await self._image(str(msg.get("image") or ""), "image"))
        await self.send({"type": "input.received", "units": len(self.units), "images": len(self.images)})

    async def _input_text(self, msg: dict) -> None:
        text = msg.get("text")
        if not isinstance(text, str) or not text:
            raise bad_request("input.text needs a non-empty `text` string.", "text")
        self.texts.append(text)
        await self.send({"type": "input.received", "units": len(self.units), "texts": len(self.texts)})

    async def _input_clear(self, msg: dict) -> None:
        self._clear_input()
        await self.send({"type": "input.cleared"})

    async def _reset(self, msg: dict) -> None:
        await self._cancel_response()
        self.history.clear()
        self._clear_input()
        await self.send({"type": "session.reset"})

    async def _ping(self, msg: dict) -> None:
        await self.send({"type": "pong"})

    async def _cancel(self, msg: dict) -> None:
        if self.response is None or self.response.done():
            raise bad_request("no reply is in progress.", None, "no_active_response")
        await self._cancel_response()

    async def _cancel_response(self) -> None:
        task, self.response = self.response, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _commit(self, msg: dict) -> None:
        if not (self.units or self.images or self.texts):
            raise bad_request("nothing to answer: send input.audio, input.image or input.text before input.commit.",
                              None, "empty_turn")
        await self._cancel_response()  # barge-in: a new turn interrupts the reply in progress
        user, kwargs = self._user_turn()
        self._clear_input()
        rid = f"resp_{uuid.uuid4().hex[:16]}"
        self.response = asyncio.create_task(self._respond(rid, user, kwargs))

    # --- a turn ------------------------------------------------------------------------------------------------------
    def _user_turn(self) -> tuple[dict, dict]:
        content: list = list(self.images)
        kwargs: dict = {}
        if any(f is not None for f in self.frames):
            for frame, pcm in zip(self.frames, self.units):  # official omni layout: frame, then its second
                content += ([frame] if frame is not None else []) + [pcm]
            kwargs = {"omni_input": True, "max_slice_nums": 1, "use_image_id": False}
        elif self.units:
            content.append(np.concatenate(self.units))
        content += self.texts
        return {"role": "user", "content": content}, kwargs

    def _turn_job(self, user: dict, kwargs: dict) -> Job:
        c = self.config
        msgs: list[dict] = [{"role": "system", "content": c.instructions}] if c.instructions else []
        speak = bool(c.output_audio)
        msgs += self.voice_msgs if speak else []
        for u, a in self.history:
            msgs += [u, a]
        msgs.append(user)
        sampling = chatlib.sampling_options(c)
        return Job(messages=msgs, prompt_kwargs=kwargs, sampling=sampling,
                   max_new_tokens=c.max_tokens or self.s.max_tokens, speak=speak, stream_audio=speak,
                   tts_seed=c.seed)

    async def _respond(self, rid: str, user: dict, kwargs: dict) -> None:
        t0 = time.perf_counter()
        timing = {"first_token_ms": None, "first_audio_ms": None, "total_ms": None}
        status, text, usage, seq = "completed", [], {}, 0

        def ms() -> float:
            return round((time.perf_counter() - t0) * 1000.0, 1)

        await self.send({"type": "response.created", "response_id": rid})
        events = None
        try:
            events = self.engine.run(self._turn_job(user, kwargs))
            async for ev in events:
                if isinstance(ev, PromptReady):
                    usage = {"prompt_tokens": ev.prompt_tokens, "audio_tokens": ev.audio_tokens,
                             "image_tokens": ev.image_tokens}
                elif isinstance(ev, TextDelta):
                    timing["first_token_ms"] = timing["first_token_ms"] or ms()
                    text.append(ev.text)
                    await self.send({"type": "response.text.delta", "response_id": rid, "delta": ev.text})
                elif isinstance(ev, AudioDelta):
                    timing["first_audio_ms"] = timing["first_audio_ms"] or ms()
                    await self.send({"type": "response.audio.delta", "response_id": rid, "seq": seq,
                                     "audio": base64.b64encode(chatlib.pcm16(ev.pcm)).decode()})
                    seq += 1
                elif isinstance(ev, Finished):
                    usage["completion_tokens"] = ev.completion_tokens
                    status = "interrupted" if ev.finish_reason == "interrupted" else "completed"
        except asyncio.CancelledError:
            status = "interrupted"
        except Exception as e:
            status = "failed"
            await self.send_error(e)
        finally:
            if events is not None:
                await events.aclose()
        if status != "failed":
            self.history.append((user, {"role": "assistant", "content": "".join(text)}))
            del self.history[:-MAX_HISTORY_TURNS]
        timing["total_ms"] = ms()
        await self.send({"type": "response.done", "response_id": rid, "status": status, "text": "".join(text),
                         "usage": usage, "timing": timing})
