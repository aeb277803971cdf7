"""The OpenAPI schema's request bodies, and the /docs page served from a package (works offline).

Why: the POST routes read their bodies themselves (to give OpenAI-shaped errors and check Content-Type), so
FastAPI does not know what they take; `OPENAPI_BODIES` says it (the same pydantic models that validate them),
which is what /docs and schema-driven fuzzers (tests/test_server_fuzz.py) read. FastAPI's own /docs loads its
script and style from a CDN, blank without a network; here they come from the `swagger-ui-bundle` package, and
without that package there is no /docs page (GET /openapi.json still works).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema

from edge.server.types import ChatCompletionRequest, SpeechRequest

REF = "#/components/schemas/{model}"
DOCS_PATH = "/docs"
DOCS_ASSETS = "/docs-assets"
_JSON_MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/audio/speech": SpeechRequest}


def _json_body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model=model.__name__)}}}}}


_TRANSCRIPTION_FORM = {
    "type": "object", "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "the audio file (WAV, FLAC, OGG, MP3)"},
        "model": {"type": "string"},
        "response_format": {"type": "string", "enum": ["json", "text"], "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.3},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
    },
}

OPENAPI_BODIES: dict[str, dict] = {
    **{path: _json_body(model) for path, model in _JSON_MODELS.items()},
    "/v1/audio/transcriptions": {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _TRANSCRIPTION_FORM}}}},
}


def _schema(app: FastAPI) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in _JSON_MODELS.values()], ref_template=REF)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


def _swagger_dir():
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return swagger_ui_path if (swagger_ui_path / "swagger-ui-bundle.js").is_file() else None


def install_openapi(app: FastAPI) -> None:
    """Schema with request bodies at /openapi.json; /docs from the local swagger-ui-bundle files, if installed."""
    app.openapi = lambda: _schema(app)
    assets = _swagger_dir()
    if assets is None:
        return
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")
