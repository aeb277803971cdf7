"""Camera input with OpenCV: a device index (webcam, CSI camera through V4L2) or a video file standing in for a
camera, read at real-time pace. One RGB PIL frame per 1-s unit is all the streaming session needs (spec §4.2:
video mode sends one frame per second).

A camera that stops delivering (unplugged, file ended) does not end the conversation: `latest()` returns None
from then on, `lost` says why, and the caller continues audio-only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edge.errors import DeviceError, InvalidInputError

log = logging.getLogger("edge.camera")

MAX_READ_FAILURES = 5  # consecutive failed grabs before a device counts as gone (USB hiccups fail one or two)


@dataclass(frozen=True)
class CameraOptions:
    """Attributes:
    source: device index (0 = first camera) or a video file path (stand-in camera).
    width, height: requested capture size for devices (None = driver default); frames are sliced anyway.
    loop: a video file starts over at its end instead of counting as a camera that went away.
    speed: real-time factor for video files (2.0 = twice as fast).
    """

    source: int | str = 0
    width: int | None = None
    height: int | None = None
    loop: bool = False
    speed: float = 1.0


class Camera:
    """`latest()` -> the current frame (RGB PIL) or None once the camera is gone."""

    def __init__(self, options: CameraOptions | None = None, *, capture_factory=None):
        import cv2

        self.options = o = options or CameraOptions()
        src = o.source
        self.is_file = not isinstance(src, int) and not (isinstance(src, str) and src.isdigit())
        if self.is_file and not Path(src).is_file():
            raise InvalidInputError(f"video file {src} not found (stand-in camera); check the path.")
        arg = str(src) if self.is_file else int(src)
        self._cap = (capture_factory or cv2.VideoCapture)(arg)
        if not self._cap.isOpened():
            self._cap.release()
            what = f"video file {src}" if self.is_file else f"camera {src}"
            raise DeviceError(f"cannot open {what}. Check the device (ls /dev/video*) or file, pass another "
                               "--camera, or run with --no-camera.")
        if not self.is_file:
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # we want the newest frame, not a queue of old ones
            if o.width:
                self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, o.width)
            if o.height:
                self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, o.height)
        fps = float(self._cap.get(cv2.CAP_PROP_FPS)) if self.is_file else 0.0
        self._fps = fps if fps > 0 and np.isfinite(fps) else 25.0
        self._t0: float | None = None
        self._frame_idx = -1
        self._last: Image.Image | None = None
        self._failures = 0
        self.lost: str | None = None
        self.frames_read = 0

    def latest(self) -> Image.Image | None:
        if self.lost is not None:
            return None
        try:
            frame = self._read_file() if self.is_file else self._read_device()
        except Exception as e:  # noqa: BLE001 - a driver error is a lost camera, not a crash
            self._lose(f"camera error: {e}")
            return None
        return frame

    def _read_device(self):
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            self._failures += 1
            if self._failures >= MAX_READ_FAILURES:
                self._lose(f"camera {self.options.source} stopped delivering frames")
            return self._last if self.lost is None else None
        self._failures = 0
        self._last = _to_pil(bgr)
        self.frames_read += 1
        return self._last

    def _read_file(self):
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        want = int((now - self._t0) * self.options.speed * self._fps)
        while self._frame_idx < want:
            ok = self._cap.grab()
            if not ok:
                if self.options.loop and self._frame_idx >= 0:
                    import cv2

                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                    self._t0, self._frame_idx = now, -1
                    want = 0
                    continue
                self._lose(f"video file {self.options.source} ended")
                return None
            self._frame_idx += 1
            if self._frame_idx == want:
                ok, bgr = self._cap.retrieve()
                if ok and bgr is not None:
                    self._last = _to_pil(bgr)
                    self.frames_read += 1
        return self._last

    def _lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
            log.warning("%s; continuing without video", why)

    def close(self) -> None:
        try:
            self._cap.release()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


def _to_pil(bgr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]), "RGB")
