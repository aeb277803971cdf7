"""What a conversation turn produces, as typed events (`Session.reply` yields them, every caller consumes them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Usage:
    """Token counts of one reply. prompt_tokens: everything the reply reads (the session's whole KV sequence),
    image/audio placeholder positions included; image_tokens / audio_tokens: those positions."""

    prompt_tokens: int
    completion_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    """Seconds from the start of `reply()`; None when it did not happen (no text, no speech)."""

    first_token: float | None = None
    first_audio: float | None = None
    decode_end: float | None = None
    total: float = 0.0


@dataclass(frozen=True)
class PromptReady:
    """The prompt is in the KV sequence. Counts include every image and audio placeholder position."""

    prompt_tokens: int
    image_tokens: int
    audio_tokens: int


@dataclass(frozen=True)
class TextDelta:
    """One decoded token and the text it completes (UTF-8 safe: '' while a character is incomplete, or when the
    text is held back as a possible stop string)."""

    text: str
    token: int | None = None


@dataclass(frozen=True)
class AudioChunk:
    pcm: np.ndarray  # float32 mono
    sample_rate: int


@dataclass(frozen=True)
class Finished:
    """The reply ended. finish_reason: "stop" (terminator or stop string), "length" (token limit or full context),
    "interrupted" (cancelled). completed: a terminator was sampled (the official streaming rule's flag)."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    completed: bool
    usage: Usage
    timing: Timing = field(default_factory=Timing)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


Event = PromptReady | TextDelta | AudioChunk | Finished
