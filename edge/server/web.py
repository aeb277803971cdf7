"""The browser demo: the page at `/`, its files under `/web/`, and `GET /web/config`.

The page is plain HTML/JS shipped inside the package (edge/server/static): no CDN, no build step, so the demo
works offline on the machine that serves it. It talks to the same `WS /v1/realtime` socket as any other client.

`/web/config` lives outside `/v1` on purpose: the page must learn whether an API key is needed *before* it has
one (everything under /v1 answers 401 without it). It reveals no more than `/health` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from edge import keys
from edge.constants import AUDIO_SAMPLE_RATE as AUDIO_RATE
from edge.constants import RANDOM_WEIGHTS_NOTICE, TTS_SAMPLE_RATE, UNIT_SECONDS
from edge.server.settings import ServerSettings

STATIC_DIR = Path(__file__).resolve().parent / "static"
WEB_PREFIX = "/web"
REALTIME_PATH = "/v1/realtime"
# Everything the page loads comes from this server; media only from the page's own blobs/streams. `ws:`/`wss:`
# are listed because older engines do not let 'self' cover WebSocket URLs.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; object-src 'none'; "
                           "base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
# The page's files change with the package: always revalidate (the files are small and served locally).
NO_CACHE = {"Cache-Control": "no-cache"}


class _StaticNoCache(StaticFiles):
    async def get_response(self, path, scope):
        resp = await super().get_response(path, scope)
        resp.headers.update(NO_CACHE)
        return resp


def web_config(settings: ServerSettings, engine) -> dict:
    """What the page needs before connecting: key or not, random-weights notice, speech output, audio rates."""

    bundle = engine.omni.bundle
    random_weights = bool(engine.omni.random_weights)
    return {
        "model": settings.model_name,
        "bundle_name": bundle.source.get("name") or bundle.root.name,
        "random_weights": random_weights,
        "notice": RANDOM_WEIGHTS_NOTICE if random_weights else None,
        "api_key_required": bool(settings.api_key),
        "speech_output": engine.has_part(keys.PART_TTS),
        "realtime_path": REALTIME_PATH,
        "audio": {"input_sample_rate": AUDIO_RATE, "output_sample_rate": TTS_SAMPLE_RATE,
                  "unit_seconds": UNIT_SECONDS, "format": "pcm16"},
        "limits": {"max_tokens": settings.max_tokens, "max_audio_seconds": settings.max_audio_seconds,
                   "max_body_bytes": settings.max_body_bytes},
    }


def mount_web(app: FastAPI, settings: ServerSettings, engine: Callable[[], object]) -> None:
    """Add the demo routes to `app`; `engine()` returns the loaded Engine (it is loaded at startup)."""
    if not (STATIC_DIR / "index.html").is_file():
        raise FileNotFoundError(f"the web demo files are missing from {STATIC_DIR}; reinstall the package "
                                "(pip install -e . from the checkout, or a wheel built with its package data).")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, **NO_CACHE})

    @app.get(WEB_PREFIX + "/config", include_in_schema=False)
    async def config():
        return JSONResponse(web_config(settings, engine()), headers=NO_CACHE)

    # After the config route: a mount matches its whole prefix, so it must come last.
    app.mount(WEB_PREFIX, _StaticNoCache(directory=STATIC_DIR), name="web")
