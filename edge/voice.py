"""Voices: the official system prompts for the default voice and for voice cloning (spec §3.3, `get_sys_prompt`).

Voice cloning in MiniCPM-o 2.6 has no separate speaker encoder: the reference clip goes through Whisper into the
LLM as part of a first user-role message, and the LLM's hidden state at `<|spk|>` then carries the timbre to the
TTS. So a voice is just a message; these helpers build it exactly as the official code does and check the clip.
English prompts only (the official code also has Chinese ones; `language="zh"` raises with that explanation).
"""

from __future__ import annotations

import numpy as np

from edge.constants import AUDIO_SAMPLE_RATE
from edge.errors import InvalidInputError
from edge.prompt import TrustedText

# The official strings (get_sys_prompt, English).
CLONE_PREFIX = "Clone the voice in the provided audio prompt."
ASSISTANT_SUFFIX = "As an assistant, you will speak using this voice style."
ROLEPLAY_SUFFIX = "Try to role-play the character based on the audio prompt above."
OMNI_SYSTEM = "You are a helpful assistant. You can accept video, audio and text input and output voice and text. "
DEFAULT_SYSTEM = "You are a helpful assistant. You can accept audio and text input and output voice and text."
# The default instructions of a live conversation: the official omni system prompt without its voice clause.
OMNI_INSTRUCTIONS = OMNI_SYSTEM.strip()
DEFAULT_VOICE_TEXT = "Use the <reserved_53> voice."  # <reserved_53> is a special token: the built-in voice
MODES = ("default", "omni", "audio_assistant", "audio_roleplay", "voice_cloning")

SAMPLE_RATE = AUDIO_SAMPLE_RATE
MIN_REFERENCE_SECONDS = 1.0  # shorter clips carry too little timbre; the official demo ships 5-10 s clips
SILENCE_RMS = 1e-3  # -60 dBFS: below this a clip is silence (or a muted microphone)


def check_reference_clip(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Validate a 16 kHz mono reference clip; clear errors for empty, too short or silent clips."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.size == 0:
        raise InvalidInputError("the reference voice clip is empty: record 3-10 s of clear speech.")
    seconds = wave.size / sample_rate
    if seconds < MIN_REFERENCE_SECONDS:
        raise InvalidInputError(f"the reference voice clip is {seconds:.2f} s long; voice cloning needs at least "
                                f"{MIN_REFERENCE_SECONDS:.0f} s of speech (3-10 s works best).")
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise InvalidInputError(f"the reference voice clip is silent (RMS {rms:.1e}); check the microphone or file.")
    return wave


def load_reference_clip(source) -> np.ndarray:
    """A path, bytes or (array, sample_rate) -> a checked 16 kHz clip."""
    from edge.io.audio import load_audio

    return check_reference_clip(load_audio(source))


def clone_message(ref_wave: np.ndarray, instructions: str | None = None) -> dict:
    """The official cloning prompt (get_sys_prompt(mode="audio_assistant") with a clip) as a user message; optional
    instructions go in front, as the omni mode puts its prompt."""
    head = f"{instructions} {CLONE_PREFIX}" if instructions else CLONE_PREFIX
    return {"role": "user", "content": [head, ref_wave, ASSISTANT_SUFFIX]}


def sys_prompt(ref_audio: np.ndarray | None = None, mode: str = "audio_assistant", language: str = "en") -> dict:
    """The official first message (role "user") for a voice mode; `ref_audio` is a 16 kHz clip or None."""
    if mode not in MODES:
        raise InvalidInputError(f"unknown voice mode {mode!r}; use one of {', '.join(MODES)}.")
    if language != "en":
        raise InvalidInputError("only the English system prompts are built in (language='en').")
    t = TrustedText
    if ref_audio is not None:
        ref_audio = check_reference_clip(ref_audio)
    if mode == "omni":
        content = ([t(OMNI_SYSTEM + CLONE_PREFIX), ref_audio, t(ASSISTANT_SUFFIX)] if ref_audio is not None
                   else [t(OMNI_SYSTEM)])
    elif mode in ("audio_assistant", "audio_roleplay"):
        suffix = ASSISTANT_SUFFIX if mode == "audio_assistant" else ROLEPLAY_SUFFIX
        content = ([t(CLONE_PREFIX), ref_audio, t(suffix)] if ref_audio is not None
                   else [t(DEFAULT_VOICE_TEXT), t(suffix)])
    elif mode == "voice_cloning":
        if ref_audio is None:
            raise InvalidInputError("voice_cloning mode needs a reference clip (ref_audio).")
        content = [t(CLONE_PREFIX), ref_audio]
    else:
        content = [t(DEFAULT_SYSTEM)]
    return {"role": "user", "content": content}
