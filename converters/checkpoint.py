"""Read an `openbmb/MiniCPM-o-2_6`-layout checkpoint directory without torch.

Official and synthetic checkpoints take the same path: `config.json`, then the safetensors shards named by
`model.safetensors.index.json` (or a single `model.safetensors`). Tensors are memory-mapped and converted to
float32 on demand; BF16 -> F32 is exact (the bf16 bits are the high half of the f32 bits), so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import CorruptModelFileError, MissingTensorsError, ModelFilesNotFoundError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_, "F64": np.float64,
}


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact BF16 -> F32: place the 16 stored bits in the high half of a 32-bit float."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """F32 -> BF16 with round-to-nearest-even (what torch's `.to(torch.bfloat16)` does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    return ((u + rounding) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header; raise CorruptModelFileError if it is truncated or malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptModelFileError(f"{path} is too short to be a safetensors file ({size} bytes).", str(path))
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CorruptModelFileError(f"{path} has a corrupt safetensors header (length {n}).", str(path))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptModelFileError(f"{path} has an unreadable safetensors header: {e}", str(path)) from e
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if base + end > size:
            raise CorruptModelFileError(
                f"{path} is truncated: tensor {name} ends at byte {base + end} but the file has {size} bytes. "
                "Download the file again.", str(path))
        out[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path, base + begin, end - begin)
    return out


@dataclass
class Checkpoint:
    """A MiniCPM-o checkpoint directory: config plus lazily read tensors."""

    root: Path
    config: dict
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, root: str | Path) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise ModelFilesNotFoundError(f"checkpoint directory {root} does not exist.", str(root))
        cfg_path = root / CONFIG_FILE
        if not cfg_path.is_file():
            raise ModelFilesNotFoundError(
                f"{cfg_path} is missing: {root} is not a MiniCPM-o checkpoint directory.", str(cfg_path))
        config = json.loads(cfg_path.read_text())
        index = root / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (root / SINGLE_FILE).is_file():
            weight_map, files = {}, [SINGLE_FILE]
        else:
            raise ModelFilesNotFoundError(f"{root} has neither {INDEX_FILE} nor {SINGLE_FILE}.", str(root))
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            fpath = root / fname
            if not fpath.is_file():
                raise ModelFilesNotFoundError(
                    f"shard {fpath} named by {INDEX_FILE} is missing. Download the checkpoint again.", str(fpath))
            tensors.update(read_safetensors_header(fpath))
        missing_from_shards = [k for k in weight_map if k not in tensors]
        if missing_from_shards:
            raise MissingTensorsError(missing_from_shards, str(root))
        return cls(root, config, tensors)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.tensors if k.startswith(prefix))

    def has(self, name: str) -> bool:
        return name in self.tensors

    def require(self, names: list[str] | tuple[str, ...]) -> None:
        """Raise MissingTensorsError naming every tensor in `names` that the checkpoint lacks."""
        missing = [n for n in names if n not in self.tensors]
        if missing:
            raise MissingTensorsError(missing, str(self.root))

    def raw(self, name: str) -> np.ndarray:
        """The stored array (BF16 as uint16 bits), memory-mapped."""
        if name not in self.tensors:
            raise MissingTensorsError([name], str(self.root))
        info = self.tensors[name]
        dt = np.dtype(_DTYPES[info.dtype])
        count = int(np.prod(info.shape)) if info.shape else 1
        arr = np.memmap(info.file, dtype=dt, mode="r", offset=info.offset, shape=(count,))
        return arr.reshape(info.shape)

    def f32(self, name: str) -> np.ndarray:
        """The tensor as float32 (exact for BF16/F16/F32 sources)."""
        info = self.tensors.get(name)
        a = self.raw(name)
        if info is not None and info.dtype == "BF16":
            return bf16_bits_to_f32(np.asarray(a))
        return np.asarray(a, dtype=np.float32)

    def config_digest(self) -> str:
        """sha256 of config.json bytes: ties a bundle to the checkpoint it came from."""
        return hashlib.sha256((self.root / CONFIG_FILE).read_bytes()).hexdigest()
