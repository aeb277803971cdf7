"""`minicpmo-edge chat`: an interactive terminal chat with images, audio, video, a cloned voice and spoken replies.

It runs one conversation (`edge.session.Session`) on the model in this process: replies stream token by token,
and with --speak (or --save-audio) the reply is spoken as it is generated. Files given on
the command line are attached to the first turn; `/image`, `/audio`, `/video` attach files to the next turn.
Ctrl-C stops the reply in progress; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from edge.constants import RANDOM_WEIGHTS_NOTICE
from edge.content import FRAME_PROMPT
from edge.default_bundle import resolve_bundle
from edge.errors import EdgeError
from edge.events import AudioChunk, Finished, TextDelta
from edge.io.audio import load_audio
from edge.io.images import load_image
from edge.io.speaker import SpeakerSink, write_wav
from edge.io.video import VideoOptions, load_video
from edge.omni import Omni
from edge.onnx_session import OrtOptions
from edge.options import LLMOptions, OmniOptions
from edge.profiles import start_profile
from edge.sampling import SamplingOptions
from edge.session import ReplyOptions, SpeechOptions
from edge.voice import clone_message

HELP = ("commands: /image PATH, /audio PATH, /video PATH (attach to the next turn), /reset (forget the "
        "conversation), /help, /exit")


@dataclass(frozen=True)
class ChatOptions:
    """Attributes:
    bundle: bundle dir (None = an installed real bundle, else the built-in random-weights one).
    images, audios, video: files attached to the first turn.
    voice: reference clip whose voice the spoken replies clone (official voice-cloning prompt).
    speak: play replies on the speakers; save_audio: write each spoken reply to DIR/reply-N.wav.
    system: system prompt; max_tokens, temperature, seed: generation settings (None = official defaults).
    threads: CPU threads (0 = the profile's; all cores without a profile).
    profile, overrides: device profile name (None = none: fp32 graphs, no memory check) and its `--set` values.
    """

    bundle: str | None = None
    images: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()
    video: str | None = None
    voice: str | None = None
    speak: bool = False
    save_audio: str | None = None
    system: str | None = None
    max_tokens: int = 512
    temperature: float | None = None
    seed: int | None = None
    threads: int = 0
    max_video_frames: int = 16
    profile: str | None = None
    overrides: tuple = ()


@dataclass
class _Turn:
    content: list = field(default_factory=list)
    video: bool = False


DEFAULT_N_CTX = 4096  # context without a device profile (the laptop profile's n_ctx)


def load_model(options: ChatOptions) -> Omni:
    """The model for a terminal chat: the device profile's settings when one is named, else plain defaults."""
    bundle = resolve_bundle(options.bundle)
    if options.profile is None and not options.overrides:
        return Omni.load(bundle, OmniOptions(llm=LLMOptions(n_ctx=DEFAULT_N_CTX, n_threads=options.threads),
                                             ort=OrtOptions(intra_op_threads=options.threads)))
    prof, hw = start_profile(bundle, options.profile, options.overrides, threads=options.threads)
    return Omni.load(bundle, profile=prof, hardware=hw)


class ChatSession:
    """The conversation state on one model; `ask(text)` answers a turn and returns the reply text."""

    def __init__(self, options: ChatOptions, out: TextIO = sys.stdout):
        self.o, self.out = options, out
        self.omni = load_model(options)
        self.session = self.omni.new_session()
        self.history: list[dict] = []
        self.has_video = False
        self.pending = _Turn()
        self.replies = 0
        self.voice: list[dict] = [clone_message(load_audio(options.voice))] if options.voice else []
        self.sink = None
        if options.speak:
            try:
                self.sink = SpeakerSink()
            except Exception as e:
                raise RuntimeError(f"cannot open an audio output device ({e}); use --save-audio DIR instead of "
                                   "--speak.") from e
        for p in options.images:
            self.attach("image", p)
        for p in options.audios:
            self.attach("audio", p)
        if options.video:
            self.attach("video", options.video)

    @property
    def speaking(self) -> bool:
        return self.sink is not None or self.o.save_audio is not None

    def attach(self, kind: str, path: str) -> None:
        if kind == "image":
            self.pending.content.append(load_image(Path(path)))
        elif kind == "audio":
            self.pending.content.append(load_audio(Path(path)))
        elif kind == "video":
            frames = load_video(Path(path), VideoOptions(max_frames=self.o.max_video_frames)).frames
            self.pending.content.extend(frames)
            self.pending.video = True
        else:
            raise ValueError(kind)

    def reset(self) -> None:
        self.history.clear()
        self.has_video = False

    def ask(self, text: str, cancel: threading.Event | None = None) -> str:
        turn, self.pending = self.pending, _Turn()
        user = {"role": "user", "content": turn.content + ([text] if text else [])}
        self.has_video = self.has_video or turn.video
        msgs = ([{"role": "system", "content": self.o.system}] if self.o.system else [])
        msgs += (self.voice if self.speaking else []) + self.history + [user]
        sampling = SamplingOptions(seed=self.o.seed)
        if self.o.temperature is not None:
            sampling = SamplingOptions(seed=self.o.seed, temperature=self.o.temperature,
                                       greedy=self.o.temperature == 0)
        prompt = self.omni.build_prompt(msgs, use_tts_template=self.speaking,
                                        **(FRAME_PROMPT if self.has_video else {}))
        options = ReplyOptions(sampling, max_new_tokens=max(self.o.max_tokens, 1),
                               speech=SpeechOptions(seed=self.o.seed) if self.speaking else None)
        audio: list = []
        finished = None
        for ev in self.session.reply(options, prompt=prompt, replace=True, cancel=cancel):
            if isinstance(ev, TextDelta) and ev.text:
                self.out.write(ev.text)
                self.out.flush()
            elif isinstance(ev, AudioChunk):
                audio.append(ev.pcm)
                if self.sink is not None:
                    self.sink.push(ev.pcm)
            elif isinstance(ev, Finished):
                finished = ev
        self.out.write("\n")
        self.history += [user, {"role": "assistant", "content": finished.text}]
        self.replies += 1
        if self.sink is not None:
            self.sink.flush()
        if self.o.save_audio and audio:
            path = Path(self.o.save_audio) / f"reply-{self.replies}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(path, np.concatenate(audio), self.omni.tts.sample_rate)
            self.out.write(f"[speech: {path}]\n")
        return finished.text

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        self.omni.close()


def run_chat(options: ChatOptions, *, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The read-eval-print loop."""
    session = ChatSession(options, out)
    b = session.omni.bundle
    out.write(f"bundle: {b.root} ({b.source.get('name')})\n")
    if b.random_weights:
        out.write(RANDOM_WEIGHTS_NOTICE + "\n")
    out.write(HELP + "\n")
    try:
        while True:
            try:
                line = read("you> ").strip()
            except EOFError:
                break
            if line in ("/exit", "/quit"):
                break
            if line == "/help":
                out.write(HELP + "\n")
                continue
            if line == "/reset":
                session.reset()
                out.write("[conversation cleared]\n")
                continue
            cmd, _, arg = line.partition(" ")
            try:
                if cmd in ("/image", "/audio", "/video"):
                    session.attach(cmd[1:], arg.strip())
                    out.write(f"[{cmd[1:]} attached to the next turn]\n")
                    continue
                if not line and not session.pending.content:
                    continue
                out.write("assistant> ")
                out.flush()
                session.ask(line)
            except KeyboardInterrupt:
                out.write("\n[reply interrupted]\n")
                if session.sink is not None:
                    session.sink.interrupt()
            except EdgeError as e:  # bad file, too long a conversation...: say it and keep chatting
                out.write(f"\nerror: {e}\n")
    finally:
        session.close()
