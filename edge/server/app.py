"""The OpenAI-compatible HTTP server: `create_app(settings)` and `serve(settings)`.

Routes: POST /v1/chat/completions (JSON or SSE), POST /v1/audio/transcriptions (multipart), POST
/v1/audio/speech, GET /v1/models, GET /health, WS /v1/realtime (see edge/server/realtime.py).

Request hygiene, before any model work: bodies above `max_body_bytes` get 413 (from Content-Length when
given, else while reading), JSON endpoints want `Content-Type: application/json` (415 otherwise) and valid
JSON (400), every validation error is an OpenAI-shaped 400 naming the field. With `api_key` set, /v1 wants
`Authorization: Bearer KEY` (401). Requests wait for a slot in FIFO order (429 when the queue is full); a
client that disconnects (while queued, while the reply is generated, or mid-stream) cancels its request.

Hardening (issue 19): a request takes its place in line (edge/server/gate.py) before its media are decoded, and
the decoding stops if the client leaves; media cost is checked on headers first (edge/server/media.py); JSON is
parsed by edge/server/jsonbody.py (depth, NaN, lone surrogates -> 400); Host/Origin checks and header/body
deadlines are in edge/server/guards.py. Expected client errors are logged as one line, and the traceback of a
failed request is dropped with it (it would keep the request's decoded images alive until a GC run).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import threading
import time

import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge import __version__, keys
from edge.errors import CancelledError as WorkCancelled
from edge.errors import EdgeError
from edge.sampling import SamplingOptions
from edge.server import chat as chatlib
from edge.server.engine import AudioChunk, Engine, Finished, Job, PromptReady
from edge.server.errors import APIError, BodyTooLargeError, bad_request, format_validation, from_exception, key_matches
from edge.server.gate import RequestGate, Ticket
from edge.server.guards import BodyDeadlineMiddleware, HostOriginMiddleware, uvicorn_options
from edge.server.jsonbody import parse_json
from edge.server.media import MediaDecoder
from edge.server.openapi import OPENAPI_BODIES, install_openapi
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
MAX_ASR_TEMPERATURE = 1.0  # OpenAI's range for /v1/audio/transcriptions `temperature`: 0 to 1
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
    """The body as `model`. `Content-Type: application/json` is required: without it a browser page on any
    site could POST here with no CORS preflight (text/plain is a "simple" type)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        shown = repr(ctype) if ctype else "missing"
        raise APIError(415, f"Content-Type {shown} is not supported here; send the body as JSON with "
                       "`Content-Type: application/json`.", code="unsupported_media_type")
    data = parse_json(await request.body())
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object.", None, "invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation(e) from None
    except RecursionError:
        raise bad_request("the request is nested too deeply.", None, "invalid_json") from None


async def decode_until_gone(request: Request, fn, *args):
    """Run a media decoder `fn(*args, cancel=event)` in a thread; if the client leaves, set the event (the
    decoder stops at its next check) and raise ClientGone."""
    cancel = threading.Event()
    try:
        return await until_disconnected(request, run_in_threadpool(fn, *args, cancel=cancel))
    finally:
        cancel.set()


def drop_traceback(e: BaseException) -> None:
    """Cut the error's traceback (and its causes'): the frames hold the failed request's locals, e.g. decoded
    images, in a reference cycle that only a full GC run would free; the response needs only the message."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


async def _released(stream, ticket: Ticket):
    try:
        async for chunk in stream:
            yield chunk
    finally:
        ticket.release()


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


def _load_checked(settings: ServerSettings) -> Engine:
    """The engine, after the cheap whole-bundle check (sizes, ONNX headers): a damaged file stops the start with
    its name, instead of a raw onnxruntime error on first use while /health says ok."""
    from edge.bundle import require_intact
    from edge.default_bundle import resolve_bundle

    require_intact(resolve_bundle(settings.bundle))
    return Engine.load(settings)


# --- the app -------------------------------------------------------------------------------------------------------
def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without `engine` the model is loaded at startup (and closed at shutdown)."""
    holder = {"engine": engine}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        owned = holder["engine"] is None
        if owned:
            holder["engine"] = await run_in_threadpool(_load_checked, settings)
        yield
        if owned:
            holder["engine"].close()

    app = FastAPI(title="MiniCPM-o Edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    app.add_middleware(BodyDeadlineMiddleware, seconds=settings.body_timeout)
    app.add_middleware(HostOriginMiddleware, settings=settings)  # outermost: refused before anything is read
    decoder = MediaDecoder(settings)
    gate = RequestGate(settings.concurrency, settings.max_queue)

    def eng() -> Engine:
        return holder["engine"]

    def error_response(e: BaseException, request: Request | None = None) -> JSONResponse:
        err = from_exception(e)
        if err.status < 500 and request is not None:  # an expected client error: one line, no traceback
            log.info("%d %s %s: %s", err.status, request.method, request.url.path, err.message)
        drop_traceback(e)
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e, request)

    @app.exception_handler(EdgeError)  # the runtime's typed errors (context length, bad input, ...): no re-raise
    async def _edge_error(request, e: EdgeError):
        return error_response(e, request)

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
        return error_response(e, request)

    async def run_job(request: Request, job: Job):
        """Collect a job's events, cancelling it if the client leaves."""
        return await until_disconnected(request, collect(eng().run(job)))

    @app.get("/health")
    async def health():
        """No filesystem paths (the bundle's name only). Requests in line wait in the gate: counted here."""
        e = eng()
        h = e.health()
        h.update(running=max(h["running"], gate.running), queued=h["queued"] + gate.queued,
                 rejected=h["rejected"] + gate.rejected)
        bundle = e.omni.bundle
        return {"status": "ok", "model": settings.model_name, "version": __version__,
                "bundle": bundle.source.get("name") or bundle.root.name,
                "random_weights": bool(e.omni.random_weights), "n_ctx": e.n_ctx, **h}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=settings.model_name, created=int(time.time()))]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {settings.model_name!r}.",
                           param="model", code="model_not_found")
        return ModelCard(id=settings.model_name, created=int(time.time())).model_dump()

    async def admit(request: Request) -> Ticket:
        """A place in line before any media work (429 when the queue is full; ClientGone if the client leaves)."""
        return await until_disconnected(request, gate.enter())

    @app.post("/v1/chat/completions", openapi_extra=OPENAPI_BODIES["/v1/chat/completions"])
    async def chat_completions(request: Request):
        req = await read_json(request, ChatCompletionRequest)
        e = eng()
        plan, max_new = chatlib.check_request(req, settings, e.has_part(keys.PART_TTS))
        handed = False
        try:
            ticket = await admit(request)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        try:
            converted = await decode_until_gone(request, functools.partial(decoder.convert, n_ctx=e.n_ctx),
                                                req.messages)
            voice = await run_in_threadpool(chatlib.voice_messages, req.audio.voice if req.audio else "default",
                                            decoder, "audio.voice") if plan.speak else []
            job = chatlib.make_job(req, converted, plan, max_new, voice)
            del converted, voice  # the job holds the media now; nothing else keeps them alive
            if not plan.stream:
                return JSONResponse(await until_disconnected(
                    request, chatlib.complete(e.run(job), plan, settings.model_name)))
            events = e.run(job)
            try:
                first = await until_disconnected(request, events.__anext__())
            except BaseException:
                await events.aclose()
                raise
            body = _released(chatlib.sse_stream(events, first, plan, settings.model_name), ticket)
            ticket.bind(body)
            handed = True
            return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
        except (ClientGone, WorkCancelled):
            return Response(status_code=CLIENT_GONE_STATUS)
        finally:
            if not handed:
                ticket.release()

    @app.post("/v1/audio/transcriptions", openapi_extra=OPENAPI_BODIES["/v1/audio/transcriptions"])
    async def transcriptions(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise APIError(415, "send the audio as multipart/form-data with a `file` field (as the OpenAI "
                           "client does).", code="unsupported_media_type")
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad_request("the `file` field (the audio file) is missing.", "file")
        for name in ("response_format", "stream", "temperature", "model", "language", "prompt"):
            if name in form and not isinstance(form.get(name), str):
                raise bad_request(f"`{name}` must be a plain form field, not a file.", name)
        fmt = str(form.get("response_format") or "json")
        if fmt not in ("json", "text"):
            raise bad_request(f"response_format {fmt!r} is not supported; use json or text.", "response_format")
        if str(form.get("stream") or "false").lower() == "true":
            raise bad_request("streaming transcription is not supported; omit stream.", "stream", "unsupported")
        try:
            temperature = float(form.get("temperature") or ASR_TEMPERATURE)
        except ValueError:
            raise bad_request("temperature must be a number.", "temperature") from None
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_ASR_TEMPERATURE):
            raise bad_request(f"temperature must be a number from 0 to {MAX_ASR_TEMPERATURE:g}, got {temperature}.",
                              "temperature")
        data = await upload.read()
        try:
            ticket = await admit(request)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        try:
            wave = await decode_until_gone(request, decoder.audio, data, "file", None)
            del data
            sampling = SamplingOptions(temperature=temperature, greedy=temperature == 0)
            job = Job(messages=[{"role": "user", "content": [ASR_PROMPT, wave]}],
                      prompt_kwargs={"use_tts_template": True}, sampling=sampling,
                      max_new_tokens=settings.max_tokens)
            del wave
            events, finished = await run_job(request, job)
        except (ClientGone, WorkCancelled):
            return Response(status_code=CLIENT_GONE_STATUS)
        finally:
            ticket.release()
        text = finished.text if finished else ""
        if fmt == "text":
            return PlainTextResponse(text)
        prompt = next(ev for ev in events if isinstance(ev, PromptReady))
        return {"text": text, "usage": {"type": "tokens", "input_tokens": prompt.prompt_tokens,
                                        "input_token_details": {"audio_tokens": prompt.audio_tokens},
                                        "output_tokens": finished.completion_tokens if finished else 0,
                                        "total_tokens": prompt.prompt_tokens + (finished.completion_tokens
                                                                                if finished else 0)}}

    @app.post("/v1/audio/speech", openapi_extra=OPENAPI_BODIES["/v1/audio/speech"])
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
        try:
            ticket = await admit(request)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        try:
            voice = await run_in_threadpool(chatlib.voice_messages, req.voice, decoder, "voice")
            msgs = voice + [{"role": "user", "content": [TTS_READ_PROMPT, req.input]}]
            job = Job(messages=msgs, speak_text=req.input, stream_audio=True, tts_seed=req.seed)
            events, _ = await run_job(request, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE_STATUS)
        finally:
            ticket.release()
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
    install_openapi(app)  # request-body schemas for /openapi.json, and /docs served from a package (offline)
    return app


def serve(settings: ServerSettings, *, log_level: str = "info") -> None:
    """Load the bundle, then serve until interrupted (what `minicpmo-edge serve` runs)."""
    import uvicorn

    engine = _load_checked(settings)
    b = engine.omni.bundle
    print(f"model: {b.root} ({b.source.get('name')})" + ("  [RANDOM WEIGHTS]" if b.random_weights else ""))
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"WARNING: listening on {settings.host} without an API key: anyone on the network can use it.")
    print(f"OpenAI-compatible API on http://{settings.host}:{settings.port}/v1 (docs: /docs)")
    print(f"web demo (camera + mic): http://{settings.host}:{settings.port}/")
    try:
        uvicorn.run(create_app(settings, engine), host=settings.host, port=settings.port, log_level=log_level,
                    timeout_graceful_shutdown=5, **uvicorn_options(settings))
    finally:
        engine.close()
