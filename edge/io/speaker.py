"""Audio output: a gap-free speaker sink on sounddevice, and WAV files with soundfile.

The TTS produces 24 kHz float32 chunks at its own pace; the sink queues them (a jitter buffer that starts
playing once `prebuffer_seconds` are queued, so a slow chunk does not cause a gap) and plays them from
PortAudio's callback. `interrupt()` drops everything queued at once (barge-in).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.constants import TTS_SAMPLE_RATE
from edge.errors import DeviceError, InvalidInputError


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> Path:
    """Write float32 mono audio as a 16-bit PCM WAV (what players expect); values are clipped to [-1, 1]."""
    import soundfile as sf

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(wave)):
        raise InvalidInputError("audio to write contains NaN or inf samples.")
    path = Path(path)
    sf.write(str(path), np.clip(wave, -1.0, 1.0), int(sample_rate), subtype="PCM_16")
    return path


@dataclass(frozen=True)
class SpeakerOptions:
    """Attributes:
    device: sounddevice output device (name substring or index); None = system default.
    sample_rate: rate of the chunks pushed (the TTS's 24 kHz).
    prebuffer_seconds: audio queued before playback starts (jitter buffer).
    block_frames: PortAudio callback size.
    """

    device: str | int | None = None
    sample_rate: int = TTS_SAMPLE_RATE
    prebuffer_seconds: float = 0.2
    block_frames: int = 1024


class SpeakerSink:
    """Plays pushed chunks without gaps. Thread-safe `push` / `interrupt` / `close`."""

    def __init__(self, options: SpeakerOptions | None = None, *, stream_factory=None):
        self.options = o = options or SpeakerOptions()
        self._chunks: collections.deque[np.ndarray] = collections.deque()
        self._offset = 0
        self._queued = 0
        self._started = False
        self._final = False  # flush() was called: running dry is the end of the reply, not an underrun
        self._lock = threading.Lock()
        self.underruns = 0
        self.played_frames = 0
        if stream_factory is None:
            try:
                import sounddevice as sd
            except OSError as e:  # PortAudio missing
                raise DeviceError("no audio output: the PortAudio library is missing (Debian: apt-get install "
                                   "libportaudio2). Use --no-speech or write the reply to a WAV file.") from e
            stream_factory = sd.OutputStream
        try:
            self._stream = stream_factory(samplerate=o.sample_rate, channels=1, dtype="float32",
                                          blocksize=o.block_frames, device=o.device, callback=self._callback)
            self._stream.start()
        except Exception as e:
            raise DeviceError(f"cannot open the speaker ({e}). Pick another device (--speaker), or use "
                               "--no-speech / a WAV file sink.") from e

    def push(self, chunk: np.ndarray) -> None:
        chunk = np.asarray(chunk, dtype=np.float32).reshape(-1)
        with self._lock:
            self._final = False
            self._chunks.append(chunk)
            self._queued += len(chunk)
            if self._queued >= self.options.prebuffer_seconds * self.options.sample_rate:
                self._started = True

    def flush(self) -> None:
        """Start playing whatever is queued even if it is shorter than the prebuffer (end of a reply)."""
        with self._lock:
            self._started = True
            self._final = True

    def interrupt(self) -> None:
        """Stop at once: everything queued is dropped (barge-in)."""
        with self._lock:
            self._chunks.clear()
            self._offset = 0
            self._queued = 0
            self._started = False

    @property
    def pending_seconds(self) -> float:
        return self._queued / self.options.sample_rate

    def _callback(self, outdata, frames, time_info, status) -> None:
        out = outdata.reshape(-1)
        out[:] = 0.0
        with self._lock:
            if not self._started:
                return
            i = 0
            while i < frames and self._chunks:
                head = self._chunks[0]
                n = min(frames - i, len(head) - self._offset)
                out[i:i + n] = head[self._offset:self._offset + n]
                i += n
                self._offset += n
                if self._offset >= len(head):
                    self._chunks.popleft()
                    self._offset = 0
            self._queued -= i
            self.played_frames += i
            if i < frames:
                if not self._final:
                    self.underruns += 1  # ran dry mid-reply: wait for the prebuffer again
                self._started = False

    def close(self) -> None:
        try:
            self._stream.stop()
            self._stream.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


class WavSink:
    """Same interface as SpeakerSink, collecting audio for a WAV file (headless runs, tests)."""

    def __init__(self, path: str | Path | None = None, sample_rate: int = TTS_SAMPLE_RATE):
        self.path = Path(path) if path else None
        self.sample_rate = sample_rate
        self._chunks: list[np.ndarray] = []

    def push(self, chunk: np.ndarray) -> None:
        self._chunks.append(np.asarray(chunk, dtype=np.float32).reshape(-1))

    def flush(self) -> None:
        pass

    def interrupt(self) -> None:
        self._chunks.clear()

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)

    def close(self) -> None:
        if self.path is not None:
            write_wav(self.path, self.audio, self.sample_rate)
