"""The loaded stages of one bundle (LLM, vision and audio encoders, TTS), created lazily and thread-safely, and the
policy by which conversations share them.

Sharing policy (one process, many sessions):
- LLM: llama.cpp's context holds one KV sequence here, so LLM work is serialised in arrival order (`llm_lock`, a
  ticket lock) and `kv_owner` says whose content the sequence holds; a session that finds another's there puts
  its own back (see `edge.session`).
- ONNX encoders and TTS: one run at a time each (`encoder_lock`, `tts_lock`). Each session already gives a run
  every intra-op thread, so two runs at once would only split the same cores; a vision run never waits for the
  TTS and vice versa.
"""

from __future__ import annotations

import threading
import weakref
from typing import Sequence

import numpy as np

from edge import keys
from edge.audio_encoder import AudioEncoder, piece_frames
from edge.bundle import Bundle
from edge.content import ContentOptions, content_parts
from edge.errors import InvalidInputError
from edge.llm import LLM
from edge.options import OmniOptions
from edge.prompt import Message, Prompt, PromptBuilder
from edge.tts.generate import TTS
from edge.vision import VisionEncoder

ROLES = ("user", "assistant", "system")


class FairLock:
    """A FIFO (ticket) lock for threads: waiters get the lock in the order they asked for it. Not reentrant."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next = 0
        self._serving = 0

    def __enter__(self):
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()
        return self

    def __exit__(self, *exc):
        with self._cond:
            self._serving += 1
            self._cond.notify_all()


class Runtime:
    """One bundle's stages. The LLM loads at once; encoders and TTS at first use (a text chat never loads them)."""

    def __init__(self, bundle: Bundle, options: OmniOptions | None = None):
        self.bundle = bundle
        self.options = options or OmniOptions()
        self.llm = LLM(bundle.file(keys.PART_LLM, "model"), self.options.llm,
                       skipped_in_text=bundle.skipped_in_text)
        self.special = dict(bundle.special_tokens)
        self.prompts = PromptBuilder(self.llm, self.special, bundle.chat_template, bundle.template_variables)
        self.llm_lock = FairLock()
        self.encoder_lock = threading.Lock()
        self.tts_lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._vision: VisionEncoder | None = None
        self._audio: AudioEncoder | None = None
        self._tts: TTS | None = None
        self._owner: weakref.ref | None = None
        self.rebuilds = 0  # KV sequences put back after another session used the LLM

    @property
    def random_weights(self) -> bool:
        return self.bundle.random_weights

    # --- stages, created once even when two threads ask at the same time --------------------------------------
    def _create(self, attr: str, make):
        if getattr(self, attr) is None:
            with self._create_lock:
                if getattr(self, attr) is None:
                    setattr(self, attr, make())
        return getattr(self, attr)

    @property
    def vision(self) -> VisionEncoder:
        o = self.options
        return self._create("_vision", lambda: VisionEncoder(self.bundle, variant=o.vision_variant,
                                                              ort=o.encoder_ort or o.ort))

    @property
    def audio(self) -> AudioEncoder:
        o = self.options
        return self._create("_audio", lambda: AudioEncoder(self.bundle, variant=o.audio_variant,
                                                            ort=o.encoder_ort or o.ort))

    @property
    def tts(self) -> TTS:
        o = self.options
        return self._create("_tts", lambda: TTS(self.bundle, variant=o.tts_variant, ort=o.ort))

    def load_stages(self, kinds: set[str]) -> None:
        """Create the stages named in `kinds` ("image", "audio", "speech") now rather than inside a turn."""
        if "image" in kinds:
            _ = self.vision
        if "audio" in kinds:
            _ = self.audio
        if "speech" in kinds:
            _ = self.tts

    # --- KV ownership (one llama.cpp sequence for every session) ------------------------------------------------
    @property
    def kv_owner(self):
        return self._owner() if self._owner is not None else None

    @kv_owner.setter
    def kv_owner(self, session) -> None:
        self._owner = weakref.ref(session) if session is not None else None

    # --- prompts -----------------------------------------------------------------------------------------------
    def stop_ids(self) -> list[int]:
        return [self.special[t] for t in keys.TERMINATORS if t in self.special]

    def build_prompt(self, msgs: Sequence[dict], *, max_slice_nums: int | None = None,
                     use_image_id: bool | None = None, chunk_input: bool = True, omni_input: bool = False,
                     use_tts_template: bool = False, add_generation_prompt: bool = True) -> Prompt:
        """Exactly what the official `chat()` feeds the LLM: prompt text, ids, image/audio spans, speaker bounds,
        media. Any audio in the conversation switches to the TTS template (spec §10)."""
        if not msgs:
            raise InvalidInputError("msgs is empty: pass at least one {'role': 'user', 'content': ...} message.")
        if msgs[0].get("role") not in ("user", "system"):
            raise InvalidInputError("the first message must have role 'user' or 'system' (as the official chat()).")
        counters = {"image": 0, "audio": 0}
        slices = self.options.max_slice_nums if max_slice_nums is None else max_slice_nums
        copts = ContentOptions(slices, True if use_image_id is None else use_image_id, chunk_input)
        messages = []
        for m in msgs:
            role = m.get("role")
            if role not in ROLES:
                raise InvalidInputError(f"message role must be user, assistant or system, got {role!r}.")
            messages.append(Message(role, tuple(content_parts(m.get("content", ""), counters, copts))))
        return self.prompts.build(messages, tts_template=use_tts_template or counters["audio"] > 0,
                                  add_generation_prompt=add_generation_prompt, omni_input=omni_input)

    # --- encoders ------------------------------------------------------------------------------------------------
    def media_embeddings(self, prompt: Prompt) -> list[np.ndarray]:
        """One (n_tokens, hidden) array per Media of the prompt, in prompt order.

        The official processor zero-pads the mel pieces of all audios of a prompt into one batch, which changes
        the last token of an odd-length piece; `batch_frames` reproduces that."""
        waves = [m.payload["wave"] for m in prompt.media if m.kind == "audio"]
        batch_frames = max((piece_frames(len(w)) for w in waves), default=None)
        out = []
        with self.encoder_lock:
            for media in prompt.media:
                if media.kind == "image":
                    out.append(self.vision(media.payload).reshape(-1, self.llm.n_embd))
                else:
                    out.append(self.audio.encode_audio(media.payload["wave"], chunked=media.payload["chunked"],
                                                       batch_frames=batch_frames))
        return out

    @staticmethod
    def segments(prompt: Prompt, embeds: list[np.ndarray]) -> list:
        """LLM input: token-id runs between media spans, and the media embeddings poured into the spans in order
        (an audio's chunks fill its consecutive spans)."""
        used = [0] * len(embeds)
        segs: list = []
        pos = 0
        for span in prompt.spans:
            if span.start > pos:
                segs.append(prompt.ids[pos:span.start])
            e = embeds[span.media_index]
            n = span.end - span.start
            block = e[used[span.media_index]:used[span.media_index] + n]
            if block.shape[0] != n:
                need = sum(s.end - s.start for s in prompt.spans if s.media_index == span.media_index)
                raise RuntimeError(f"{span.kind} #{span.media_index}: {e.shape[0]} embeddings for {need} "
                                   "placeholder tokens")
            used[span.media_index] += n
            segs.append(np.ascontiguousarray(block, dtype=np.float32))
            pos = span.end
        if pos < len(prompt.ids):
            segs.append(prompt.ids[pos:])
        return segs

    def close(self) -> None:
        self.llm.close()
