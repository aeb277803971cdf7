"""`minicpmo-edge live`: talk to the model with a camera and a microphone (or files standing in for them), hear
the reply on the speaker (or in a WAV file). Headless: a one-line terminal status, no window, so it runs on a
Raspberry Pi / Jetson over SSH. Ctrl-C ends the session cleanly.
"""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from edge.constants import RANDOM_WEIGHTS_NOTICE, TTS_SAMPLE_RATE
from edge.default_bundle import resolve_bundle
from edge.errors import DeviceError
from edge.governor import GovernorOptions, RealtimeGovernor
from edge.io.camera import Camera, CameraOptions
from edge.io.microphone import FileMicrophone, MicOptions, MicrophoneSource, make_vad
from edge.io.speaker import SpeakerOptions, SpeakerSink, WavSink
from edge.omni import Omni
from edge.orchestrator import LiveOptions, Orchestrator, PacedSink
from edge.profiles import start_profile
from edge.streaming import StreamingSession


@dataclass
class LiveArgs:
    """Attributes mirror the command line (see `add_live_arguments`)."""

    bundle: str | None = None
    camera: str | None = "0"
    no_camera: bool = False
    mic: str | None = None
    mic_file: str | None = None
    speaker: str | None = None
    output_wav: str | None = None
    no_speech: bool = False
    no_barge_in: bool = False
    no_overlap: bool = False
    vad: str = "auto"
    llm_threads: int = 0
    ort_threads: int = 0
    n_ctx: int | None = None
    profile: str = "auto"
    overrides: tuple = ()
    max_new_tokens: int = 128
    seed: int | None = None
    trace: str | None = None
    speed: float = 1.0


def add_live_arguments(s) -> None:
    s.add_argument("--bundle", help="bundle dir (default: an installed real bundle, else the built-in one)")
    s.add_argument("--camera", default="0", help="camera device index, or a video file as stand-in (default 0)")
    s.add_argument("--no-camera", action="store_true", help="audio only: no frames")
    s.add_argument("--mic", help="microphone device (index or name substring; default: system default)")
    s.add_argument("--mic-file", help="an audio file played in real time as the microphone")
    s.add_argument("--speaker", help="output device (index or name substring)")
    s.add_argument("--output-wav", help="write the spoken replies to this WAV file instead of the speaker")
    s.add_argument("--no-speech", action="store_true", help="text-only replies")
    s.add_argument("--no-barge-in", action="store_true", help="ignore user speech while the assistant talks")
    s.add_argument("--no-overlap", action="store_true", help="run TTS after decoding (for comparison)")
    s.add_argument("--vad", choices=["auto", "silero", "energy"], default="auto")
    s.add_argument("--llm-threads", type=int, default=0, help="llama.cpp threads (0 = the profile's live split)")
    s.add_argument("--ort-threads", type=int, default=0, help="onnxruntime threads (0 = the profile's live split)")
    s.add_argument("--n-ctx", type=int, help="LLM context in tokens (default: the profile's live_n_ctx)")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--seed", type=int)
    s.add_argument("--trace", help="append one JSON line of latency timestamps per turn to this file")
    s.add_argument("--speed", type=float, default=1.0, help="real-time factor of --mic-file / a video camera")


class StatusLine:
    """One rewritten terminal line (or plain lines when stdout is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self.stream.write("\r" + text[:width].ljust(width))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_live(a: LiveArgs, *, status: StatusLine | None = None):
    status = status or StatusLine()
    bundle = resolve_bundle(a.bundle)
    print(f"bundle: {bundle.root}")
    prof, hw = start_profile(bundle, a.profile, a.overrides, live=True, llm_threads=a.llm_threads,
                             ort_threads=a.ort_threads, n_ctx=a.n_ctx)
    # Spinning ORT threads starve the other stage on small boxes: off for every session of the live pipeline.
    omni = Omni.load(bundle, prof.omni_options(ort=prof.ort_options(allow_spinning=False)), profile=prof,
                     hardware=hw)
    if omni.random_weights:
        print(RANDOM_WEIGHTS_NOTICE)
    cam = sink = None
    source = None
    try:
        if a.mic_file:
            source = FileMicrophone(a.mic_file, speed=a.speed, tail_silence_seconds=1.0)
        else:
            dev = int(a.mic) if a.mic and a.mic.isdigit() else a.mic
            source = MicrophoneSource(MicOptions(device=dev))
        if not a.no_camera:
            try:
                side = prof.live_frame_max_side  # asked of a device (4:3); frames above it are shrunk anyway
                cam = _SizedCamera(Camera(CameraOptions(source=a.camera, speed=a.speed, width=side,
                                                        height=side * 3 // 4)), side)
            except Exception as e:  # noqa: BLE001 - no camera is not fatal: audio-only
                print(f"camera unavailable ({e}); continuing audio-only (use --no-camera to silence this)")
        speech = not a.no_speech
        if speech:
            sink = _make_sink(a, omni)
        opts = LiveOptions(speech=speech, barge_in=not a.no_barge_in, overlap=not a.no_overlap,
                           max_new_tokens=a.max_new_tokens, seed=a.seed, trace_path=a.trace)
        orch = Orchestrator(StreamingSession(omni), source, camera=cam, sink=sink, vad=make_vad(a.vad),
                            options=opts, on_status=status)
        orch.governor = RealtimeGovernor(GovernorOptions(min_stride=prof.live_frame_stride))  # live_fps cap
        source = cam = sink = None  # owned (and closed) by the orchestrator from here on
        worker = threading.Thread(target=lambda: setattr(orch, "result", orch.run()), name="live-control")
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.2)
        except KeyboardInterrupt:
            orch.stop()
            worker.join()
        result = orch.result
    finally:
        for obj in (source, cam, sink):
            if obj is not None:
                obj.close()
        omni.close()
        status.done()
    _print_summary(result)
    return result


class _SizedCamera:
    """A camera whose frames are at most `max_side` pixels on their longer side (the profile's
    live_frame_max_side): devices may ignore the requested size and video files have their own."""

    def __init__(self, camera, max_side: int):
        self._camera, self.max_side = camera, max_side

    def latest(self):
        frame = self._camera.latest()
        if frame is not None and max(frame.size) > self.max_side:
            frame = frame.copy()
            frame.thumbnail((self.max_side, self.max_side))
        return frame

    def __getattr__(self, name):  # lost, close, frames_read, ... of the wrapped camera
        return getattr(self._camera, name)


def _make_sink(a: LiveArgs, omni):
    if a.output_wav:
        return PacedSink(WavSink(Path(a.output_wav)), TTS_SAMPLE_RATE, speed=a.speed)
    dev = int(a.speaker) if a.speaker and a.speaker.isdigit() else a.speaker
    try:
        return SpeakerSink(SpeakerOptions(device=dev))
    except DeviceError as e:
        print(f"{e}\nreplies are written to live-reply.wav instead")
        return PacedSink(WavSink(Path("live-reply.wav")), TTS_SAMPLE_RATE)


def _print_summary(result) -> None:
    print(f"session ended: {result.end_reason}")
    for e in result.errors:
        print(f"  note: {e}")
    for t in result.turns:
        def ms(x):
            return "-" if x is None or t.speech_end is None else f"{(x - t.speech_end) * 1000:.0f} ms"
        print(f"  turn {t.turn}: {t.units} units, prefill {ms(t.prefill_done)}, first token {ms(t.first_token)}, "
              f"first audio {ms(t.first_audio)}, {t.tokens} tokens{', interrupted' if t.interrupted else ''}"
              f"{f' (stopped in {t.stop_ms:.0f} ms)' if t.stop_ms is not None else ''}: {t.text[:60]!r}")
