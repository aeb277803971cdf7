"""The official streaming prompt rules (`streaming_prefill` / `streaming_generate` bookkeeping, spec §4.2) as a pure
state machine on a frozen `RuleState`: no models, testable with scripted events.

- new session id: reset everything; the message is rendered with the TTS chat template without generation
  prompt, `<|im_start|>{role}\\n{content}<|im_end|>\\n` (the official "add BOS" adds nothing: the Qwen2 tokenizer
  has no BOS token);
- first user message after that: `<|im_start|>user\\n` + content; following units: content only;
- first user message after a completed reply: `<|im_end|>\\n<|im_start|>user\\n` + content;
- after an interrupted reply (barge-in, or max_new_tokens reached): `<|tts_eos|><|im_end|>\\n<|im_start|>user\\n`;
- system / assistant messages: content only, and they reset the Whisper cache;
- generation prompt: `<|im_end|>\\n<|im_start|>assistant\\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from edge import keys
from edge.errors import InvalidInputError

UNIT_MARKER = keys.UNIT
STREAM_MAX_SLICE_NUMS = 1  # streaming_prefill forces one slice per frame unless told otherwise
DEFAULT_MAX_NEW_TOKENS = 512  # streaming_generate default
STREAM_TERMINATORS = (keys.IM_END, keys.ENDOFTEXT)  # MiniCPMO.terminators: `<|tts_eos|>` does NOT stop a reply
GENERATION_PROMPT = (f"{keys.IM_END}\n{keys.IM_START}assistant\n"
                     f"{keys.SPK_BOS}{keys.SPK}{keys.SPK_EOS}{keys.TTS_BOS}")
AFTER_COMPLETED = f"{keys.IM_END}\n{keys.IM_START}user\n"
AFTER_INTERRUPTED = f"{keys.TTS_EOS}{keys.IM_END}\n{keys.IM_START}user\n"
NEW_USER = f"{keys.IM_START}user\n"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RuleState:
    """The official session flags (`MiniCPMO.reset_session`)."""

    session_id: str | None = None
    new_user_msg: bool = True
    llm_generated: bool = False
    llm_generate_completed: bool = False


@dataclass(frozen=True)
class PrefillPlan:
    """What one `streaming_prefill` call does around the message content.

    Attributes:
        new_session: reset the LLM and Whisper caches before anything else.
        prefix, suffix: template text around the content.
        reset_audio_before: drop the Whisper cache before encoding (system / assistant messages).
        reset_audio_after: drop it after encoding (the session's first prefill).
    """

    new_session: bool
    prefix: str
    suffix: str
    reset_audio_before: bool
    reset_audio_after: bool


def plan_prefill(state: RuleState, session_id: str, role: str) -> tuple[RuleState, PrefillPlan]:
    """Official `streaming_prefill` bookkeeping for one message of `role` in `session_id`."""
    if role not in ROLES:
        raise InvalidInputError(f"message role must be one of {ROLES}, got {role!r}.")
    first = state.session_id is None or session_id != state.session_id
    prefix, s = "", state
    if not first and s.new_user_msg and role == "user":
        if s.llm_generated:
            prefix = AFTER_COMPLETED if s.llm_generate_completed else AFTER_INTERRUPTED
        else:
            prefix = NEW_USER
        s = dataclasses.replace(s, new_user_msg=False)
    reset_before = role in ("system", "assistant")
    if reset_before:
        s = dataclasses.replace(s, new_user_msg=True)
    if first:
        return (RuleState(session_id=session_id),
                PrefillPlan(True, f"{keys.IM_START}{role}\n", f"{keys.IM_END}\n", True, True))
    return s, PrefillPlan(False, prefix, "", reset_before, False)


def plan_generate(state: RuleState) -> tuple[RuleState, str]:
    """Official `streaming_generate` bookkeeping: the generation prompt to append."""
    if state.session_id is None:
        raise InvalidInputError("streaming_generate needs a session: call streaming_prefill(session_id, msgs) first.")
    return (dataclasses.replace(state, new_user_msg=True, llm_generated=True, llm_generate_completed=False),
            GENERATION_PROMPT)


def finish_generate(state: RuleState, completed: bool) -> RuleState:
    """A reply ended: `completed` only when a terminator was sampled (not on interruption or max_new_tokens)."""
    return dataclasses.replace(state, llm_generate_completed=bool(completed))


def expected_prompt_text(events: Sequence[tuple]) -> str:
    """The template/marker text the rules produce for an event script, content rendered by the caller.

    events: ("prefill", session_id, role, content_text) | ("generate", reply_text, completed) | ("reset",).
    Used by tests and docs to show the rules end to end without a model."""
    state, out = RuleState(), []
    for ev in events:
        if ev[0] == "reset":
            state = RuleState()
        elif ev[0] == "prefill":
            state, plan = plan_prefill(state, ev[1], ev[2])
            if plan.new_session:
                out.clear()
            out.append(plan.prefix + ev[3] + plan.suffix)
        elif ev[0] == "generate":
            state, text = plan_generate(state)
            out.append(text + ev[1])
            state = finish_generate(state, ev[2])
    return "".join(out)


