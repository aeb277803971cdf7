"""Rows of a GGUF's token-embedding table (`token_embd.weight`), dequantized as llama.cpp's get_rows does.

Why: a live unit is `<|audio_start|>` + 25 audio rows + `<|audio_end|>` (a camera unit adds `<unit><image>` ... `</image>`).
llama.cpp takes a batch of token ids or a batch of embeddings, never both, so such a unit costs one llama_decode
per run, and on a CPU every call reads all weights once: a 1-token call costs about a decode step (0.27 s for the
7B Q4_K_M on 2 cores). Feeding the few text tokens as their embedding rows puts the unit in one call.

The header is read here (a few KB) rather than with `gguf.GGUFReader`, which also materialises the 151k-entry
vocabulary arrays (5 s for the 7B file); only the row dequantizer of gguf-py is used. Layout: the GGUF spec
(ggml docs/gguf.md): magic, version, tensor count, key/value count, key/values, tensor infos, aligned data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"
TOKEN_TABLE = "token_embd.weight"
DEFAULT_ALIGNMENT = 32  # GGUF spec default when general.alignment is absent
ALIGNMENT_KEY = "general.alignment"
# GGUF value types (gguf.GGUFValueType): byte sizes of the fixed-size ones; 8 = string, 9 = array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise GGUFFormatError(f"{self.path} ends inside its GGUF header (truncated download? fetch it again)") \
                from e
        self.pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype in _FIXED_SIZES:
            self.pos += _FIXED_SIZES[vtype]
        elif vtype == _STRING:
            n = self.take("Q")  # not `self.pos += self.take(...)`: that adds to the position from before the read
            self.pos += n
        elif vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if itype in _FIXED_SIZES:
                self.pos += _FIXED_SIZES[itype] * count
            else:
                for _ in range(count):
                    self.skip_value(itype)
        else:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")


class TokenRows:
    """`rows(ids)` -> (len(ids), n_embd) float32, read from the mapped file."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._map, self.path)
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file")
        cur.pos = 4
        _version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = cur.string(), cur.take("I")
            if key == ALIGNMENT_KEY and vtype == 4:
                alignment = cur.take("I")
            else:
                cur.skip_value(vtype)
        info = None
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            qtype, offset = cur.take("I"), cur.take("Q")
            if name == TOKEN_TABLE:
                info = (dims, qtype, offset)
        if info is None:
            raise GGUFFormatError(f"{self.path} has no {TOKEN_TABLE} tensor")
        data_start = -(-cur.pos // alignment) * alignment
        dims, qtype, offset = info
        self.n_embd, self.n_vocab = int(dims[0]), int(dims[1])
        self.qtype = gguf.GGMLQuantizationType(qtype)
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        row_bytes = self.n_embd // block * type_size
        if data_start + offset + row_bytes * self.n_vocab > len(self._map):
            raise GGUFFormatError(f"{self.path} is shorter than its token table says (truncated? fetch it again)")
        self._table = np.frombuffer(self._map, np.uint8, row_bytes * self.n_vocab,
                                    data_start + offset).reshape(self.n_vocab, row_bytes)
        self._dequantize = gguf.quants.dequantize

    def rows(self, ids) -> np.ndarray:
        """Dequantized on each call (4000 Q4_K rows take ~0.15 s, a prefill of them minutes): no cache to grow."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, self.n_embd), np.float32)
        if idx.min() < 0 or idx.max() >= self.n_vocab:
            raise ValueError(f"token id out of range 0..{self.n_vocab - 1}: {idx[(idx < 0) | (idx >= self.n_vocab)]}")
        out = self._dequantize(self._table[idx], self.qtype)
        return np.ascontiguousarray(out, dtype=np.float32).reshape(idx.size, self.n_embd)

    def close(self) -> None:
        self._table = None
        self._map.close()
