"""The Qwen2 LLM backbone on llama.cpp (llama-cpp-python's low-level API), fed with token ids AND embeddings.

A prompt is a list of segments, each token ids or an (n, hidden) float32 matrix; both go into one KV sequence
with consecutive positions (`llama_batch.token` vs `llama_batch.embd`), which is how image and audio embeddings
from the ONNX encoders reach the model without any text round-trip. The KV cache persists across calls: a new
prompt that starts with what is already cached only prefills its new tail (session / multi-turn reuse).
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import mmap
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from edge.errors import ContextLengthExceededError, CorruptModelFileError, InvalidInputError, ModelFilesNotFoundError
from edge.options import LLMOptions
from edge.sampling import Sampler, SamplingOptions
from edge.token_rows import GGUFFormatError, TokenRows, read_header

__all__ = ["LLM", "LLMOptions", "TokenEvent", "check_gguf_file"]

Segment = Union[Sequence[int], np.ndarray]  # token ids (1-D ints) or embeddings (2-D float32, n x hidden)

_GGUF_MAGIC = b"GGUF"
# llama.cpp `enum ggml_type` / `enum llama_flash_attn_type` values (ggml.h, llama.h).
_GGML_TYPE = {"f32": 0, "f16": 1, "q8_0": 8}
_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
_LOAD_MODE_READ, _LOAD_MODE_MMAP = 0, 1  # enum llama_load_mode: NONE (read into buffers), MMAP


def _set_fields(struct, **values) -> None:
    """Set ctypes struct fields, refusing names the struct lacks (ctypes would silently add a Python attribute,
    which is how a renamed llama.cpp parameter would otherwise be ignored without a word)."""
    names = {f[0] for f in type(struct)._fields_}
    for k, v in values.items():
        if k not in names:
            raise RuntimeError(f"this llama-cpp-python has no {type(struct).__name__}.{k}; "
                               "install the version pinned in pyproject.toml")
        setattr(struct, k, v)


@dataclass
class TokenEvent:
    """One generated token: its id, the text it completes (UTF-8 safe, may be ''), and optionally its hidden state."""

    token: int
    text: str
    hidden: np.ndarray | None = None


def check_gguf_file(path: Path) -> None:
    """Fail early, with the fix, on a missing, empty, foreign or truncated GGUF (llama.cpp would only say 'failed')."""
    if not path.is_file():
        raise ModelFilesNotFoundError(f"LLM file {path} not found. Convert a checkpoint with `minicpmo-edge convert`.",
                                      str(path))
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != _GGUF_MAGIC:
        raise CorruptModelFileError(f"{path} is not a GGUF file (bad magic or {size} bytes). Convert it again.",
                                    str(path))
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            end = read_header(buf, path).data_end()
    except (GGUFFormatError, ValueError, OverflowError) as e:  # truncated metadata, nonsense counts or types
        raise CorruptModelFileError(f"{path} is truncated or corrupt ({e}). Convert it again.", str(path)) from e
    if end > size:
        raise CorruptModelFileError(
            f"{path} is truncated: its tensors need {end} bytes, the file has {size}. Download or convert it again.",
            str(path))


class LLM:
    """A loaded GGUF model + one context with one KV sequence. Not thread-safe: one generation at a time."""

    def __init__(self, path: str | Path, options: LLMOptions | None = None, *,
                 skipped_in_text: Sequence[int] | None = None):
        """`skipped_in_text`: the ids a reply's text leaves out (bundle meta: the checkpoint's `special` tokens).
        Every other token keeps its text, as in HF's decode(skip_special_tokens=True): llama.cpp types
        `<|fim_prefix|>`, `<|file_sep|>` CONTROL (they look special) and retypes `</s>` CONTROL at load, yet the
        checkpoint does not mark them special. None: llama.cpp's own rule (no CONTROL token text)."""
        import logging

        import llama_cpp

        # llama-cpp-python routes llama.cpp's log through this logger; below ERROR it is load-time noise.
        verbose = bool(options and options.verbose)
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        self._lib = llama_cpp
        self.path = Path(path)
        self._token_rows = None  # edge.token_rows.TokenRows, opened at the first mixed prompt
        self.options = o = options or LLMOptions()
        check_gguf_file(self.path)
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        _set_fields(mp, load_mode=_LOAD_MODE_MMAP if o.use_mmap else _LOAD_MODE_READ, use_extra_bufts=o.repack,
                    n_gpu_layers=o.n_gpu_layers)
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mp)
        if not self._model:
            raise CorruptModelFileError(f"llama.cpp could not load {self.path}; see its log above.", str(self.path))
        cp = llama_cpp.llama_context_default_params()
        import os

        cores = os.cpu_count() or 1
        _set_fields(cp, n_ctx=o.n_ctx, n_batch=min(o.n_batch, o.n_ctx), n_ubatch=min(o.n_batch, o.n_ctx),
                    n_seq_max=1, n_threads=o.n_threads or cores,
                    n_threads_batch=o.n_threads_batch or o.n_threads or cores,
                    type_k=_GGML_TYPE[o.kv_type], type_v=_GGML_TYPE[o.kv_type],
                    flash_attn_type=_FLASH_ATTN[o.flash_attn], embeddings=False)
        self._ctx = llama_cpp.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context (n_ctx={o.n_ctx}); try a smaller n_ctx.")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))  # llama.cpp may round the request up
        self.n_batch = int(llama_cpp.llama_n_batch(self._ctx))  # ... and clamp the batch to it
        self.n_threads, self.n_threads_batch = int(cp.n_threads), int(cp.n_threads_batch)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.skipped_in_text = None if skipped_in_text is None else frozenset(int(t) for t in skipped_in_text)
        self._history: list[object] = []  # one key per cached position (token id or embedding-row key)
        self._context_ids: list[int] = []  # token ids in the cache (for the repetition penalty)
        self._embeddings_on = False
        self._step_batch = None
        self._lock = threading.Lock()

    # --- tokenizer ---------------------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`. With special=False, `<|im_end|>` typed by a user stays plain characters.
        Text is NFC-normalised first, as the HF tokenizer's normalizer does."""
        data = unicodedata.normalize("NFC", text).encode("utf-8")
        if not data:
            return []
        n_max = len(data) + 8
        buf = (self._lib.llama_token * n_max)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            buf = (self._lib.llama_token * -n)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, -n, False, special)
        return list(buf[:n])

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def text_bytes(self, token: int) -> bytes:
        """What a reply's text holds for `token`, as HF's decode(skip_special_tokens=True): special tokens give
        nothing, every other token its text."""
        if self.skipped_in_text is None:
            return self.token_bytes(token, special=False)
        return b"" if token in self.skipped_in_text else self.token_bytes(token, special=True)

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """special=False: reply text (`text_bytes`); special=True: every token's text."""
        pieces = (self.token_bytes(t, special=True) if special else self.text_bytes(t) for t in tokens)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def token_id(self, piece: str) -> int:
        """Id of a single special token such as `<|im_end|>`; error if it is not exactly one token."""
        ids = self.tokenize(piece, special=True)
        if len(ids) != 1:
            raise KeyError(f"{piece!r} is not a single token in {self.path.name} (got {ids})")
        return ids[0]

    # --- KV cache ------------------------------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self._history)

    def cached_tokens(self) -> list[int | None]:
        """What the KV cache holds, position by position: the token id, or None where an embedding went in."""
        return [k if isinstance(k, int) else None for k in self._history]

    def reset(self) -> None:
        """Forget the whole KV cache (new session)."""
        self._lib.llama_memory_clear(self._mem, True)
        self._history.clear()
        self._context_ids.clear()

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions, drop the rest."""
        if n < len(self._history):
            self._lib.llama_memory_seq_rm(self._mem, 0, n, -1)
            del self._history[n:]
            self._context_ids = [k for k in self._history if isinstance(k, int)]

    @staticmethod
    def _keys(segments: Sequence[Segment]) -> list[object]:
        keys: list[object] = []
        for seg in segments:
            if isinstance(seg, np.ndarray) and seg.ndim == 2:
                digest = hashlib.sha1(np.ascontiguousarray(seg, dtype=np.float32).tobytes()).hexdigest()
                keys.extend((digest, i) for i in range(seg.shape[0]))
            else:
                keys.extend(int(t) for t in seg)
        return keys

    # --- forward -------------------------------------------------------------------------------------------------
    def _set_embeddings(self, on: bool) -> None:
        if on != self._embeddings_on:
            self._lib.llama_set_embeddings(self._ctx, on)
            self._embeddings_on = on

    def _decode(self, seg: Segment, pos0: int, want: np.ndarray) -> None:
        """One llama_decode of a token or embedding chunk; `want[i]` marks rows whose outputs are needed."""
        lib = self._lib
        is_embd = isinstance(seg, np.ndarray) and seg.ndim == 2
        n = len(seg)
        batch = lib.llama_batch_init(n, self.n_embd if is_embd else 0, 1)
        try:
            batch.n_tokens = n
            if is_embd:
                x = np.ascontiguousarray(seg, dtype=np.float32)
                ctypes.memmove(batch.embd, x.ctypes.data, x.nbytes)
            for i in range(n):
                if not is_embd:
                    batch.token[i] = int(seg[i])
                batch.pos[i] = pos0 + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = bool(want[i])
            rc = lib.llama_decode(self._ctx, batch)
        finally:
            lib.llama_batch_free(batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} at position {pos0} (n={n}).")

    def _row(self, i: int, hidden: bool) -> np.ndarray:
        lib = self._lib
        if hidden:
            ptr = lib.llama_get_embeddings_ith(self._ctx, i)
            n = self.n_embd
        else:
            ptr = lib.llama_get_logits_ith(self._ctx, i)
            n = self.n_vocab
        if not ptr:
            raise RuntimeError(f"llama.cpp returned no {'hidden state' if hidden else 'logits'} for output {i}")
        return np.ctypeslib.as_array(ptr, shape=(n,)).copy()

    def input_rows(self, segments: Sequence[Segment]) -> np.ndarray:
        """Segments -> the (n, n_embd) rows the model reads: embedding blocks as given, token ids as their rows of
        the GGUF's token table (`edge.token_rows`, opened at first use)."""
        if self._token_rows is None:
            self._token_rows = TokenRows(self.path)
        return np.concatenate([np.asarray(s, np.float32) if isinstance(s, np.ndarray) and s.ndim == 2
                               else self._token_rows.rows(s) for s in segments])

    def _one_embedding_run(self, segments: Sequence[Segment]) -> Sequence[Segment]:
        """Mixed token/embedding segments -> one (n, n_embd) array (positions unchanged; the cache keys were
        taken from the original segments). Text-only prompts stay token batches."""
        if not any(isinstance(s, np.ndarray) and s.ndim == 2 for s in segments) or len(segments) < 2:
            return segments
        return [self.input_rows(segments)]

    def _chunks(self, lo: int, hi: int, hidden_set: set[int]) -> Iterator[tuple[int, int]]:
        """[c0, c1) decode ranges of at most n_batch positions; each requested hidden position is its own chunk."""
        marks = [q for p in hidden_set for q in (p, p + 1) if lo < q < hi]
        cuts = sorted({lo, hi, *range(lo, hi, self.n_batch), *marks})
        return zip(cuts[:-1], cuts[1:])

    def prefill(self, segments: Sequence[Segment], *, logits: str = "last", hidden_positions: Sequence[int] = (),
                reuse: bool = True) -> tuple[np.ndarray | None, dict[int, np.ndarray]]:
        """Feed the prompt `segments` (the WHOLE sequence for this context, or only the new part with
        reuse=False after earlier calls). Returns (logits, hidden) where logits is the last row (logits="last"),
        all new rows (n_new x vocab, logits="all") or None, and hidden maps absolute positions in
        `hidden_positions` to final-norm hidden states (used for the TTS speaker embedding).

        With reuse=True the longest cached prefix equal to the new sequence is kept and only the rest is decoded.
        """
        with self._lock:
            keys = self._keys(segments)
            if reuse:
                common = 0
                for a, b in zip(self._history, keys):
                    if a != b:
                        break
                    common += 1
                if common == len(keys) and common > 0:
                    common -= 1  # re-decode the last position so that its logits exist
                if hidden_positions:
                    common = min(common, min(int(p) for p in hidden_positions))  # hidden states are not cached
                self.truncate(common)
                start = common
            else:
                start = len(self._history)
                keys = list(self._history) + keys
            total = len(keys)
            if total > self.n_ctx:
                raise ContextLengthExceededError(total, self.n_ctx)
            hidden_set = {int(p) for p in hidden_positions}
            if self.options.text_as_embeddings and not reuse:
                segments = self._one_embedding_run(segments)
            # Walk the segments, decoding only positions >= start, in chunks of n_batch.
            flat_pos = 0 if reuse else len(self._history)
            all_logits: list[np.ndarray] = []
            hidden: dict[int, np.ndarray] = {}
            last_row = None
            for seg in segments:
                seg_len = len(seg)
                seg_start, seg_end = flat_pos, flat_pos + seg_len
                flat_pos = seg_end
                if seg_end <= start:
                    continue
                lo = max(start, seg_start)
                for c0, c1 in self._chunks(lo, seg_end, hidden_set):
                    part = seg[c0 - seg_start:c1 - seg_start]
                    pos = np.arange(c0, c1)
                    want = np.isin(pos, list(hidden_set)) if hidden_set else np.zeros(len(pos), bool)
                    # With embeddings on llama.cpp outputs every row of the batch (and runs the LM head on
                    # each), so it is switched on only for the short chunks that hold a requested position.
                    self._set_embeddings(bool(want.any()))
                    if logits == "all":
                        want[:] = True
                    if c1 == total:
                        want[-1] = True
                    self._decode(part, c0, want)
                    # llama_get_*_ith take the row's index in the batch (llama.cpp maps it to its output slot).
                    for j in np.flatnonzero(want):
                        p = int(pos[j])
                        if logits == "all" or p == total - 1:
                            row = self._row(int(j), False)
                            if logits == "all":
                                all_logits.append(row)
                            last_row = row
                        if p in hidden_set:
                            hidden[p] = self._row(int(j), True)
                    self._history.extend(keys[c0:c1])
                    self._context_ids.extend(k for k in keys[c0:c1] if isinstance(k, int))
            if logits == "all":
                return (np.stack(all_logits) if all_logits else None), hidden
            return (last_row if logits == "last" else None), hidden

    def generate(self, last_logits: np.ndarray, sampling: SamplingOptions, *, max_new_tokens: int,
                 stop_ids: Sequence[int] = (), min_new_tokens: int = 0, want_hidden: bool = False,
                 should_stop=None) -> Iterator[TokenEvent]:
        """Sample from `last_logits`, feed each token back, and yield TokenEvents with UTF-8-safe text.

        Stops on a stop id (not yielded as text; its event has text ''), `max_new_tokens`, a full context
        (finish reason available via `self.last_finish_reason`) or when `should_stop()` returns True.
        """
        sampler = Sampler(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stop = set(stop_ids)
        logits = last_logits
        self.last_finish_reason = "length"
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                self.last_finish_reason = "interrupted"
                return
            if step < min_new_tokens and stop:
                logits = logits.copy()
                logits[list(stop)] = -np.inf
            tok = sampler(logits, np.asarray(self._context_ids[-4096:], dtype=np.int64))
            if tok in stop:
                self.last_finish_reason = "stop"
                # Feed the terminator too so the cache holds the complete turn for the next one.
                if self.n_past < self.n_ctx:
                    self._step(tok, want_hidden=False)
                yield TokenEvent(tok, decoder.decode(b"", final=True))
                return
            if self.n_past >= self.n_ctx:
                self.last_finish_reason = "context"
                return
            logits, hidden = self._step(tok, want_hidden=want_hidden)
            last = step == max_new_tokens - 1 or self.n_past >= self.n_ctx
            yield TokenEvent(tok, decoder.decode(self.text_bytes(tok), final=last), hidden)

    def _step(self, tok: int, *, want_hidden: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """One decode step through a batch allocated once (per-token allocation shows up on small models)."""
        with self._lock:
            self._set_embeddings(want_hidden)
            pos = len(self._history)
            if self._step_batch is None:
                self._step_batch = self._lib.llama_batch_init(1, 0, 1)
            b = self._step_batch
            b.n_tokens = 1
            b.token[0] = tok
            b.pos[0] = pos
            b.n_seq_id[0] = 1
            b.seq_id[0][0] = 0
            b.logits[0] = True
            rc = self._lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} at position {pos}.")
            self._history.append(tok)
            self._context_ids.append(tok)
            return self._row(0, False), (self._row(0, True) if want_hidden else None)

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Change the decode (and prefill) thread counts for the following calls (llama_set_n_threads): live mode
        decodes on every core until the TTS starts, then on its share."""
        if n_threads < 1 or (n_threads_batch is not None and n_threads_batch < 1):
            raise InvalidInputError(f"thread counts must be >= 1; got {n_threads}, {n_threads_batch}.")
        with self._lock:
            self.n_threads = n_threads
            self.n_threads_batch = n_threads_batch or self.n_threads_batch
            self._lib.llama_set_n_threads(self._ctx, self.n_threads, self.n_threads_batch)

    def close(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is None:
            return
        if getattr(self, "_step_batch", None) is not None:
            lib.llama_batch_free(self._step_batch)
            self._step_batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None
        if getattr(self, "_token_rows", None) is not None:
            self._token_rows.close()
            self._token_rows = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass
