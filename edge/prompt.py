"""Chat messages -> the exact token sequence the official `chat()` feeds the LLM, with media slots.

The official code renders a prompt string with the checkpoint's own chat template (or, for spoken replies, the
TTS template of its modeling code), with `(<image>./</image>)` / `(<audio>./</audio>)` marks in the message text,
expands the marks into placeholder text and tokenizes the whole string, special tokens included. We do the same
but keep track of who wrote each piece: the template is rendered with an opaque slot string in place of each user
text and each media mark, and the rendered text is cut at the slots. Template, mark and placeholder text may hold
special tokens; user text never does (a user typing `<|im_end|>` gets those characters). Adjacent plain text is
merged before tokenizing, so the ids equal the official ones whenever the user text holds no special-token strings.
Tools (`tools=`) and assistant `tool_calls` are application data: the template renders them as trusted text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge import keys
from edge.chat_template import ChatTemplate
from edge.errors import ChatTemplateError

IMAGE_MARK = "(<image>./</image>)"  # what chat() puts in the prompt for an image (spec §2.2)
AUDIO_MARK = "(<audio>./</audio>)"  # ... and for an audio (spec §2.3)
TTS_GENERATION_SUFFIX = (keys.SPK_BOS, keys.SPK, keys.SPK_EOS, keys.TTS_BOS)  # spec §3.2
# `MiniCPMO.default_tts_chat_template` (official modeling_minicpmo.py, 2.6): chat() uses it instead of the
# checkpoint's template when the messages hold audio or use_tts_template=True; no default system message.
TTS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n" + "".join(TTS_GENERATION_SUFFIX)
    + "' }}{% endif %}")


class TrustedText(str):
    """Message text written by the application, not the user (e.g. the official voice system prompts, which
    contain `<reserved_53>`): its special-token strings become special tokens, as in the official chat()."""


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, special: bool = False) -> list[int]: ...


@dataclass(frozen=True)
class Media:
    """One image (all its slices) or one audio, with the placeholder text its mark expands to."""

    kind: str  # "image" | "audio"
    placeholder: str
    payload: object = None  # what the encoder needs (preprocessed image, mel, ...): opaque here


@dataclass(frozen=True)
class Message:
    """One chat message. `tool_calls` (assistant) are dicts as in transformers' tool-use format:
    {"type": "function", "function": {"name": ..., "arguments": {...}}}; role "tool" carries a tool's result."""

    role: str
    content: tuple  # of str | Media
    tool_calls: tuple = ()


@dataclass(frozen=True)
class Span:
    """[start, end) positions of one `<unk>` run: a slot for image-slice or audio-chunk embeddings."""

    start: int
    end: int
    kind: str
    media_index: int  # which Media (in prompt order) fills it


@dataclass
class Prompt:
    text: str  # after the chat template, before placeholder expansion (the golden `chat_*_prompt`)
    ids: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    spk_bounds: list[tuple[int, int]] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)

    def bounds(self, kind: str) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.spans if s.kind == kind]


@dataclass(frozen=True)
class Piece:
    """A run of prompt text; trusted = template/placeholder text whose special tokens are parsed."""

    text: str
    trusted: bool
    media: Media | None = None


def render(template: ChatTemplate, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           omni_input: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> list[Piece]:
    """Apply `template` as chat() does (message parts joined with "\\n", or "" for omni input). Pieces keep the
    boundary between trusted template text and user text."""
    joiner = "" if omni_input else "\n"
    nonce = secrets.token_hex(8)  # a user cannot type a slot string they cannot predict
    slots: list[Piece] = []

    def slot(piece: Piece) -> str:
        slots.append(piece)
        return f"\ue000{nonce}:{len(slots) - 1}\ue001"

    chat = []
    for m in messages:
        parts = []
        for part in m.content:
            if isinstance(part, Media):
                parts.append(slot(Piece(IMAGE_MARK if part.kind == "image" else AUDIO_MARK, True, part)))
            elif isinstance(part, TrustedText) or not part:
                parts.append(str(part))
            else:
                parts.append(slot(Piece(str(part), False)))
        d: dict[str, Any] = {"role": m.role, "content": joiner.join(parts)}
        if m.tool_calls:
            d["tool_calls"] = [dict(tc) for tc in m.tool_calls]
        chat.append(d)
    text = template.render(chat, tools=tools, add_generation_prompt=add_generation_prompt)
    pieces: list[Piece] = []
    used = [0] * len(slots)
    for i, chunk in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", text)):
        if i % 2:
            used[int(chunk)] += 1
            pieces.append(slots[int(chunk)])
        elif chunk:
            pieces.append(Piece(chunk, True))
    lost = [s.media.kind for s, n in zip(slots, used) if s.media is not None and n != 1]
    if lost:
        raise ChatTemplateError(f"the chat template rendered {len(lost)} media item(s) ({', '.join(lost)}) not "
                                "exactly once; a template must insert each message's content as it is.")
    return pieces


class PromptBuilder:
    """Turns messages (through the chat template) or rendered pieces into ids + media spans, with a tokenizer and
    the bundle's special-token table.

    `chat_template`: the checkpoint's own template (`Bundle.chat_template`); without one, `build()` is refused
    unless `tts_template=True` (the official TTS template needs none) and only `build_pieces` works.
    """

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, int],
                 chat_template: ChatTemplate | str | None = None, template_variables: Mapping[str, Any] | None = None):
        self.tok = tokenizer
        self.special = dict(special_tokens)
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        self.unk = self.special[keys.UNK]
        variables = dict(template_variables or {})
        if isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template, variables)
        self.template = chat_template
        self.tts_template = ChatTemplate(TTS_CHAT_TEMPLATE, variables)

    def render(self, messages: Sequence[Message], *, tts_template: bool, add_generation_prompt: bool = True,
               omni_input: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> list[Piece]:
        if tts_template:
            template = self.tts_template
        elif self.template is None:
            raise ChatTemplateError("this bundle carries no chat template (converted by an older converter, or the "
                                    "checkpoint's tokenizer_config.json has none): convert the checkpoint again.")
        else:
            template = self.template
        return render(template, messages, add_generation_prompt=add_generation_prompt, omni_input=omni_input,
                      tools=tools)

    def build(self, messages: Sequence[Message], *, tts_template: bool, add_generation_prompt: bool = True,
              omni_input: bool = False, tools: Sequence[Mapping[str, Any]] | None = None) -> Prompt:
        """`tools`: JSON-schema dicts ({"type": "function", "function": {...}}), rendered by the template."""
        return self.build_pieces(self.render(messages, tts_template=tts_template,
                                             add_generation_prompt=add_generation_prompt, omni_input=omni_input,
                                             tools=tools))

    def build_pieces(self, pieces: Sequence[Piece]) -> Prompt:
        prompt = Prompt(text="".join(p.text for p in pieces))
        atoms: list[object] = []  # str (plain text) | int (special id) | ("slot", kind, media_index)
        for p in pieces:
            if p.media is not None:
                prompt.media.append(p.media)
                self._split_trusted(p.media.placeholder, atoms, (p.media.kind, len(prompt.media) - 1))
            elif p.trusted:
                self._split_trusted(p.text, atoms, None)
            else:
                atoms.append(p.text)
        plain: list[str] = []

        def flush():
            if plain:
                prompt.ids.extend(self.tok.tokenize("".join(plain), special=False))
                plain.clear()

        for a in atoms:
            if isinstance(a, str):
                plain.append(a)
                continue
            flush()
            if isinstance(a, tuple):
                _, kind, idx = a
                pos = len(prompt.ids)
                if (prompt.spans and prompt.spans[-1].end == pos and prompt.spans[-1].media_index == idx
                        and prompt.spans[-1].kind == kind):
                    last = prompt.spans.pop()
                    prompt.spans.append(Span(last.start, pos + 1, kind, idx))
                else:
                    prompt.spans.append(Span(pos, pos + 1, kind, idx))
                prompt.ids.append(self.unk)
            else:
                prompt.ids.append(a)
        flush()
        spk_bos, spk_eos = self.special.get(keys.SPK_BOS), self.special.get(keys.SPK_EOS)
        starts = [i for i, t in enumerate(prompt.ids) if t == spk_bos]
        ends = [i for i, t in enumerate(prompt.ids) if t == spk_eos]
        prompt.spk_bounds = [(s + 1, e) for s, e in zip(starts, ends)]
        return prompt

    def _split_trusted(self, text: str, atoms: list, slot: tuple[str, int] | None) -> None:
        for chunk in self._split.split(text):
            if not chunk:
                continue
            if chunk in self.special:
                if chunk == keys.UNK and slot is not None:
                    atoms.append(("slot", *slot))
                else:
                    atoms.append(self.special[chunk])
            else:
                atoms.append(chunk)
