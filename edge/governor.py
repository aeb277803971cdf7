"""Real-time governor for live mode: keep per-unit work inside its 1-second budget by lowering the frame rate.

Each 1-s unit carries up to one camera frame plus one second of audio. If encoding + prefilling a unit takes
longer than the unit lasts, the pipeline falls behind the user for good. The governor watches the time per unit
(smoothed) and sends a frame only every `stride`-th unit when over budget; audio is never dropped. When work is
comfortably under budget again it raises the frame rate back. Pure logic: the clock is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GovernorOptions:
    """Attributes:
    unit_seconds: real-time budget of one unit (the official 1-s TDM unit).
    high_water: slow down when smoothed unit time exceeds this fraction of the budget.
    low_water: speed back up when it falls below this fraction (hysteresis against flapping).
    max_stride: lowest frame rate = one frame per `max_stride` units.
    min_stride: highest frame rate = one frame per `min_stride` units (a device profile's `live_fps` cap).
    smoothing: weight of the newest measurement in the moving average.
    """

    unit_seconds: float = 1.0
    high_water: float = 0.9
    low_water: float = 0.45
    max_stride: int = 8
    min_stride: int = 1
    smoothing: float = 0.5


class RealtimeGovernor:
    def __init__(self, options: GovernorOptions | None = None):
        self.options = options or GovernorOptions()
        self.stride = self.options.min_stride  # a frame every `stride` units
        self._unit = 0
        self._avg: float | None = None
        self.changes: list[str] = []

    @property
    def fps(self) -> float:
        return 1.0 / (self.stride * self.options.unit_seconds)

    def prime(self, frame_unit_seconds: float, audio_unit_seconds: float) -> str | None:
        """Start at the frame rate that estimated unit costs allow, instead of learning it from late units.

        Without this the first units of a session carry a frame each, and on a slow device (2 cores: ~8 s per
        camera unit) the session falls tens of seconds behind the user before `observe` reacts. The stride chosen
        is the smallest power of two (within the limits) whose mean unit cost, one frame unit plus `stride - 1`
        audio-only units, fits `high_water` of the budget; `observe` goes on adjusting from real measurements.
        Returns a status message when the rate is lowered."""
        o = self.options
        limit = o.high_water * o.unit_seconds
        stride = o.min_stride
        while stride < max(o.max_stride, o.min_stride):
            if (frame_unit_seconds + (stride - 1) * audio_unit_seconds) / stride <= limit:
                break
            stride *= 2
        self.stride = min(stride, max(o.max_stride, o.min_stride))
        self._unit, self._avg = 0, None
        if self.stride == o.min_stride:
            return None
        msg = (f"a camera unit needs ~{frame_unit_seconds:.1f} s and an audio unit ~{audio_unit_seconds:.1f} s per "
               f"{o.unit_seconds:.0f}-s unit: camera starts at {self.fps:.2f} fps (audio kept whole)")
        self.changes.append(msg)
        return msg

    def take_frame(self) -> bool:
        """Whether the unit about to be built should carry a frame (call once per unit)."""
        take = self._unit % self.stride == 0
        self._unit += 1
        return take

    def observe(self, unit_work_seconds: float, had_frame: bool) -> str | None:
        """Record how long a unit took; returns a status message when the frame rate changes."""
        o = self.options
        a = o.smoothing
        self._avg = unit_work_seconds if self._avg is None else a * unit_work_seconds + (1 - a) * self._avg
        budget = o.unit_seconds
        msg = None
        if self._avg > o.high_water * budget and self.stride < o.max_stride:
            self.stride = min(self.stride * 2, max(o.max_stride, o.min_stride))
            msg = (f"encoding needs {self._avg:.2f} s per {budget:.0f}-s unit: camera lowered to "
                   f"{self.fps:.2f} fps (audio kept whole)")
        elif had_frame and self._avg < o.low_water * budget and self.stride > o.min_stride:
            self.stride = max(self.stride // 2, o.min_stride)
            msg = f"encoding keeps up again ({self._avg:.2f} s per unit): camera raised to {self.fps:.2f} fps"
        if msg:
            self._avg = None  # measure afresh at the new rate
            self.changes.append(msg)
        return msg
