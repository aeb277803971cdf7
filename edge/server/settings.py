"""Server settings: one typed dataclass, each field with its help text, turned into CLI flags by `add_arguments`.

Why a dataclass and not pydantic-settings: the CLI must build its parser without importing the server stack
(`import edge` and `minicpmo-edge --help` stay free of fastapi/uvicorn), and the fields double as the flags.
Defaults are safe for a laptop: bind to 127.0.0.1, no remote URLs, no local files, bounded bodies and queues.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_ENV = "MINICPMO_EDGE_API_KEY"  # read when --api-key is not given, so the key stays out of `ps`
DEFAULT_PORT = 8080  # llama-server's default port
DEFAULT_MODEL_NAME = "minicpm-o-2_6"
# The official chat() default max_new_tokens (spec §4.1); also the most one request may ask for.
DEFAULT_MAX_TOKENS = 2048
# Base64 inflates by 4/3: 32 MiB carries ~24 MB of media, e.g. a 20-MB photo (OpenAI's per-image cap) + audio.
DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# A 24-MP camera photo fits; JPEGs above it are decoded at a reduced DCT scale (see edge/io/images.py).
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
# Audio tokens are 25 per second (spec §2.3): 120 s is 3000 tokens, most of a 4096-token context.
DEFAULT_MAX_AUDIO_SECONDS = 120.0
# Video frames cost 64 tokens each (one unsliced image per frame): 16 frames = 1024 tokens.
DEFAULT_MAX_VIDEO_FRAMES = 16
DEFAULT_QUEUE = 32
# Images per request: each costs 64-640 prompt tokens (1-10 slices), so 16 already fill a 4096-token context.
DEFAULT_MAX_IMAGES = 16
# Decoded media per request (RGB images/frames, audio decoded at its own rate): three 25-MP photos fit.
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20
# One fetched media file (file:// or http): the body limit, since data URLs are bounded by it too.
DEFAULT_MAX_MEDIA_BYTES = DEFAULT_MAX_BODY_BYTES
# Timeouts for a local assistant: a client on the same machine sends its headers at once and a 32-MiB body in
# well under a second; slow-loris connections are cut after these.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MEDIA_FETCH_TIMEOUT = 30.0  # the whole http(s) fetch, not one read
DEFAULT_KEEP_ALIVE = 5  # uvicorn's default idle keep-alive
DEFAULT_MAX_CONNECTIONS = 64  # uvicorn limit_concurrency: beyond it new requests get 503
# WebSocket: a ping every 20 s, dead peers closed 20 s later (uvicorn's defaults); a live session with no
# client message and no reply running for this long is closed (the page reconnects when used again).
DEFAULT_WS_PING_INTERVAL = 20.0
DEFAULT_WS_PING_TIMEOUT = 20.0
DEFAULT_WS_IDLE_TIMEOUT = 600.0


def _help(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass(frozen=True)
class ServerSettings:
    """Attributes: see each field's `help` (also shown by `minicpmo-edge serve --help`)."""

    bundle: str | None = field(default=None, metadata=_help(
        "bundle directory (default: an installed real bundle, else the built-in random-weights one)"))
    host: str = field(default="127.0.0.1", metadata=_help(
        "address to bind; 0.0.0.0 exposes the server to the network (set --api-key then)"))
    port: int = field(default=DEFAULT_PORT, metadata=_help("TCP port"))
    api_key: str | None = field(default=None, metadata=_help(
        f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV} if set, else no key)"))
    model_name: str = field(default=DEFAULT_MODEL_NAME, metadata=_help("model id shown by /v1/models"))
    concurrency: int = field(default=1, metadata=_help(
        "requests processed at once; media decoding/encoding and speech of admitted requests overlap, the LLM "
        "(one llama.cpp sequence) serves them one at a time in arrival order"))
    max_queue: int = field(default=DEFAULT_QUEUE, metadata=_help(
        "requests that may wait for a slot; more get HTTP 429"))
    max_body_bytes: int = field(default=DEFAULT_MAX_BODY_BYTES, metadata=_help(
        "largest request body in bytes (HTTP 413 above)"))
    max_image_pixels: int = field(default=DEFAULT_MAX_IMAGE_PIXELS, metadata=_help(
        "largest decoded image in pixels (decompression-bomb guard)"))
    max_audio_seconds: float = field(default=DEFAULT_MAX_AUDIO_SECONDS, metadata=_help(
        "most seconds of input audio per request"))
    max_video_frames: int = field(default=DEFAULT_MAX_VIDEO_FRAMES, metadata=_help(
        "frames sampled from a video (1 per second, evenly spread above this)"))
    max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata=_help(
        "largest max_tokens a request may ask for (HTTP 400 above)"))
    max_images: int = field(default=DEFAULT_MAX_IMAGES, metadata=_help("most images per request"))
    max_decoded_bytes: int = field(default=DEFAULT_MAX_DECODED_BYTES, metadata=_help(
        "most bytes a request's media may decode to (checked on headers before decoding)"))
    max_media_bytes: int = field(default=DEFAULT_MAX_MEDIA_BYTES, metadata=_help(
        "largest media file read from --media-dir or fetched over http(s)"))
    header_timeout: float = field(default=DEFAULT_HEADER_TIMEOUT, metadata=_help(
        "seconds a connection may take to send a request's headers"))
    body_timeout: float = field(default=DEFAULT_BODY_TIMEOUT, metadata=_help(
        "seconds a request may take to send its body (HTTP 408 after)"))
    media_fetch_timeout: float = field(default=DEFAULT_MEDIA_FETCH_TIMEOUT, metadata=_help(
        "seconds one http(s) media fetch may take in total (--allow-http-media)"))
    keep_alive_timeout: int = field(default=DEFAULT_KEEP_ALIVE, metadata=_help(
        "seconds an idle keep-alive connection stays open"))
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=_help(
        "open connections + running requests at most (HTTP 503 beyond)"))
    ws_ping_interval: float = field(default=DEFAULT_WS_PING_INTERVAL, metadata=_help(
        "seconds between WebSocket pings"))
    ws_ping_timeout: float = field(default=DEFAULT_WS_PING_TIMEOUT, metadata=_help(
        "seconds to wait for a pong before the socket is closed"))
    ws_idle_timeout: float = field(default=DEFAULT_WS_IDLE_TIMEOUT, metadata=_help(
        "seconds a realtime socket may stay without a client message while no reply runs"))
    allowed_origins: str = field(default="", metadata=_help(
        "comma-separated extra Origins (scheme://host[:port]) allowed to call the API and open the socket; the "
        "server's own page is always allowed"))
    allowed_hosts: str = field(default="", metadata=_help(
        "comma-separated extra Host names accepted when bound to loopback without a key (DNS-rebinding guard)"))
    allow_http_media: bool = field(default=False, metadata=_help(
        "let image_url / audio_url / video_url fetch http(s) URLs (off: data URLs only)"))
    media_dir: str | None = field(default=None, metadata=_help(
        "directory whose files may be referenced as file:// URLs (off by default; paths outside it are refused)"))
    allow_local_video: bool = field(default=False, metadata=_help(
        "let video_url read file:// URLs inside --media-dir"))
    prompt_cache: bool = field(default=True, metadata=_help(
        "keep the KV cache of the previous request and reuse its common prefix (off: every request prefills "
        "from scratch)"))
    n_ctx: int | None = field(default=None, metadata=_help(
        "LLM context length in tokens (default: the profile's n_ctx; 4096 without a profile)"))
    threads: int = field(default=0, metadata=_help(
        "CPU threads for llama.cpp and onnxruntime (0 = the profile's; all cores without a profile)"))
    # Not flags of their own here: `edge.profiles.add_profile_arguments` adds --profile/--set (the CLI's default
    # is "auto"). None keeps the pre-profile behaviour for Python callers: fp32 graphs, all cores, no memory check.
    profile: str | None = field(default=None, metadata={"flag": False})
    overrides: tuple = field(default=(), metadata={"flag": False})

    def __post_init__(self):
        for name in ("concurrency", "max_body_bytes", "max_image_pixels", "max_video_frames", "max_tokens", "n_ctx",
                     "max_images", "max_decoded_bytes", "max_media_bytes", "max_connections"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"server setting {name} must be >= 1, got {getattr(self, name)}.")
        if self.max_queue < 0 or self.max_audio_seconds <= 0:
            raise ValueError("max_queue must be >= 0 and max_audio_seconds > 0.")
        for name in ("header_timeout", "body_timeout", "media_fetch_timeout", "ws_ping_interval", "ws_ping_timeout",
                     "ws_idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"server setting {name} must be > 0 seconds, got {getattr(self, name)}.")

    @property
    def media_root(self) -> Path | None:
        return Path(self.media_dir).expanduser().resolve() if self.media_dir else None

    @property
    def origins(self) -> tuple[str, ...]:
        return tuple(o.strip().rstrip("/").lower() for o in self.allowed_origins.split(",") if o.strip())

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip())

    def replace(self, **changes) -> "ServerSettings":
        return dataclasses.replace(self, **changes)


def add_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` per settings field (bools become on/off switches)."""
    for f in dataclasses.fields(ServerSettings):
        if f.name in skip or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"{help_} (default: {'on' if f.default else 'off'})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            shown = "" if f.default is None or "default:" in help_ else f" (default: {f.default})"
            parser.add_argument(flag, type=kind, default=f.default, help=help_ + shown)


def from_args(args: argparse.Namespace, **overrides) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerSettings) if hasattr(args, f.name)}
    if "overrides" in values:
        values["overrides"] = tuple(values["overrides"])
    values.update(overrides)
    if not values.get("api_key"):
        values["api_key"] = os.environ.get(API_KEY_ENV) or None
    return ServerSettings(**values)
