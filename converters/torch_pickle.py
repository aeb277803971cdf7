"""Read a `torch.save` state dict (zip + pickle, e.g. the checkpoint's `assets/Vocos.pt`) without torch.

Why a restricted unpickler: pickle runs whatever callables the file names, so a downloaded `.pt` file could run
code on load. This reader resolves only the few globals a tensor state dict needs (`_rebuild_tensor_v2`,
`_rebuild_parameter`, the typed storage classes and `collections.OrderedDict`) to harmless numpy builders, and
raises `UnsafePickleError` for any other global, so nothing else in the file can run.

Layout of the zip (torch's `_save` since 1.6): `<root>/data.pkl` (the pickled object; tensors refer to storages
by persistent id `("storage", <StorageClass>, key, location, numel)`), `<root>/data/<key>` (raw little-endian
bytes of each storage) and `<root>/byteorder`. BF16 storages are widened to float32 exactly (bit shift).

`save_state_dict` writes the same layout without torch (models/synth.py's synthetic `assets/Vocos.pt`): the
pickle opcodes of a dict of `_rebuild_tensor_v2` calls are emitted directly, since pickling a reference to
`torch._utils` would need torch importable.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import bf16_bits_to_f32
from edge.errors import CorruptModelFileError, UnsafePickleError

# torch storage class name -> (numpy dtype of the stored bytes, is bf16)
_STORAGES = {
    "FloatStorage": (np.float32, False), "DoubleStorage": (np.float64, False), "HalfStorage": (np.float16, False),
    "BFloat16Storage": (np.uint16, True), "LongStorage": (np.int64, False), "IntStorage": (np.int32, False),
    "ShortStorage": (np.int16, False), "CharStorage": (np.int8, False), "ByteStorage": (np.uint8, False),
    "BoolStorage": (np.bool_, False),
}


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGES[self.name][0])

    @property
    def bf16(self) -> bool:
        return _STORAGES[self.name][1]


@dataclass(frozen=True)
class _Storage:
    data: np.ndarray  # flat, in the stored dtype
    bf16: bool


def _rebuild_tensor_v2(storage: _Storage, offset: int, size, stride, requires_grad=False, hooks=None,
                       metadata=None) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("a tensor in the pickle is not backed by a storage of the file.")
    flat = storage.data
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset
        if offset < 0 or last >= flat.size or min(stride) < 0:
            raise CorruptModelFileError(f"a tensor of shape {size} runs past its storage of {flat.size} elements.")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=tuple(s * flat.itemsize for s in stride)) if size else flat[offset]
    out = np.array(view)  # a copy: the storage buffer is read-only and shared
    return bf16_bits_to_f32(out) if storage.bf16 else out


def _rebuild_parameter(data, requires_grad=False, hooks=None) -> np.ndarray:
    return data


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, root: str, source: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._root, self._source = zf, root, source

    def find_class(self, module: str, name: str):
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise UnsafePickleError(f"{self._source} asks the unpickler for {module}.{name}, which a tensor state dict "
                                "never needs; refusing to load it. Use the checkpoint's original file.")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self._source} has a persistent id {pid!r:.80} that is not a tensor storage.")
        _, stype, key, _location, numel = pid
        raw = self._zf.read(f"{self._root}/data/{key}")
        data = np.frombuffer(raw, dtype=stype.dtype)
        if data.size < int(numel):
            raise CorruptModelFileError(f"{self._source}: storage {key} has {data.size} elements, expected {numel}.")
        return _Storage(data, stype.bf16)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a torch-saved state dict as numpy arrays (float32 for bf16/f32 tensors)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CorruptModelFileError(f"{path} is not a torch zip archive ({e}); download the checkpoint again.",
                                    str(path)) from e
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CorruptModelFileError(f"{path} has no single <root>/data.pkl; it is not a torch.save file.",
                                        str(path))
        root = pkl[0].split("/")[0]
        order = f"{root}/byteorder"
        if order in zf.namelist() and zf.read(order).strip() != b"little":
            raise CorruptModelFileError(f"{path} was saved big-endian; only little-endian files are supported.")
        obj = _Unpickler(zf.read(pkl[0]), zf, root, str(path)).load()
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise CorruptModelFileError(f"{path} does not hold a flat state dict of tensors.", str(path))
    return dict(obj)


# --- writer ---------------------------------------------------------------------------------------------------------
ZIP_ALIGN = 64  # torch aligns each storage record to 64 bytes (`.storage_alignment`)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the file is byte-deterministic
TORCH_FILE_VERSION = b"3\n"  # `version` record torch.save writes
_NP_STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
               np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage"}


def _unicode(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _int(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


def _tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def _global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _state_dict_pickle(entries: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    """Protocol-2 pickle of {name: _rebuild_tensor_v2(storage key i, 0, shape, contiguous stride, False, {})}."""
    out = [pickle.PROTO + b"\x02", pickle.EMPTY_DICT, pickle.MARK]
    for key, (name, storage, shape) in enumerate(entries):
        stride = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        pid = _tuple([_unicode("storage"), _global("torch", storage), _unicode(str(key)), _unicode("cpu"),
                      _int(int(np.prod(shape)))]) + pickle.BINPERSID
        args = _tuple([pid, _int(0), _tuple([_int(n) for n in shape]), _tuple([_int(n) for n in stride]),
                       pickle.NEWFALSE, _global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE])
        out += [_unicode(name), _global("torch._utils", "_rebuild_tensor_v2"), args, pickle.REDUCE]
    out += [pickle.SETITEMS, pickle.STOP]
    return b"".join(out)


def save_state_dict(path: str | Path, tensors: dict[str, np.ndarray], *, bf16: bool = False) -> None:
    """Write `tensors` as a torch.save file that `torch.load(weights_only=True)` and `load_state_dict` read.

    With bf16=True every array holds BF16 bits (uint16) and becomes a BFloat16 tensor; the zip root folder is the
    file stem, as torch.save names it."""
    path = Path(path)
    root = path.stem
    entries, blobs = [], []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if bf16:
            if a.dtype != np.uint16:
                raise ValueError(f"{name}: bf16=True needs BF16 bits as uint16, got {a.dtype}")
            storage = "BFloat16Storage"
        elif a.dtype in _NP_STORAGE:
            storage = _NP_STORAGE[a.dtype]
        else:
            raise ValueError(f"{name}: dtype {a.dtype} has no torch storage here")
        entries.append((name, storage, tuple(int(n) for n in a.shape)))
        blobs.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        def put(name: str, data: bytes, align: bool = False) -> None:
            info = zipfile.ZipInfo(f"{root}/{name}", date_time=ZIP_DATE)
            if align:  # pad the local header's extra field so the data starts on a ZIP_ALIGN boundary
                start = zf.fp.tell() + 30 + len(info.filename.encode())
                info.extra = b"\0" * ((-(start + 4) % ZIP_ALIGN) + 4) if start % ZIP_ALIGN else b""
                if info.extra:
                    info.extra = struct.pack("<HH", 0xFFFF, len(info.extra) - 4) + info.extra[4:]
            zf.writestr(info, data)

        put("data.pkl", _state_dict_pickle(entries))
        put(".format_version", b"1")
        put(".storage_alignment", str(ZIP_ALIGN).encode())
        put("byteorder", b"little")
        for key, blob in enumerate(blobs):
            put(f"data/{key}", blob, align=True)
        put("version", TORCH_FILE_VERSION)
