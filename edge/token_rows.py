"""Rows of a GGUF's token-embedding table (`token_embd.weight`), dequantized as llama.cpp's get_rows does.

Why: a live unit is `<|audio_start|>` + 25 audio rows + `<|audio_end|>` (a camera unit adds `<unit><image>` ...
`</image>`).
llama.cpp takes a batch of token ids or a batch of embeddings, never both, so such a unit costs one llama_decode
per run, and on a CPU every call reads all weights once: a 1-token call costs about a decode step (0.27 s for the
7B Q4_K_M on 2 cores). Feeding the few text tokens as their embedding rows puts the unit in one call.

The header is read here (a few KB) rather than with `gguf.GGUFReader`, which also materialises the 151k-entry
vocabulary arrays (5 s for the 7B file) and is a converter dependency, not a runtime one. Rows are dequantized by
llama.cpp's own ggml (`ggml_get_type_traits(type)->to_float`, the function its get_rows uses), from the library
that llama-cpp-python ships. Layout: the GGUF spec (ggml docs/gguf.md): magic, version, tensor count, key/value
count, key/values, tensor infos, aligned data.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import GGUFFormatError

__all__ = ["GGMLType", "GGUFFormatError", "GGUFHeader", "TokenRows", "read_header"]

GGUF_MAGIC = b"GGUF"
TOKEN_TABLE = "token_embd.weight"
DEFAULT_ALIGNMENT = 32  # GGUF spec default when general.alignment is absent
ALIGNMENT_KEY = "general.alignment"
# GGUF value types (gguf.GGUFValueType): byte sizes of the fixed-size ones; 8 = string, 9 = array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h of the llama.cpp that llama-cpp-python 0.3.36 vendors); `_ggml()` checks
    the layout against ggml's exported `ggml_type_size` / `ggml_blck_size` before trusting it."""

    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
GGML_TYPE_F32 = 0  # enum ggml_type


@functools.lru_cache(maxsize=1)
def _ggml():
    import llama_cpp
    from llama_cpp import _ctypes_extensions

    lib = _ctypes_extensions.load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    return lib


@dataclass(frozen=True)
class GGMLType:
    """A ggml tensor type as llama.cpp defines it: block size, bytes per block, and its dequantizer."""

    id: int
    name: str
    block: int
    type_size: int
    to_float: object  # a ctypes function (src, dst, n) or None for f32

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, type_id: int) -> "GGMLType":
        lib = _ggml()
        t = lib.ggml_get_type_traits(int(type_id)).contents
        if t.blck_size != lib.ggml_blck_size(type_id) or t.type_size != lib.ggml_type_size(type_id) or t.blck_size < 1:
            raise RuntimeError("this llama-cpp-python's ggml_type_traits layout is not the one edge.token_rows "
                               "knows; install the version pinned in pyproject.toml")
        return cls(int(type_id), (t.type_name or b"?").decode(), int(t.blck_size), int(t.type_size),
                   _TO_FLOAT(t.to_float) if t.to_float else None)

    def nbytes(self, n_elements: int) -> int:
        return n_elements // self.block * self.type_size

    def dequantize(self, data: np.ndarray, n_elements: int) -> np.ndarray:
        data = np.ascontiguousarray(data)
        if self.id == GGML_TYPE_F32:
            return data.view(np.float32).reshape(-1)[:n_elements].copy()
        out = np.empty(n_elements, np.float32)
        self.to_float(data.ctypes.data, out.ctypes.data, n_elements)
        return out


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    tensors: dict[str, TensorInfo]
    data_start: int

    def data_end(self) -> int:
        """Where the last tensor's data ends (a file shorter than this is truncated)."""
        return max((self.data_start + t.offset + GGMLType.of(t.type_id).nbytes(int(np.prod(t.dims)))
                    for t in self.tensors.values()), default=self.data_start)


def read_header(buf, path: Path) -> GGUFHeader:
    """Tensor infos and the data offset of a GGUF in `buf` (bytes or a mapping)."""
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFFormatError(f"{path} is not a GGUF file")
    cur = _Cursor(buf, path)
    cur.pos = 4
    _version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, vtype = cur.string(), cur.take("I")
        if key == ALIGNMENT_KEY and vtype == 4:
            alignment = cur.take("I")
        else:
            cur.skip_value(vtype)
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
        qtype, offset = cur.take("I"), cur.take("Q")
        tensors[name] = TensorInfo(name, dims, qtype, offset)
    return GGUFHeader(tensors, -(-cur.pos // alignment) * alignment)


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            msg = f"{self.path} ends inside its GGUF header (truncated download? fetch it again)"
            raise GGUFFormatError(msg) from e
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
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        header = read_header(self._map, self.path)
        info = header.tensors.get(TOKEN_TABLE)
        if info is None:
            raise GGUFFormatError(f"{self.path} has no {TOKEN_TABLE} tensor")
        self.n_embd, self.n_vocab = int(info.dims[0]), int(info.dims[1])
        self.type = GGMLType.of(info.type_id)
        self.qtype = info.type_id
        self._row_bytes = self.type.nbytes(self.n_embd)
        start = header.data_start + info.offset
        if start + self._row_bytes * self.n_vocab > len(self._map):
            raise GGUFFormatError(f"{self.path} is shorter than its token table says (truncated? fetch it again)")
        self._table = np.frombuffer(self._map, np.uint8, self._row_bytes * self.n_vocab,
                                    start).reshape(self.n_vocab, self._row_bytes)

    def rows(self, ids) -> np.ndarray:
        """Dequantized on each call (4000 Q4_K rows take ~0.15 s, a prefill of them minutes): no cache to grow."""
        idx = np.asarray(ids, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return np.zeros((0, self.n_embd), np.float32)
        if idx.min() < 0 or idx.max() >= self.n_vocab:
            raise ValueError(f"token id out of range 0..{self.n_vocab - 1}: {idx[(idx < 0) | (idx >= self.n_vocab)]}")
        out = self.type.dequantize(self._table[idx], idx.size * self.n_embd)
        return out.reshape(idx.size, self.n_embd)

    def close(self) -> None:
        self._table = None
        self._map.close()
