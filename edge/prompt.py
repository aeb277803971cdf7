"""Chat messages -> the exact token sequence the official `chat()` feeds the LLM, with media slots.

The official code renders a prompt string (chat template + `(<image>./</image>)` / `(<audio>./</audio>)` marks),
expands the marks into placeholder text and tokenizes the whole string, special tokens included. We do the same
but keep track of who wrote each piece: template and placeholder text may contain special tokens, user text never
does (a user typing `<|im_end|>` gets those characters). Adjacent plain text is merged before tokenizing, so the
ids equal the official ones whenever the user text holds no special-token strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from edge import keys

IMAGE_MARK = "(<image>./</image>)"  # what chat() puts in the prompt for an image (spec §2.2)
AUDIO_MARK = "(<audio>./</audio>)"  # ... and for an audio (spec §2.3)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # the ChatML template's default (tokenizer_config.json)
TTS_GENERATION_SUFFIX = (keys.SPK_BOS, keys.SPK, keys.SPK_EOS, keys.TTS_BOS)  # spec §3.2


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
    role: str
    content: tuple  # of str | Media


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


def render(messages: Sequence[Message], *, tts_template: bool, add_generation_prompt: bool = True,
           omni_input: bool = False) -> list[Piece]:
    """Apply the chat template. Pieces keep the boundary between trusted template text and user text."""
    joiner = "" if omni_input else "\n"
    pieces: list[Piece] = []
    if not tts_template and messages and messages[0].role != "system":
        pieces.append(Piece(f"{keys.IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{keys.IM_END}\n", True))
    for m in messages:
        pieces.append(Piece(f"{keys.IM_START}{m.role}\n", True))
        for i, part in enumerate(m.content):
            if i:
                pieces.append(Piece(joiner, True))
            if isinstance(part, Media):
                mark = IMAGE_MARK if part.kind == "image" else AUDIO_MARK
                pieces.append(Piece(mark, True, part))
            else:
                pieces.append(Piece(str(part), isinstance(part, TrustedText)))
        pieces.append(Piece(f"{keys.IM_END}\n", True))
    if add_generation_prompt:
        suffix = "".join(TTS_GENERATION_SUFFIX) if tts_template else ""
        pieces.append(Piece(f"{keys.IM_START}assistant\n{suffix}", True))
    return pieces


class PromptBuilder:
    """Turns rendered pieces into ids + media spans with a tokenizer and the bundle's special-token table."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, int]):
        self.tok = tokenizer
        self.special = dict(special_tokens)
        names = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
        self.unk = self.special[keys.UNK]

    def build(self, messages: Sequence[Message], *, tts_template: bool, add_generation_prompt: bool = True,
              omni_input: bool = False) -> Prompt:
        pieces = render(messages, tts_template=tts_template, add_generation_prompt=add_generation_prompt,
                        omni_input=omni_input)
        return self.build_pieces(pieces)

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
                if prompt.spans and prompt.spans[-1].end == pos and prompt.spans[-1].media_index == idx \
                        and prompt.spans[-1].kind == kind:
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
