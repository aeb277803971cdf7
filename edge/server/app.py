"""The OpenAI-compatible HTTP server: `create_app(settings)` and `serve(settings)`.

Routes: POST /v1/chat/completions (JSON or SSE), POST /v1/audio/transcriptions (multipart), POST
/v1/audio/speech, GET /v1/models, GET /health, WS /v1/realtime (see edge/server/realtime.py).

Request hygiene, before any model work: bodies above `max_body_bytes` get 413 (from Content-Length when
given, else while reading), JSON endpoints want `Content-Type: application/json` (415 otherwise) and valid
JSON (400), every validation error is an OpenAI-shaped 400 naming the field. With `api_key` set, /v1 wants
`Authorization: Bearer KEY` (401). Requests wait for a slot in FIFO order (429 when the queue is full); a
client that disconnects (while queued, while the reply is generated, or mid-stream) cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge import __version__, keys
from edge.sampling import SamplingOptions
from edge.server import chat as chatlib
from edge.server.engine import AudioChunk, Engine, Finished, Job, PromptReady
from edge.server.errors import APIError, BodyTooLargeError, bad_request, format_validation, from_exception, key_matches
from edge.server.media import AUDIO_RATE, MediaDecoder
from edge.server.realtime import RealtimeSession
from edge.server.settings import ServerSettings
from edge.server.types import ChatCompletionRequest, ModelCard, ModelList, SpeechRequest
from edge.server.web import mount_web

log = logging.getLogger("edge.server")

# Official ASR example of the model card: this prompt, then the audio, with the TTS template and temperature 0.3.
ASR_PROMPT = "Please listen to the audio snippet carefully and transcribe the content.\n"
ASR_TEMPERATURE = 0.3
# Official TTS example of the model card ("voice_cloning" mode) asks the model to read the text; here the
# speaker state comes from that prompt and the TTS speaks `input` verbatim (no LLM decode).
TTS_READ_PROMPT = "Please read the text below."
MAX_SPEECH_CHARS = 4096  # OpenAI's limit for /v1/audio/speech `input`
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE_STATUS = 499  # nginx's "client closed request": logged only, nobody reads it
# An over-limit body is read and discarded up to this size before the 413 is sent: a client (curl, httpx) writes
# the whole body before it reads the answer, and a server that closes with unread bytes resets the connection, so
# the client would see "connection reset" instead of the 413 (seen in about 1 of 3 test runs with 50 MB). Only
# local bandwidth is spent; beyond this size the connection is closed unread.
DRAIN_MAX_BYTES = 256 * 2**20


# --- ASGI middleware -----------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """413 on a declared Content-Length above the limit (the body is never read) or once the read body exceeds it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= DRAIN_MAX_BYTES:
                await _drain(receive)
            err = BodyTooLargeError(self.limit, int(declared))
            resp = JSONResponse(err.body(), err.status, headers={"Connection": "close"})
            return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLargeError(self.limit)
            return msg

        await self.app(scope, limited, send)


async def _drain(receive) -> None:
    """Read and drop the request body (see DRAIN_MAX_BYTES): after the response, receive() no longer reads it."""
    while True:
        msg = await receive()
        if msg["type"] != "http.request" or not msg.get("more_body"):
            return


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every /v1 HTTP route (the WebSocket checks its own, see realtime.py)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not key_matches(auth.removeprefix("Bearer ").strip(), self.key):
                err = APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with the key the "
                               "server was started with (--api-key).", code="invalid_api_key")
                return await JSONResponse(err.body(), err.status)(scope, receive, send)
        await self.app(scope, receive, send)


# --- request helpers -----------------------------------------------------------------------------------------------
async def read_json(request: Request, model: type[BaseModel]):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype != "application/json":
        raise APIError(415, f"Content-Type {ctype!r} is not supported here; send the body as JSON with "
                       "`Content-Type: application/json`.", code="unsupported_media_type")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}); check quoting and commas.", None,
                          "invalid_json") from e
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation(e) from e


class ClientGone(Exception):
    pass


async def until_disconnected(request: Request, coro):
    """Await `coro`, cancelling it if the client disconnects first (then raise ClientGone)."""
    task = asyncio.ensure_future(coro)

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def collect(events) -> tuple[list, Finished | None]:
    out, finished = [], None
    async with contextlib.aclosing(events):
        async for ev in events:
            out.append(ev)
            if isinstance(ev, Finished):
                finished = ev
    return out, finished


# --- the app -------------------------------------------------------------------------------------------------------
def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without `engine` the model is loaded at startup (and closed at shutdown)."""
    holder = {"engine": engine}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        owned = holder["engine"] is None
        if owned:
            holder["engine"] = await run_in_threadpool(Engine.load, settings)
        yield
        if owned:
            holder["engine"].close()

    app = FastAPI(title="MiniCPM-o Edge", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    decoder = MediaDecoder(settings)

    def eng() -> Engine:
        return holder["engine"]

    def error_response(e: BaseException) -> JSONResponse:
        err = from_exception(e)
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        return error_response(format_validation(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        msg = f"{request.method} {request.url.path}: {e.detail}" + (
            "; see GET /docs for the routes" if e.status_code in (404, 405) else "")
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        return error_response(e)

    async def run_job(request: Request, job: Job):
        """Collect a job's events, cancelling it if the client leaves."""
        return await until_disconnected(request, collect(eng().run(job)))

    @app.get("/health")
    async def health():
        e = eng()
        return {"status": "ok", "model": settings.model_name, "version": __version__,
                "bundle": str(e.omni.bundle.root), "random_weights": bool(e.omni.random_weights),
                "n_ctx": e.n_ctx, **e.health()}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name, created=int(time.time()))]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {settings.model_name!r}.",
                           param="model", code="model_not_found")
        return ModelCard(id=settings.model_name, created=int(time.time())).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatCompletionRequest)
        e = eng()
        plan, max_new = chatlib.check_request(req, settings, e.has_part(keys.PART_TTS))
        converted = await run_in_threadpool(decoder.convert, req.messages)
        voice = await run_in_threadpool(chatlib.voice_messages, req.audio.voice if req.audio else "default",
                                        decoder, "audio.voice") if plan.speak else []
        job = chatlib.make_job(req, converted, plan, max_new, voice)
        try:
            if not plan.stream:
                return JSONResponse(await until_disconnected(
                    request, chatlib.complete(e.run(job), plan, settings.model_name)))
            events = e.run(job)
            try:
                first = await until_disconnected(request, events.__anext__())
            except BaseException:
                await events.aclose()
                raise
            return StreamingResponse(chatlib.sse_stream(events, first, plan, settings.model_name),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise APIError(415, "send the audio as multipart/form-data with a `file` field (as the OpenAI "
                           "client does).", code="unsupported_media_type")
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad_request("the `file` field (the audio file) is missing.", "file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "text"):
            raise bad_request(f"response_format {fmt!r} is not supported; use json or text.", "response_format")
        if str(form.get("stream") or "false").lower() == "true":
            raise bad_request("streaming transcription is not supported; omit stream.", "stream", "unsupported")
        try:
            temperature = float(form.get("temperature") or ASR_TEMPERATURE)
        except ValueError:
            raise bad_request("temperature must be a number.", "temperature") from None
        wave = await run_in_threadpool(decoder.audio, await upload.read(), "file")
        if len(wave) / AUDIO_RATE > settings.max_audio_seconds:
            raise bad_request(f"the audio is {len(wave) / AUDIO_RATE:.1f} s; the limit is "
                              f"{settings.max_audio_seconds:.0f} s (--max-audio-seconds).", "file")
        sampling = SamplingOptions(temperature=temperature, greedy=temperature == 0)
        job = Job(messages=[{"role": "user", "content": [ASR_PROMPT, wave]}],
                  prompt_kwargs={"use_tts_template": True}, sampling=sampling, max_new_tokens=settings.max_tokens)
        try:
            events, finished = await run_job(request, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        text = finished.text if finished else ""
        if fmt == "text":
            return PlainTextResponse(text)
        prompt = next(ev for ev in events if isinstance(ev, PromptReady))
        return {"text": text, "usage": {"type": "tokens", "input_tokens": prompt.prompt_tokens,
                                        "input_token_details": {"audio_tokens": prompt.audio_tokens},
                                        "output_tokens": finished.completion_tokens if finished else 0,
                                        "total_tokens": prompt.prompt_tokens + (finished.completion_tokens
                                                                                if finished else 0)}}

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        req = await read_json(request, SpeechRequest)
        e = eng()
        if not e.has_part(keys.PART_TTS):
            raise bad_request("this bundle has no TTS part, so it cannot speak.", None, "unsupported")
        if len(req.input) > MAX_SPEECH_CHARS:
            raise bad_request(f"input is {len(req.input)} characters; the limit is {MAX_SPEECH_CHARS}.", "input")
        if req.speed not in (None, 1.0):
            raise bad_request("speed is not supported (the model speaks at its own pace); omit it or send 1.0.",
                              "speed", "unsupported")
        fmt = req.response_format.lower()
        if fmt not in chatlib.AUDIO_FORMATS:
            raise bad_request(f"response_format {fmt!r} is not supported; use wav, mp3, flac, opus or pcm.",
                              "response_format")
        voice = await run_in_threadpool(chatlib.voice_messages, req.voice, decoder, "voice")
        msgs = voice + [{"role": "user", "content": [TTS_READ_PROMPT, req.input]}]
        job = Job(messages=msgs, speak_text=req.input, stream_audio=True, tts_seed=req.seed)
        try:
            events, _ = await run_job(request, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        chunks = [ev for ev in events if isinstance(ev, AudioChunk)]
        wave = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)
        rate = chunks[0].sample_rate if chunks else e.omni.tts.sample_rate
        data = await run_in_threadpool(chatlib.encode_audio, wave, rate, fmt)
        return Response(data, media_type=chatlib.AUDIO_FORMATS[fmt][2],
                        headers={"X-Sample-Rate": str(rate)})

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await RealtimeSession(ws, eng(), settings, decoder).run()

    mount_web(app, settings, eng)  # the browser demo at / (edge/server/web.py)
    return app


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Load the bundle, then serve until interrupted (what `minicpmo-edge serve` runs)."""
    import uvicorn

    engine = Engine.load(settings)
    b = engine.omni.bundle
    print(f"model: {b.root} ({b.source.get('name')})" + ("  [RANDOM WEIGHTS]" if b.random_weights else ""))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"WARNING: listening on {settings.host} without an API key: anyone on the network can use it.")
    print(f"OpenAI-compatible API on http://{settings.host}:{settings.port}/v1 (docs: /docs)")
    print(f"web demo (camera + mic): http://{settings.host}:{settings.port}/")
    try:
        uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, log_level=log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.close()
