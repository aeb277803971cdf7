"""Microphone input: 16 kHz mono packets from a sounddevice stream or from an audio file played in real time,
a voice activity detector (silero-vad ONNX, else energy), the speech start/end rule, and the 1-s unit cutter.

Packets are `PACKET_SAMPLES` (512 = 32 ms) long: the window silero-vad scores. Every source has the same
interface: `read(timeout) -> packet | None`, `ended`, `close()`.

VAD rule (official web demo thresholds, `model_server.py` + `vad_utils`): speech starts once more than
`SPEECH_START_SECONDS` (0.4 s) of the last `VAD_WINDOW_SECONDS` (1 s) is speech; the user's turn ends after
`END_SILENCE_SECONDS` (0.6 s) of continuous silence. (The web demo checks the same 1-s window every 200 ms and
ends the turn when it holds < 0.2 s of speech and the turn is >= 0.6 s old; a silence run is the same idea with
less delay at our 32-ms resolution.)
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import DeviceError, InvalidInputError, ModelFilesNotFoundError

SAMPLE_RATE = 16000  # Whisper's input rate
PACKET_SAMPLES = 512  # silero-vad window at 16 kHz (32 ms)
PACKET_SECONDS = PACKET_SAMPLES / SAMPLE_RATE
SILERO_CONTEXT = 64  # samples of the previous window silero-vad prepends at 16 kHz (silero_vad OnnxWrapper)
SILERO_STATE_SHAPE = (2, 1, 128)  # its recurrent state
SILERO_THRESHOLD = 0.5  # silero-vad's default speech probability threshold
ENERGY_RMS_THRESHOLD = 0.002  # the web demo's RMS gate (`calculate_rms`: rms > 0.002)
SPEECH_START_SECONDS = 0.4  # web demo: speech when > 0.4 s of the 1-s window is speech
VAD_WINDOW_SECONDS = 1.0  # web demo: 5 x 200-ms packets
END_SILENCE_SECONDS = 0.6  # end of turn after 0.6 s of silence
PREROLL_MARGIN_SECONDS = 0.1  # audio kept before the first speech frame of an utterance
UNIT_SAMPLES = SAMPLE_RATE  # 1-s TDM unit


# --- sources ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MicOptions:
    """Attributes:
    device: sounddevice input device (index, or a substring of its name); None = system default.
    ring_seconds: audio buffered between the PortAudio callback and the reader; older audio is dropped (counted).
    """

    device: int | str | None = None
    ring_seconds: float = 10.0


class MicrophoneSource:
    """sounddevice InputStream at 16 kHz mono; the callback fills a ring buffer, `read` hands out packets."""

    def __init__(self, options: MicOptions | None = None, *, stream_factory=None):
        self.options = o = options or MicOptions()
        self._buf: collections.deque[np.ndarray] = collections.deque()
        self._n = 0
        self._cond = threading.Condition()
        self.dropped_samples = 0
        self.ended = False
        if stream_factory is None:
            try:
                import sounddevice as sd
            except OSError as e:
                raise DeviceError("no audio input: the PortAudio library is missing (Debian: apt-get install "
                                   "libportaudio2). Use an audio file as microphone (--mic-file).") from e
            try:
                sd.query_devices(o.device, kind="input")
            except Exception as e:
                raise DeviceError(f"no microphone found ({e}). Plug one in, pick another with --mic "
                                   "(`python -m sounddevice` lists devices), or use --mic-file FILE.") from e
            stream_factory = sd.InputStream
        try:
            self._stream = stream_factory(samplerate=SAMPLE_RATE, channels=1, dtype="float32",
                                          blocksize=PACKET_SAMPLES, device=o.device, callback=self._callback)
            self._stream.start()
        except Exception as e:
            raise DeviceError(f"cannot open the microphone at 16 kHz mono ({e}). Pick another device (--mic) or "
                               "use --mic-file FILE.") from e

    def _callback(self, indata, frames, time_info, status) -> None:
        x = np.array(indata, dtype=np.float32).reshape(-1)
        limit = int(self.options.ring_seconds * SAMPLE_RATE)
        with self._cond:
            self._buf.append(x)
            self._n += x.size
            while self._n > limit and self._buf:
                old = self._buf.popleft()
                self._n -= old.size
                self.dropped_samples += old.size
            self._cond.notify()

    def read(self, timeout: float) -> np.ndarray | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._n < PACKET_SAMPLES:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return None
            x = np.concatenate(list(self._buf))
            self._buf.clear()
            out, rest = x[:PACKET_SAMPLES], x[PACKET_SAMPLES:]
            if rest.size:
                self._buf.append(rest)
            self._n = rest.size
            return out

    def close(self) -> None:
        try:
            self._stream.stop()
            self._stream.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


class FileMicrophone:
    """An audio file (or array) standing in for a microphone: packets are released at real-time pace
    (`speed` x real time; 0 = as fast as read), then `ended` becomes True."""

    def __init__(self, source, *, speed: float = 1.0, tail_silence_seconds: float = 0.0):
        from edge.io.audio import load_audio

        wave = load_audio(source) if not isinstance(source, np.ndarray) else np.asarray(source, np.float32)
        pad = int(tail_silence_seconds * SAMPLE_RATE)
        wave = np.concatenate([wave, np.zeros(pad, np.float32)])
        n = -(-wave.size // PACKET_SAMPLES) * PACKET_SAMPLES
        self._wave = np.pad(wave, (0, n - wave.size))
        self.duration = self._wave.size / SAMPLE_RATE
        self.speed = speed
        self._pos = 0
        self._t0: float | None = None
        self._closed = threading.Event()
        self.ended = False

    def read(self, timeout: float) -> np.ndarray | None:
        if self._pos >= self._wave.size or self._closed.is_set():
            self.ended = True
            return None
        if self._t0 is None:
            self._t0 = time.monotonic()
        if self.speed > 0:
            due = self._t0 + (self._pos + PACKET_SAMPLES) / SAMPLE_RATE / self.speed
            wait = due - time.monotonic()
            if wait > timeout:
                self._closed.wait(timeout)
                return None
            if wait > 0:
                self._closed.wait(wait)
        out = self._wave[self._pos:self._pos + PACKET_SAMPLES]
        self._pos += PACKET_SAMPLES
        return out

    def close(self) -> None:
        self._closed.set()


# --- voice activity -----------------------------------------------------------------------------------------------
class SileroVad:
    """silero-vad v5 ONNX model (shipped inside the `silero-vad` PyPI package) on onnxruntime, no torch."""

    name = "silero"

    def __init__(self, path: str | Path | None = None, threshold: float = SILERO_THRESHOLD):
        from edge.onnx_session import OrtOptions, make_session

        if path is None:
            try:
                import importlib.resources as res

                path = Path(str(res.files("silero_vad") / "data" / "silero_vad.onnx"))
            except ModuleNotFoundError as e:
                raise ModelFilesNotFoundError("silero-vad is not installed: `pip install --no-deps silero-vad` "
                                              "(its ONNX model is all we use), or use the energy VAD.") from e
        if not Path(path).is_file():
            raise ModelFilesNotFoundError(f"silero-vad model {path} not found; reinstall silero-vad.", str(path))
        self._sess = make_session(path, OrtOptions(intra_op_threads=1, allow_spinning=False))
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros(SILERO_STATE_SHAPE, np.float32)
        self._context = np.zeros(SILERO_CONTEXT, np.float32)

    def probability(self, packet: np.ndarray) -> float:
        x = np.concatenate([self._context, np.asarray(packet, np.float32)])[None]
        out, self._state = self._sess.run(None, {"input": x, "state": self._state,
                                                 "sr": np.array(SAMPLE_RATE, np.int64)})
        self._context = x[0, -SILERO_CONTEXT:]
        return float(out.reshape(-1)[0])

    def is_speech(self, packet: np.ndarray) -> bool:
        return self.probability(packet) >= self.threshold


class EnergyVad:
    """RMS gate: speech when a packet's RMS exceeds `threshold` (the web demo's 0.002). Fine for a close,
    quiet microphone and for synthetic test audio; use silero-vad in noisy rooms."""

    name = "energy"

    def __init__(self, threshold: float = ENERGY_RMS_THRESHOLD):
        self.threshold = threshold

    def reset(self) -> None:
        pass

    def probability(self, packet: np.ndarray) -> float:
        rms = float(np.sqrt(np.mean(np.square(packet, dtype=np.float64))))
        return 1.0 if rms > self.threshold else 0.0

    def is_speech(self, packet: np.ndarray) -> bool:
        return self.probability(packet) >= 0.5


def make_vad(kind: str = "auto"):
    """"silero", "energy", or "auto" (silero-vad when installed, else energy)."""
    if kind == "energy":
        return EnergyVad()
    if kind == "silero":
        return SileroVad()
    if kind != "auto":
        raise InvalidInputError(f"VAD must be auto, silero or energy, got {kind!r}.")
    try:
        return SileroVad()
    except ModelFilesNotFoundError:
        return EnergyVad()


@dataclass(frozen=True)
class SegmenterOptions:
    """Attributes: see the module docstring (official thresholds)."""

    speech_start_seconds: float = SPEECH_START_SECONDS
    window_seconds: float = VAD_WINDOW_SECONDS
    end_silence_seconds: float = END_SILENCE_SECONDS


class VadSegmenter:
    """Per-packet speech flags -> ("start", t, onset) / ("end", t) events; t = stream time of the decision,
    onset = time of the first speech packet in the window (where the utterance began)."""

    def __init__(self, options: SegmenterOptions | None = None):
        self.options = o = options or SegmenterOptions()
        window = max(1, round(o.window_seconds / PACKET_SECONDS))
        self._window: collections.deque[bool] = collections.deque(maxlen=window)
        self._need = o.speech_start_seconds / PACKET_SECONDS
        self._end = max(1, round(o.end_silence_seconds / PACKET_SECONDS))
        self.speaking = False
        self._silence = 0
        self.t = 0.0

    def push(self, speech: bool) -> list[tuple]:
        self.t += PACKET_SECONDS
        self._window.append(bool(speech))
        if not self.speaking:
            if sum(self._window) > self._need:
                self.speaking = True
                self._silence = 0
                first = next(i for i, v in enumerate(self._window) if v)
                onset = self.t - (len(self._window) - first) * PACKET_SECONDS
                return [("start", self.t, onset)]
            return []
        self._silence = 0 if speech else self._silence + 1
        if self._silence >= self._end:
            self.speaking = False
            self._window.clear()
            return [("end", self.t)]
        return []


class UnitAssembler:
    """Cuts an utterance into 1-s units. Keeps the last `history_seconds` of audio so an utterance can start
    at its detected onset (VAD decides only after 0.4 s of speech)."""

    def __init__(self, history_seconds: float = 2 * VAD_WINDOW_SECONDS):
        self._hist: collections.deque[np.ndarray] = collections.deque(
            maxlen=max(1, round(history_seconds / PACKET_SECONDS)))
        self._cur: list[np.ndarray] = []
        self._n = 0
        self.active = False

    def push(self, packet: np.ndarray) -> list[np.ndarray]:
        self._hist.append(packet)
        if not self.active:
            return []
        self._cur.append(packet)
        self._n += packet.size
        out = []
        while self._n >= UNIT_SAMPLES:
            x = np.concatenate(self._cur)
            out.append(x[:UNIT_SAMPLES])
            rest = x[UNIT_SAMPLES:]
            self._cur, self._n = ([rest] if rest.size else []), rest.size
        return out

    def begin(self, preroll_seconds: float) -> None:
        """Start an utterance with the last `preroll_seconds` already heard (including the current packet)."""
        k = min(len(self._hist), max(1, round(preroll_seconds / PACKET_SECONDS)))
        self._cur = list(self._hist)[-k:]
        self._n = sum(p.size for p in self._cur)
        self.active = True

    def flush(self) -> np.ndarray | None:
        """End the utterance: what is left (< 1 s), or None."""
        self.active = False
        x = np.concatenate(self._cur) if self._cur else None
        self._cur, self._n = [], 0
        return x if x is not None and x.size else None
