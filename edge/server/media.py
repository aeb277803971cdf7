"""OpenAI message parts -> the runtime's message content (text, PIL images, 16 kHz float32 audio, video frames).

URL policy (each refusal is a 4xx naming the switch that allows it):
- `data:` URLs (base64) are always accepted: the media travels in the request, bounded by the body limit.
- `http(s)://` URLs only with `allow_http_media` (off by default: a local server should not fetch the web for
  whoever can reach it).
- `file://` URLs only inside `media_dir`, resolved (symlinks and `..` included) before the check, so a path
  that escapes the directory is refused (403); video files additionally need `allow_local_video`.
Media bytes go through the runtime's loaders (`edge.io`), which reject non-images / non-audio with clear errors.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import InvalidInputError
from edge.server.errors import APIError, bad_request
from edge.server.settings import ServerSettings
from edge.server.types import AudioURLPart, ChatMessage, ImagePart, InputAudioPart, TextPart, VideoURLPart

AUDIO_RATE = AUDIO_SAMPLE_RATE  # what load_audio returns
# Below 3 mel frames (30 ms) the official processor makes no audio tokens at all; 0.1 s is a usable floor.
MIN_AUDIO_SECONDS = 0.1
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus")  # what libsndfile decodes
HTTP_TIMEOUT_SECONDS = 10.0
_DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


@dataclass
class ConvertedMessages:
    """Runtime messages plus what the request carries (for prompt options and limits)."""

    messages: list[dict]
    n_images: int = 0
    n_video_frames: int = 0
    audio_seconds: float = 0.0
    audio_clips: list[np.ndarray] = field(default_factory=list)

    @property
    def prompt_kwargs(self) -> dict:
        # The official video recipe encodes every image unsliced and without ids (edge/io/video.py); with a
        # video in the request those settings apply to the whole prompt, as in the official examples.
        return {"max_slice_nums": 1, "use_image_id": False} if self.n_video_frames else {}


class MediaDecoder:
    def __init__(self, settings: ServerSettings):
        self.s = settings

    # --- bytes from a URL ----------------------------------------------------------------------------------------
    def fetch(self, url: str, param: str, *, kind: str) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, param)
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            return self._fetch_http(url, param)
        if scheme == "file":
            return self._read_file(url, param, kind)
        raise bad_request(f"{param}: unsupported URL {url[:60]!r}; send the {kind} as a data URL "
                          f"(data:<mime>;base64,<data>).", param, "invalid_url")

    def _fetch_http(self, url: str, param: str) -> bytes:
        if not self.s.allow_http_media:
            raise bad_request(f"{param}: http(s) URLs are off on this server; send the media as a data URL, or "
                              "start the server with --allow-http-media.", param, "http_media_disabled")
        import httpx

        try:
            with httpx.stream("GET", url, timeout=HTTP_TIMEOUT_SECONDS, follow_redirects=True) as r:
                r.raise_for_status()
                chunks, size = [], 0
                for c in r.iter_bytes():
                    size += len(c)
                    if size > self.s.max_body_bytes:
                        raise bad_request(f"{param}: {url} is larger than {self.s.max_body_bytes} bytes.", param)
                    chunks.append(c)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise bad_request(f"{param}: cannot fetch {url}: {e}", param, "fetch_failed") from e

    def _read_file(self, url: str, param: str, kind: str) -> bytes:
        root = self.s.media_root
        if root is None:
            raise APIError(403, f"{param}: file:// URLs are off on this server; send the {kind} as a data URL, "
                           "or start the server with --media-dir DIR.", type="permission_error", param=param,
                           code="local_files_disabled")
        if kind == "video" and not self.s.allow_local_video:
            raise APIError(403, f"{param}: local video files are off; start the server with --allow-local-video "
                           "(and --media-dir), or send the video as a data URL.", type="permission_error",
                           param=param, code="local_video_disabled")
        parsed = urlparse(url)
        raw = unquote(parsed.netloc + parsed.path) if parsed.netloc not in ("", "localhost") else unquote(parsed.path)
        path = Path(raw)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise APIError(403, f"{param}: {url!r} points outside the server's media directory; only files under "
                           "--media-dir can be read.", type="permission_error", param=param, code="path_forbidden")
        if not path.is_file():
            raise bad_request(f"{param}: {path.relative_to(root)} does not exist in the media directory.", param,
                              "file_not_found")
        return path.read_bytes()

    # --- decoders -------------------------------------------------------------------------------------------------
    def image(self, data: bytes, param: str):
        from edge.io.images import ImageLoadOptions, load_image

        return _with_param(param, load_image, data, ImageLoadOptions(max_pixels=self.s.max_image_pixels))

    def audio(self, data: bytes, param: str, fmt: str | None = None) -> np.ndarray:
        from edge.io.audio import load_audio

        if fmt is not None and fmt.lower() not in INPUT_AUDIO_FORMATS:
            raise bad_request(f"{param}.format {fmt!r} is not supported; use one of {', '.join(INPUT_AUDIO_FORMATS)}.",
                              f"{param}.format")
        wave = _with_param(param, load_audio, data)
        seconds = len(wave) / AUDIO_RATE
        if seconds < MIN_AUDIO_SECONDS:
            raise bad_request(f"{param}: the audio is {seconds * 1000:.0f} ms long; send at least "
                              f"{MIN_AUDIO_SECONDS * 1000:.0f} ms.", param)
        return wave

    def video(self, data: bytes, param: str) -> list:
        from edge.io.video import VideoOptions, load_video

        return _with_param(param, load_video, data, VideoOptions(max_frames=self.s.max_video_frames)).frames

    # --- messages --------------------------------------------------------------------------------------------------
    def convert(self, messages: list[ChatMessage]) -> ConvertedMessages:
        out = ConvertedMessages([])
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            content = [m.content] if isinstance(m.content, str) else (m.content or [])
            items: list = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]")
                items.extend(self._part(part, param, role, out))
            out.messages.append({"role": role, "content": items if items else ""})
        if out.audio_seconds > self.s.max_audio_seconds:
            raise bad_request(f"the request has {out.audio_seconds:.1f} s of audio; the limit is "
                              f"{self.s.max_audio_seconds:.0f} s (--max-audio-seconds).", "messages")
        return out

    def _part(self, part, param: str, role: str, out: ConvertedMessages) -> list:
        if isinstance(part, str):
            return [part]
        if isinstance(part, TextPart):
            return [part.text]
        if role != "user":
            raise bad_request(f"{param}: only user messages may carry images, audio or video ({role} message).",
                              param)
        if isinstance(part, ImagePart):
            out.n_images += 1
            p = f"{param}.image_url"
            return [self.image(self.fetch(part.image_url.url, p, kind="image"), p)]
        if isinstance(part, InputAudioPart):
            raw = decode_base64(part.input_audio.data, f"{param}.input_audio.data")
            return [self._count_audio(self.audio(raw, f"{param}.input_audio", part.input_audio.format), out)]
        if isinstance(part, AudioURLPart):
            raw = self.fetch(part.audio_url.url, f"{param}.audio_url", kind="audio")
            return [self._count_audio(self.audio(raw, f"{param}.audio_url"), out)]
        if isinstance(part, VideoURLPart):
            p = f"{param}.video_url"
            frames = self.video(self.fetch(part.video_url.url, p, kind="video"), p)
            out.n_video_frames += len(frames)
            return list(frames)
        raise bad_request(f"{param}: unsupported content part {type(part).__name__}.", param)

    @staticmethod
    def _count_audio(wave: np.ndarray, out: ConvertedMessages) -> np.ndarray:
        out.audio_seconds += len(wave) / AUDIO_RATE
        out.audio_clips.append(wave)
        return wave


def decode_base64(data: str, param: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param} is not valid base64 ({e}).", param, "invalid_base64") from e
    if not raw:
        raise bad_request(f"{param} is empty.", param)
    return raw


def decode_data_url(url: str, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request(f"{param} is not a valid data URL; use data:<mime>;base64,<data>.", param, "invalid_url")
    if not m.group("b64"):
        raise bad_request(f"{param}: only base64 data URLs are supported (data:<mime>;base64,<data>).", param,
                          "invalid_url")
    return decode_base64(m.group("data"), param)


def _with_param(param: str, fn, *args):
    """Run a loader, prefixing its InvalidInputError with the request field it came from."""
    try:
        return fn(*args)
    except InvalidInputError as e:
        raise bad_request(f"{param}: {e}", param, "invalid_input") from e
