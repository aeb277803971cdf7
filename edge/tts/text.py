"""TTS text: the ChatTTS BERT tokenizer, the official number/markdown normaliser and the 300-slot prompt window.

The official streaming TTS (`_generate_mel_spec_audio_streaming`) speaks the LLM text after
`NumberToTextConverter.replace_numbers_with_text(piece, lang).replace("*", "")` per streamed piece; the language is
detected once from the first two pieces. The official converter reads numbers *digit by digit* ("23" -> "two three",
"二三") and needs no library; that is the default here (`NumberStyle.DIGITS`). `NumberStyle.CARDINAL` ("twenty-three")
is an option for English that uses the `num2words` package (imported only when chosen). The non-streaming path
(`_generate_mel_spec`) does no normalisation at all.

`prepare_tts_text` builds `[Stts][spk_emb]` + text + `[Etts]` + `[PAD]`... + `[Ptts]` so that text + `[Etts]` +
padding fill exactly `reserved_len` (300) slots; a text of `reserved_len` tokens or more is cut to `reserved_len`
and gets no `[Etts]`.

Control tokens come only from here, never from the text: the official code tokenises the whole prompt string, so a
user's "[spk_emb]" or "[Etts]" became a control token (a second speaker slot, an early end). `TtsTokenizer.encode_text`
reads text literally (the spellings become ordinary word pieces, as the LLM side does for its own) and
`prompt_ids` joins the control ids and the text ids; for text without such spellings the ids are the same as the
official string tokenisation (the BERT pre-tokenizer splits at the special tokens either way).
"""

from __future__ import annotations

import enum
import re
from pathlib import Path

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError, ModelFilesNotFoundError

TOKENIZER_DIR = "tts/tokenizer"  # in the bundle; roles "tokenizer/<file>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")

# ChatTTS control tokens (assets/chattts_tokenizer special tokens).
STTS, PTTS, ETTS, PAD, SPK_EMB = "[Stts]", "[Ptts]", "[Etts]", "[PAD]", "[spk_emb]"

# Official `NumberToTextConverter` digit readings.
_DIGITS_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS_ZH = ("零", "一", "二", "三", "四", "五", "六", "七", "八", "九")
# Official `sentence_end` candidates, in its order.
SENTENCE_ENDS = (".", "。", "!", "?", "！", "？")


class NumberStyle(str, enum.Enum):
    DIGITS = "digits"  # official: every digit read alone
    CARDINAL = "cardinal"  # num2words cardinal numbers


class TtsTokenizer:
    """The ChatTTS BERT WordPiece tokenizer (`tokenizer.json`), via the `tokenizers` library."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ModelFilesNotFoundError(f"TTS tokenizer {path} not found; convert the bundle again.", str(path))
        self._tok = Tokenizer.from_file(str(path))  # control tokens parsed (only for our own control strings)
        self._text = Tokenizer.from_file(str(path))  # a second instance: the flag is per tokenizer, not per call
        self._text.encode_special_tokens = True  # user text: "[PAD]" is the characters [ P A D ], not a token

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "TtsTokenizer":
        return cls(bundle.file(keys.PART_TTS, "tokenizer/tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        """Ids without [CLS]/[SEP] (`encode(..., add_special_tokens=False)` in the official code); control-token
        spellings become control tokens: for prompt strings we build, never for user text (`encode_text`)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Ids of literal text: control-token spellings in `text` stay text (word pieces of "[", "pad", "]")."""
        return self._text.encode(text, add_special_tokens=False).ids

    def control_ids(self, control: str) -> list[int]:
        """Ids of a string made of control tokens only (e.g. "[Stts][spk_emb]")."""
        return self.encode(control)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ModelFilesNotFoundError(f"the TTS tokenizer has no {token!r} token: not a ChatTTS tokenizer.")
        return i


def prompt_ids(text: str, tokenizer: TtsTokenizer, reserved_len: int = 300,
               num_spk_embs: int = 1) -> tuple[list[int], int]:
    """The ids `prepare_tts_text` describes, with `text` tokenised literally: (ids, number of text tokens)."""
    ids = tokenizer.encode_text(text)
    if len(ids) >= reserved_len:  # official: cut, decode, and the decoded text is tokenised again
        ids = tokenizer.encode_text(tokenizer.decode(ids[:reserved_len]))
        tail: list[int] = []
    else:
        tail = tokenizer.control_ids(ETTS + PAD * (reserved_len - len(ids) - 1))
    return tokenizer.control_ids(STTS + SPK_EMB * num_spk_embs) + ids + tail + tokenizer.control_ids(PTTS), \
        min(len(ids), reserved_len)


def prepare_tts_text(text: str, tokenizer: TtsTokenizer, reserved_len: int = 300,
                     num_spk_embs: int = 1) -> tuple[str, int]:
    """Official `prepare_tts_text`: (prompt string, number of text tokens in the window)."""
    ids = tokenizer.encode_text(text)
    n = len(ids)
    if n < reserved_len:
        pad = ETTS + PAD * (reserved_len - n - 1)
    else:
        ids = ids[:reserved_len]
        n = len(ids)
        text = tokenizer.decode(ids)
        pad = ""
    return f"{STTS}{SPK_EMB * num_spk_embs}{text}{pad}{PTTS}", n


def detect_language(text: str) -> str:
    """Official rule: "chinese" if CJK ideographs >= latin letters, else "english"."""
    zh = len(re.findall(r"[\u4e00-\u9fff]", text))
    en = len(re.findall(r"[a-zA-Z]", text))
    return "chinese" if zh >= en else "english"


def _cardinal_en(num: str) -> str:
    try:
        from num2words import num2words
    except ImportError as e:  # optional dependency
        raise InvalidInputError("NumberStyle.CARDINAL needs the num2words package: `pip install num2words`, or use "
                                "NumberStyle.DIGITS (the official behaviour).") from e
    return num2words(int(num), lang="en")


def replace_numbers(text: str, language: str, style: NumberStyle = NumberStyle.DIGITS) -> str:
    """Replace each run of digits, left to right, the way `NumberToTextConverter.replace_numbers_with_text` does
    (first occurrence of each number string, in order of appearance). CARDINAL applies to English only (num2words
    has no Chinese); Chinese keeps the official digit-by-digit reading."""
    for num in re.findall(r"\d+", text):
        if style == NumberStyle.CARDINAL and language != "chinese" and num.isascii():
            rep = _cardinal_en(num)
        elif language == "chinese":
            rep = "".join(_DIGITS_ZH[int(c)] for c in num if c.isascii())
        else:
            rep = " ".join(_DIGITS_EN[int(c)] for c in num if c.isascii())
        text = text.replace(num, rep, 1)
    return text


def normalize_piece(piece: str, language: str, style: NumberStyle = NumberStyle.DIGITS) -> str:
    """What the streaming loop appends to the TTS text for one LLM piece: numbers spoken, markdown "*" removed."""
    return replace_numbers(piece, language, style).replace("*", "")


def sentence_end(text: str) -> str:
    """Official `sentence_end`: the first sentence-ending mark found (a "." right after a digit does not count)."""
    for c in SENTENCE_ENDS:
        if c in text:
            if c == ".":
                i = text.find(c)
                if i > 0 and text[i - 1].isdigit():
                    continue
            return c
    return ""
