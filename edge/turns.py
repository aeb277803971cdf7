"""Turn taking as a pure state machine: `step(state, event) -> (state, actions)`, no models, no threads, no clock.

The orchestrator feeds it what happened (VAD speech start/end, a 1-s unit ready, reply progress) and executes the
actions it returns, in order. Keeping the policy here makes every conversation rule testable with scripted events.

Phases: LISTENING (nobody speaks) -> HEARING (the user speaks: each 1-s unit is prefilled as it arrives)
-> THINKING (end of turn: the rest of the audio and the generation prompt are prefilled, decoding starts)
-> SPEAKING (first token / audio out) -> LISTENING when the reply is generated and played.
Barge-in: speech that starts while THINKING or SPEAKING interrupts the reply (stop decoding and TTS, drop queued
playback) and opens a new user turn; the session continues by the official interruption rule
(`<|tts_eos|><|im_end|>` before the next user turn, see edge/streaming.py). With `barge_in=False` speech during a
reply is ignored, as the official web demo does while it decodes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    LISTENING = "listening"
    HEARING = "hearing"
    THINKING = "thinking"
    SPEAKING = "speaking"
    STOPPED = "stopped"


# --- events ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpeechStart:
    t: float


@dataclass(frozen=True)
class SpeechEnd:
    t: float


@dataclass(frozen=True)
class UnitReady:
    unit: object  # opaque to the policy (audio + frame)


@dataclass(frozen=True)
class ReplyProgress:
    reply: int  # which reply (stale events of an interrupted reply are ignored)
    what: str  # "first_token" | "first_audio"


@dataclass(frozen=True)
class ReplyDone:
    reply: int
    completed: bool


@dataclass(frozen=True)
class Stop:
    reason: str


# --- actions --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BeginUtterance:
    """Start cutting the microphone stream into 1-s units (with pre-roll before the detected speech)."""


@dataclass(frozen=True)
class PrefillUnit:
    unit: object


@dataclass(frozen=True)
class EndUtterance:
    """Prefill what is left of the utterance (a partial unit)."""


@dataclass(frozen=True)
class StartReply:
    reply: int


@dataclass(frozen=True)
class InterruptReply:
    reply: int


@dataclass(frozen=True)
class FinishReply:
    """The reply was generated and played: collect it (join its workers, write its trace)."""

    reply: int


@dataclass(frozen=True)
class Shutdown:
    reason: str


@dataclass(frozen=True)
class TurnOptions:
    """Attributes:
    barge_in: user speech during a reply interrupts it (False: ignored, as the official web demo).
    """

    barge_in: bool = True


@dataclass(frozen=True)
class TurnState:
    phase: Phase = Phase.LISTENING
    turn: int = 0  # user turns completed (= replies started)
    reply: int = 0  # id of the current / last reply
    reply_active: bool = False
    interruptions: int = 0
    options: TurnOptions = TurnOptions()


def step(state: TurnState, event) -> tuple[TurnState, tuple]:
    """Next state and the actions to run, in order."""
    s, ph = state, state.phase
    if ph is Phase.STOPPED:
        return s, ()
    if isinstance(event, Stop):
        acts = (InterruptReply(s.reply),) if s.reply_active else ()
        return dataclasses.replace(s, phase=Phase.STOPPED, reply_active=False), acts + (Shutdown(event.reason),)
    if isinstance(event, SpeechStart):
        if ph is Phase.LISTENING:
            return dataclasses.replace(s, phase=Phase.HEARING), (BeginUtterance(),)
        if ph in (Phase.THINKING, Phase.SPEAKING) and s.options.barge_in and s.reply_active:
            return (dataclasses.replace(s, phase=Phase.HEARING, reply_active=False, interruptions=s.interruptions + 1),
                    (InterruptReply(s.reply), BeginUtterance()))
        return s, ()
    if isinstance(event, UnitReady):
        return s, ((PrefillUnit(event.unit),) if ph is Phase.HEARING else ())
    if isinstance(event, SpeechEnd):
        if ph is not Phase.HEARING:
            return s, ()
        n = s.reply + 1
        return (dataclasses.replace(s, phase=Phase.THINKING, turn=s.turn + 1, reply=n, reply_active=True),
                (EndUtterance(), StartReply(n)))
    if isinstance(event, ReplyProgress):
        if event.reply == s.reply and s.reply_active and ph is Phase.THINKING:
            return dataclasses.replace(s, phase=Phase.SPEAKING), ()
        return s, ()
    if isinstance(event, ReplyDone):
        if event.reply == s.reply and s.reply_active:
            return dataclasses.replace(s, phase=Phase.LISTENING, reply_active=False), (FinishReply(event.reply),)
        return s, ()
    raise TypeError(f"unknown turn event {event!r}")
