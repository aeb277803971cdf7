"""OpenAI message parts -> the runtime's message content (text, PIL images, 16 kHz float32 audio, video frames).

URL policy (each refusal is a 4xx naming the switch that allows it):
- `data:` URLs (base64) are always accepted: the media travels in the request, bounded by the body limit.
- `http(s)://` URLs only with `allow_http_media` (off by default: a local server should not fetch the web for
  whoever can reach it).
- `file://` URLs only inside `media_dir`, resolved (symlinks and `..` included) before the check, so a path
  that escapes the directory is refused (403); video files additionally need `allow_local_video`.
Media bytes go through the runtime's loaders (`edge.io`), which reject non-images / non-audio with clear errors.

Cost before work (`convert`): every media part is first fetched and its header read (image size, audio
duration, video frame size and count); the request's budget (images, frames, decoded bytes, audio seconds, and
a lower bound of its prompt tokens against the context) is checked on those numbers, and only then is anything
decoded, so an over-budget request costs a header read, not a decode. Fetches have a size cap and (http) a total
deadline; decoding stops between parts, audio blocks and video frames once `cancel` is set (client gone).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import (
    CancelledError,
    ContextLengthExceededError,
    InputLimitError,
    InvalidInputError,
)
from edge.server.errors import APIError, bad_request
from edge.server.settings import ServerSettings
from edge.server.types import AudioURLPart, ChatMessage, ImagePart, InputAudioPart, TextPart, VideoURLPart

AUDIO_RATE = AUDIO_SAMPLE_RATE  # what load_audio returns
# Below 3 mel frames (30 ms) the official processor makes no audio tokens at all; 0.1 s is a usable floor.
MIN_AUDIO_SECONDS = 0.1
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus")  # what libsndfile decodes
HTTP_READ_TIMEOUT_SECONDS = 10.0  # per read; the whole fetch has `media_fetch_timeout`
RGB_BYTES = 3  # decoded images and frames are 8-bit RGB
DECODE_BYTES_PER_SAMPLE = 8  # audio is decoded as float64 at the file's own rate before resampling
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


@dataclass
class _Pending:
    """A media part fetched and probed, not decoded yet."""

    kind: str  # image | audio | video
    data: bytes
    param: str
    fmt: str | None = None
    size: tuple[int, int] = (0, 0)  # image / frame (W, H)
    seconds: float = 0.0  # audio
    frames: int = 0  # video frames that will be sampled
    path: str | None = None  # video: the temp file the probe wrote


@dataclass
class RequestBudget:
    """What one request may cost, checked on header numbers before decoding (see the module docstring)."""

    max_images: int
    max_video_frames: int
    max_decoded_bytes: int
    max_audio_seconds: float
    n_ctx: int | None = None
    images: int = 0
    frames: int = 0
    decoded_bytes: int = 0
    audio_seconds: float = 0.0
    media_tokens: int = 0

    def add(self, p: _Pending, param: str) -> None:
        if p.kind == "image":
            self.images += 1
            if self.images > self.max_images:
                raise _limit(f"the request has more than {self.max_images} images (--max-images); send fewer "
                             "images per request.", "messages")
            self.decoded_bytes += p.size[0] * p.size[1] * RGB_BYTES
        elif p.kind == "video":
            self.frames += p.frames
            if self.frames > self.max_video_frames:
                raise _limit(f"the request's videos sample {self.frames} frames, above the limit of "
                             f"{self.max_video_frames} per request (--max-video-frames); send one shorter video.",
                             param)
            self.decoded_bytes += p.frames * p.size[0] * p.size[1] * RGB_BYTES
        else:
            self.audio_seconds += p.seconds
            if self.audio_seconds > self.max_audio_seconds:
                raise _limit(f"the request has {self.audio_seconds:.1f} s of audio; the limit is "
                             f"{self.max_audio_seconds:.0f} s (--max-audio-seconds).", param)
            self.decoded_bytes += int(p.seconds * p.size[0] * max(1, p.size[1]) * DECODE_BYTES_PER_SAMPLE)
        if self.decoded_bytes > self.max_decoded_bytes:
            raise _limit(f"the request's media would decode to {self.decoded_bytes / 2**20:.0f} MiB, above the "
                         f"{self.max_decoded_bytes / 2**20:.0f} MiB limit per request (--max-decoded-bytes); send "
                         "smaller or fewer images, shorter audio or video.", param)

    def check_tokens(self, pending: list[_Pending]) -> None:
        """A lower bound of the media's prompt tokens (slices x 64, audio chunks, 64 per frame) against n_ctx."""
        if self.n_ctx is None:
            return
        from edge.audio_encoder import chunk_token_counts
        from edge.image_preprocess import SliceOptions, plan_slices

        opts = SliceOptions(max_slice_nums=1) if any(p.kind == "video" for p in pending) else SliceOptions()
        tokens = 0
        for p in pending:
            if p.kind == "image":
                tokens += len(plan_slices(p.size, opts).slice_sizes) * opts.image_feature_size
            elif p.kind == "video":
                tokens += p.frames * opts.image_feature_size
            else:
                tokens += sum(chunk_token_counts(int(p.seconds * AUDIO_RATE)))
        self.media_tokens = tokens
        if tokens + 1 > self.n_ctx:
            raise ContextLengthExceededError(tokens + 1, self.n_ctx, (
                f"the request's media alone need at least {tokens} prompt tokens but the context holds "
                f"{self.n_ctx}; send fewer or smaller images, shorter audio or fewer video frames."))


def _limit(message: str, param: str | None) -> APIError:
    return bad_request(message, param, "input_too_large")


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

        limit, deadline = self.s.max_media_bytes, time.monotonic() + self.s.media_fetch_timeout
        try:
            with httpx.stream("GET", url, timeout=min(HTTP_READ_TIMEOUT_SECONDS, self.s.media_fetch_timeout),
                              follow_redirects=True) as r:
                r.raise_for_status()
                chunks, size = [], 0
                for c in r.iter_bytes():
                    size += len(c)
                    if size > limit:
                        raise _limit(f"{param}: {url} is larger than {limit} bytes (--max-media-bytes).", param)
                    if time.monotonic() > deadline:
                        raise APIError(408, f"{param}: fetching {url} took longer than "
                                       f"{self.s.media_fetch_timeout:.0f} s (--media-fetch-timeout); the source "
                                       "is too slow, send the media as a data URL.", param=param,
                                       code="fetch_timeout")
                    chunks.append(c)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise bad_request(f"{param}: cannot fetch {url}: {e}", param, "fetch_failed") from None

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
        if "\x00" in raw:
            raise bad_request(f"{param}: the file path contains a NUL byte; no file name can.", param, "invalid_url")
        path = Path(raw)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise APIError(403, f"{param}: {url!r} points outside the server's media directory; only files under "
                           "--media-dir can be read.", type="permission_error", param=param, code="path_forbidden")
        if not path.is_file():
            raise bad_request(f"{param}: {path.relative_to(root)} does not exist in the media directory.", param,
                              "file_not_found")
        size = path.stat().st_size
        if size > self.s.max_media_bytes:
            raise _limit(f"{param}: {path.relative_to(root)} is {size} bytes, above the {self.s.max_media_bytes}-"
                         "byte limit for one media file (--max-media-bytes).", param)
        with open(path, "rb") as f:  # read at most the limit: the file may grow after the stat
            data = f.read(self.s.max_media_bytes + 1)
        if len(data) > self.s.max_media_bytes:
            raise _limit(f"{param}: {path.relative_to(root)} is larger than {self.s.max_media_bytes} bytes "
                         "(--max-media-bytes).", param)
        return data

    # --- header probes (no decoding) --------------------------------------------------------------------------------
    def _probe_image(self, p: _Pending) -> None:
        from edge.image_preprocess import check_slice_cost, plan_slices
        from edge.io.images import probe_image

        w, h, fmt = _with_param(p.param, probe_image, p.data)
        p.size = (w, h)
        if w * h <= self.s.max_image_pixels:
            _with_param(p.param, check_slice_cost, plan_slices(p.size))  # the slicer's bound, from the header
        elif fmt != "JPEG":  # (a JPEG above the limit is decoded at a reduced DCT scale, see edge/io/images.py)
            raise _limit(f"{p.param}: the image is {w}x{h} = {w * h / 1e6:.1f} MP, above the "
                         f"{self.s.max_image_pixels / 1e6:.1f} MP decoding limit (--max-image-pixels); downscale "
                         "it first.", p.param)

    def _probe_audio(self, p: _Pending) -> None:
        from edge.io.audio import probe_audio

        info = _with_param(p.param, probe_audio, p.data)
        # unknown length (header does not say): 0 here, and the decoder stops at the limit
        p.seconds, p.size = info.seconds or 0.0, (info.sample_rate, info.channels)
        if p.seconds > self.s.max_audio_seconds:
            raise _limit(f"{p.param}: the audio is {p.seconds:.1f} s; the limit is {self.s.max_audio_seconds:.0f} "
                         "s (--max-audio-seconds).", p.param)

    def _probe_video(self, p: _Pending) -> None:
        from edge.io.video import (
            VideoOptions,
            check_frame_size,
            probe_video,
            sample_frame_indices,
        )

        fd, p.path = tempfile.mkstemp(suffix=".video")
        with os.fdopen(fd, "wb") as f:
            f.write(p.data)
        info = _with_param(p.param, probe_video, p.path, "the video")
        _with_param(p.param, check_frame_size, info, self._video_options(), "the video")
        p.size = (info.width, info.height)
        opts = VideoOptions(max_frames=self.s.max_video_frames)
        n = info.n_frames or int(self.s.max_video_frames / opts.fps * max(info.fps, 1.0))  # unknown: the cap
        p.frames = len(sample_frame_indices(n, info.fps, opts)) if info.fps > 0 else 1

    def _video_options(self, cancel: threading.Event | None = None):
        from edge.io.video import VideoOptions

        return VideoOptions(max_frames=self.s.max_video_frames, max_frame_pixels=self.s.max_image_pixels,
                            should_stop=cancel.is_set if cancel is not None else None)

    # --- decoders -------------------------------------------------------------------------------------------------
    def image(self, data: bytes, param: str):
        from edge.image_preprocess import check_slice_cost, plan_slices
        from edge.io.images import ImageLoadOptions, load_image

        image = _with_param(param, load_image, data, ImageLoadOptions(max_pixels=self.s.max_image_pixels))
        _with_param(param, check_slice_cost, plan_slices(image.size))  # refused here, not in the encoder
        return image

    def audio(self, data: bytes, param: str, fmt: str | None = None,
              cancel: threading.Event | None = None) -> np.ndarray:
        from edge.io.audio import AudioLimits, load_audio

        if fmt is not None and fmt.lower() not in INPUT_AUDIO_FORMATS:
            raise bad_request(f"{param}.format {fmt!r} is not supported; use one of {', '.join(INPUT_AUDIO_FORMATS)}.",
                              f"{param}.format")
        limits = AudioLimits(max_seconds=self.s.max_audio_seconds,
                             should_stop=cancel.is_set if cancel is not None else None)
        wave = _with_param(param, load_audio, data, limits)
        seconds = len(wave) / AUDIO_RATE
        if seconds < MIN_AUDIO_SECONDS:
            raise bad_request(f"{param}: the audio is {seconds * 1000:.0f} ms long; send at least "
                              f"{MIN_AUDIO_SECONDS * 1000:.0f} ms.", param)
        return wave

    def video(self, data: bytes | str, param: str, cancel: threading.Event | None = None) -> list:
        from edge.io.video import load_video

        return _with_param(param, load_video, data, self._video_options(cancel)).frames

    # --- messages --------------------------------------------------------------------------------------------------
    def convert(self, messages: list[ChatMessage], *, n_ctx: int | None = None,
                cancel: threading.Event | None = None) -> ConvertedMessages:
        """Fetch and probe every media part, check the request's budget, then decode (see the module docstring)."""
        budget = RequestBudget(self.s.max_images, self.s.max_video_frames, self.s.max_decoded_bytes,
                               self.s.max_audio_seconds, n_ctx)
        plan: list[tuple[str, list]] = []
        pending: list[_Pending] = []
        try:
            for i, m in enumerate(messages):
                role = "system" if m.role == "developer" else m.role
                content = [m.content] if isinstance(m.content, str) else (m.content or [])
                items: list = []
                for j, part in enumerate(content):
                    param = f"messages[{i}].content" + ("" if isinstance(m.content, str) else f"[{j}]")
                    item = self._collect(part, param, role)
                    if isinstance(item, _Pending):
                        budget.add(item, item.param)
                        pending.append(item)
                    items.append(item)
                plan.append((role, items))
            budget.check_tokens(pending)
            out = ConvertedMessages([])
            for role, items in plan:
                decoded: list = []
                for item in items:
                    if not isinstance(item, _Pending):
                        decoded.append(item)
                        continue
                    _stop_if(cancel)
                    decoded.extend(self._decode(item, out, cancel))
                out.messages.append({"role": role, "content": decoded if decoded else ""})
            return out
        finally:
            for p in pending:
                if p.path is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(p.path)

    def _collect(self, part, param: str, role: str):
        """Text as it is; a media part as a fetched, probed `_Pending`."""
        if isinstance(part, str):
            return part
        if isinstance(part, TextPart):
            return part.text
        if role != "user":
            raise bad_request(f"{param}: only user messages may carry images, audio or video ({role} message).",
                              param)
        if isinstance(part, ImagePart):
            p = _Pending("image", self.fetch(part.image_url.url, f"{param}.image_url", kind="image"),
                         f"{param}.image_url")
            self._probe_image(p)
        elif isinstance(part, InputAudioPart):
            fmt = part.input_audio.format
            if fmt is not None and fmt.lower() not in INPUT_AUDIO_FORMATS:
                raise bad_request(f"{param}.input_audio.format {fmt!r} is not supported; use one of "
                                  f"{', '.join(INPUT_AUDIO_FORMATS)}.", f"{param}.input_audio.format")
            p = _Pending("audio", decode_base64(part.input_audio.data, f"{param}.input_audio.data"),
                         f"{param}.input_audio", fmt)
            self._probe_audio(p)
        elif isinstance(part, AudioURLPart):
            p = _Pending("audio", self.fetch(part.audio_url.url, f"{param}.audio_url", kind="audio"),
                         f"{param}.audio_url")
            self._probe_audio(p)
        elif isinstance(part, VideoURLPart):
            p = _Pending("video", self.fetch(part.video_url.url, f"{param}.video_url", kind="video"),
                         f"{param}.video_url")
            self._probe_video(p)
        else:
            raise bad_request(f"{param}: unsupported content part {type(part).__name__}.", param)
        return p

    def _decode(self, p: _Pending, out: ConvertedMessages, cancel: threading.Event | None) -> list:
        if p.kind == "image":
            out.n_images += 1
            return [self.image(p.data, p.param)]
        if p.kind == "audio":
            wave = self.audio(p.data, p.param, None, cancel)
            out.audio_seconds += len(wave) / AUDIO_RATE
            out.audio_clips.append(wave)
            return [wave]
        frames = self.video(p.path, p.param, cancel)
        out.n_video_frames += len(frames)
        return list(frames)


def _stop_if(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise CancelledError("media decoding was stopped: the client went away.")


def decode_base64(data: str, param: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param} is not valid base64 ({e}).", param, "invalid_base64") from None
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
    """Run a loader, prefixing its InvalidInputError with the request field it came from. `from None`: the
    loader's traceback (which may hold decoded pixels) is not kept alive by the error."""
    try:
        return fn(*args)
    except InputLimitError as e:
        raise _limit(f"{param}: {e}", param) from None
    except InvalidInputError as e:
        raise bad_request(f"{param}: {e}", param, "invalid_input") from None
