"""Message content -> prompt parts: what each item of an official `chat()` message is, and how it enters a prompt.

An item is text, an image (PIL, HxWx3 array, path, bytes), audio (a 1-D 16 kHz float array, an (array, rate)
pair, an audio file) or a video file, or an OpenAI/official-style dict `{"type": ..., ...}`. Images become
sliced `Media` with their placeholder; audio becomes `Media` with the Whisper placeholder of its length; a video
becomes its sampled frames, each one unsliced image without an image id (the official video recipe).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.audio_encoder import audio_placeholder
from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import InvalidInputError
from edge.image_preprocess import SliceOptions, preprocess_image
from edge.io.audio import load_audio
from edge.io.images import load_image
from edge.io.video import VIDEO_SLICE_OPTIONS, load_video, preprocess_frames
from edge.prompt import Media

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
# The prompt options of camera and video frames (official: one slice, no image id), for `build_prompt`.
FRAME_PROMPT = {"max_slice_nums": VIDEO_SLICE_OPTIONS.max_slice_nums, "use_image_id": VIDEO_SLICE_OPTIONS.use_image_id}


@dataclass(frozen=True)
class ContentOptions:
    """Attributes: max_slice_nums (None = official default 9), use_image_id, chunk_input (1-s Whisper chunks)."""

    max_slice_nums: int | None = None
    use_image_id: bool = True
    chunk_input: bool = True


def classify(item) -> tuple[str, object]:
    """(kind, value) of one content item; kind is text, image, audio or video."""
    if isinstance(item, str):
        return "text", item  # a TrustedText stays one (its special tokens are parsed)
    if isinstance(item, dict):
        t = item.get("type")
        if t == "text":
            return "text", item.get("text", "")
        if t in ("image", "video"):
            return t, item.get(t)
        if t == "audio":
            a = item.get("audio")
            if isinstance(a, np.ndarray):
                return "audio", (a, int(item.get("sample_rate", AUDIO_SAMPLE_RATE)))
            return "audio", a
        raise InvalidInputError(f"unknown content part type {t!r}; use text, image, audio or video.")
    if isinstance(item, np.ndarray) and item.ndim == 1:
        return "audio", (item, AUDIO_SAMPLE_RATE)
    if isinstance(item, np.ndarray) and item.ndim == 3:
        return "image", item
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image without importing PIL here
        return "image", item
    if isinstance(item, (bytes, Path)):
        suffix = Path(item).suffix.lower() if isinstance(item, Path) else ""
        if suffix in AUDIO_SUFFIXES:
            return "audio", item
        if suffix in VIDEO_SUFFIXES:
            return "video", item
        return "image", item
    raise InvalidInputError(
        f"cannot use a {type(item).__name__} as message content: pass text, a PIL image, a 16 kHz float "
        "numpy array (audio) or a dict like {'type': 'image', 'image': 'photo.jpg'}.")


def wave_16k(value) -> np.ndarray:
    """A 16 kHz mono float32 wave from an array (taken as 16 kHz), an (array, rate) pair, a path or bytes."""
    if isinstance(value, np.ndarray):
        return load_audio((value, AUDIO_SAMPLE_RATE))
    return load_audio(value)


def image_media(image, options: SliceOptions, image_idx: int = 0) -> Media:
    pre = preprocess_image(load_image(image), options, image_idx=image_idx)
    return Media("image", pre.placeholder, pre)


def audio_media(wave: np.ndarray, chunked: bool = True) -> Media:
    return Media("audio", audio_placeholder(len(wave), chunked=chunked), {"wave": wave, "chunked": chunked})


def slice_options(max_slice_nums: int | None, use_image_id: bool) -> SliceOptions:
    return SliceOptions(use_image_id=use_image_id,
                        **({"max_slice_nums": max_slice_nums} if max_slice_nums is not None else {}))


def content_parts(content, counters: dict, options: ContentOptions) -> list:
    """The parts (str | Media) of one message; `counters` counts images (for image ids) and audios across
    the conversation."""
    items = content if isinstance(content, (list, tuple)) else [content]
    parts: list = []
    for item in items:
        kind, value = classify(item)
        if kind == "text":
            parts.append(value)
        elif kind == "image":
            parts.append(image_media(value, slice_options(options.max_slice_nums, options.use_image_id),
                                     counters["image"]))
            counters["image"] += 1
        elif kind == "audio":
            counters["audio"] += 1
            parts.append(audio_media(wave_16k(value), options.chunk_input))
        elif kind == "video":
            for pre in preprocess_frames(load_video(value)):
                parts.append(Media("image", pre.placeholder, pre))
    return parts
