"""converters/torch_pickle.py: the torch-free reader of `torch.save` state dicts (the checkpoint's Vocos.pt)."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

from converters.torch_pickle import load_state_dict
from edge.errors import CorruptModelFileError, UnsafePickleError


def _zip(path, pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_vocos_equals_torch_load(golden_dir):
    torch = pytest.importorskip("torch")
    path = golden_dir / "ckpt" / "assets" / "Vocos.pt"
    ours = load_state_dict(path)
    ref = torch.load(path, weights_only=True, map_location="cpu")
    assert set(ours) == set(ref) and len(ours) == 83
    for k, v in ref.items():
        assert ours[k].dtype == np.float32 and ours[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(ours[k], v.float().numpy(), err_msg=k)


def test_strided_and_offset_tensors_match_torch(tmp_path):
    """Views into a shared storage (offset, transposed strides) and several dtypes, as torch.save writes them."""
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"t": base.t(), "row": base[2], "bf": base.to(torch.bfloat16)[1:, ::2], "i": torch.arange(5)}
    path = tmp_path / "sd.pt"
    torch.save(sd, path)
    ours = load_state_dict(path)
    for k, v in sd.items():
        np.testing.assert_array_equal(ours[k], v.float().numpy() if v.is_floating_point() else v.numpy(), err_msg=k)


def test_code_in_the_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    _zip(path, pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UnsafePickleError, match="posix.system|os.system"):
        load_state_dict(path)
    assert not marker.exists()


def test_foreign_persistent_id_is_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "os") if obj == "x" else None

    import io

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": "x"})
    path = tmp_path / "pid.pt"
    _zip(path, buf.getvalue())
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_state_dict(path)


def test_not_a_zip(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a zip")
    with pytest.raises(CorruptModelFileError, match="torch zip"):
        load_state_dict(path)
