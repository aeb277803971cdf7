"""Video input: decode a file with OpenCV and sample frames as RGB images, with their timestamps.

Sampling follows the official MiniCPM-V 2.6 video recipe (model card `encode_video`): take every
`round(video_fps / fps)`-th frame (fps = 1 by default, i.e. one frame per second), and if that gives more than
`max_frames` (64 there, `MAX_NUM_FRAMES`) keep `max_frames` of them evenly spread: the centre of each of
`max_frames` equal bins (`uniform_sample`). Timestamps are frame_index / video_fps, so callers can interleave
frames with audio seconds (the omni/streaming recipe feeds one frame per 1-s unit).

Frames are then encoded without slicing and without image ids (`VIDEO_SLICE_OPTIONS`: max_slice_nums=1,
use_image_id=False), as the official video examples set `params["use_image_id"] = False` and streaming forces
one slice per frame: each frame costs exactly 64 tokens.

Decoding is sequential (`grab` every frame, `retrieve` only the chosen ones): seeking with CAP_PROP_POS_FRAMES is
inexact for many codecs, and exact frame indices are what the timestamps promise.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge.errors import CancelledError, InputLimitError, InvalidInputError
from edge.image_preprocess import PreprocessedImage, SliceOptions, preprocess_image

DEFAULT_FPS = 1.0  # frames sampled per second of video (official recipe)
MAX_FRAMES = 64  # official MAX_NUM_FRAMES
VIDEO_SLICE_OPTIONS = SliceOptions(max_slice_nums=1, use_image_id=False)


@dataclass(frozen=True)
class VideoOptions:
    """Attributes:
    fps: frames to sample per second of video.
    max_frames: cap on the frame count; longer videos get `max_frames` frames evenly spread over their length.
    """

    fps: float = DEFAULT_FPS
    max_frames: int = MAX_FRAMES
    max_frame_pixels: int | None = None  # refuse larger frames (from the header, before any frame is decoded)
    should_stop: Callable[[], bool] | None = None  # polled between frames; True stops with CancelledError

    def __post_init__(self):
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise InvalidInputError(f"VideoOptions.fps must be a positive number, got {self.fps}.")
        if self.max_frames < 1:
            raise InvalidInputError(f"VideoOptions.max_frames must be >= 1, got {self.max_frames}.")


@dataclass
class VideoFrames:
    """Attributes:
    frames: sampled frames, RGB PIL images, in time order.
    timestamps: seconds from the start of the video, one per frame.
    frame_indices: index of each frame in the decoded stream.
    source_fps: the container's frame rate.
    n_source_frames: frames in the stream (as decoded when the container does not say).
    """

    frames: list[Image.Image]
    timestamps: list[float]
    frame_indices: list[int]
    source_fps: float
    n_source_frames: int

    @property
    def duration(self) -> float:
        return self.n_source_frames / self.source_fps


def uniform_sample(items: list[int], n: int) -> list[int]:
    """`n` items at the centres of `n` equal bins (the official recipe's `uniform_sample`)."""
    gap = len(items) / n
    return [items[int(i * gap + gap / 2)] for i in range(n)]


def sample_frame_indices(n_frames: int, video_fps: float, options: VideoOptions = VideoOptions()) -> list[int]:
    """Indices of the frames to keep: every round(video_fps / fps)-th, capped at max_frames evenly spread."""
    step = max(1, round(video_fps / options.fps))
    indices = list(range(0, n_frames, step))
    if len(indices) > options.max_frames:
        indices = uniform_sample(indices, options.max_frames)
    return indices


def load_video(source: str | Path | bytes, options: VideoOptions = VideoOptions()) -> VideoFrames:
    """Decode `source` (a path, or the file's bytes) and sample frames per `options`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise InvalidInputError("video bytes are empty (0 bytes); pass the encoded file content.")
        fd, tmp = tempfile.mkstemp(suffix=".video")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(source))
            return _load_path(Path(tmp), options, "video bytes")
        finally:
            os.unlink(tmp)
    path = Path(source)
    if not path.is_file():
        raise InvalidInputError(f"video file {path} not found; check the path.")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"video file {path} is empty (0 bytes); re-export or re-download it.")
    return _load_path(path, options, str(path))


def _open(path: Path, name: str):
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        raise InvalidInputError(
            f"{name} cannot be opened as a video (unknown container/codec or corrupt file); convert it to "
            "MP4 (H.264) or AVI (MJPEG), e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`.")
    return cap


def _count_frames(path: Path, name: str) -> int:
    cap = _open(path, name)
    try:
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


@dataclass(frozen=True)
class VideoInfo:
    """What the container says, read without decoding a frame."""

    width: int
    height: int
    fps: float
    n_frames: int  # 0 when the container does not say


def probe_video(path: str | Path, name: str | None = None) -> VideoInfo:
    import cv2

    cap = _open(Path(path), name or str(path))
    try:
        return VideoInfo(int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                         float(cap.get(cv2.CAP_PROP_FPS)), max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))))
    finally:
        cap.release()


def check_frame_size(info: VideoInfo, options: VideoOptions, name: str) -> None:
    if options.max_frame_pixels is not None and info.width * info.height > options.max_frame_pixels:
        raise InputLimitError(
            f"{name} has {info.width}x{info.height} frames = {info.width * info.height / 1e6:.1f} MP, above the "
            f"{options.max_frame_pixels / 1e6:.1f} MP limit per frame; downscale it first (e.g. "
            "`ffmpeg -i IN -vf scale=1280:-2 OUT.mp4`).")


def _load_path(path: Path, options: VideoOptions, name: str) -> VideoFrames:
    info = probe_video(path, name)
    check_frame_size(info, options, name)
    fps, n_frames = info.fps, info.n_frames
    if not (fps > 0 and math.isfinite(fps)):
        raise InvalidInputError(
            f"{name} does not state its frame rate, so frames cannot be timed; re-mux it with a frame rate "
            "(e.g. `ffmpeg -i IN -r 30 OUT.mp4`).")
    if n_frames <= 0:  # some containers do not store the count: decode once to count
        n_frames = _count_frames(path, name)
    wanted = sample_frame_indices(n_frames, fps, options)
    frames, indices = [], []
    cap = _open(path, name)
    try:
        targets, i = set(wanted), 0
        last = wanted[-1] if wanted else -1
        while i <= last and cap.grab():
            if options.should_stop is not None and options.should_stop():
                raise CancelledError(f"decoding {name} was stopped: the request was cancelled.")
            if i in targets:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    frames.append(Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]), "RGB"))
                    indices.append(i)
            i += 1
    finally:
        cap.release()
    if not frames:
        raise InvalidInputError(f"{name} has no decodable frames; check the file plays, or re-encode it.")
    return VideoFrames(frames, [k / fps for k in indices], indices, fps, n_frames)


def preprocess_frames(video: VideoFrames, options: SliceOptions = VIDEO_SLICE_OPTIONS) -> list[PreprocessedImage]:
    """Frames -> vision-encoder inputs, one unsliced 64-token image per frame (official video settings)."""
    return [preprocess_image(frame, options) for frame in video.frames]
