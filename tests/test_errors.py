"""Bad model files and oversized prompts give clear errors that name the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from converters.checkpoint import Checkpoint
from edge import keys
from edge.bundle import Bundle
from edge.errors import (
    BundleVersionError,
    ContextLengthExceededError,
    CorruptModelFileError,
    MissingTensorsError,
    ModelFilesNotFoundError,
)
from edge.llm import LLM, LLMOptions


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelFilesNotFoundError, match="not found"):
        LLM(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "llm.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(CorruptModelFileError, match="not a GGUF"):
        LLM(p)


def test_truncated_gguf(golden_gguf, tmp_path):
    src = golden_gguf("f32")
    data = src.read_bytes()
    p = tmp_path / "llm.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelFileError, match="truncated"):
        LLM(p)


def test_bundle_from_another_schema_version(tmp_path):
    (tmp_path / keys.BUNDLE_MANIFEST).write_text(json.dumps({"schema_version": 999, "arch": keys.BUNDLE_ARCH}))
    with pytest.raises(BundleVersionError, match="schema version 999"):
        Bundle.load(tmp_path)


def test_not_a_bundle(tmp_path):
    with pytest.raises(ModelFilesNotFoundError, match="not a MiniCPM-o Edge bundle"):
        Bundle.load(tmp_path)


def test_checkpoint_with_missing_tensors_names_them(golden_dir, tmp_path):
    """Drop two tensors from a copy of the golden checkpoint: the converter names both."""
    from converters import llm_gguf
    from converters.checkpoint import read_safetensors_header

    ck = tmp_path / "ckpt"
    shutil.copytree(golden_dir / "ckpt", ck)
    header = read_safetensors_header(ck / "model.safetensors")
    drop = ["llm.model.layers.1.mlp.up_proj.weight", "llm.lm_head.weight"]
    _rewrite_without(ck / "model.safetensors", header, drop)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    for name in drop:
        index["weight_map"].pop(name)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingTensorsError) as e:
        llm_gguf.export(Checkpoint.open(ck), tmp_path / "out", quant="f32", progress=False)
    for name in drop:
        assert name in str(e.value)


def test_truncated_safetensors(golden_dir, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(golden_dir / "ckpt", ck)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CorruptModelFileError, match="truncated"):
        Checkpoint.open(ck)


def test_prompt_longer_than_context(golden_gguf):
    llm = LLM(golden_gguf("f32"), LLMOptions.exact(n_ctx=256))
    with pytest.raises(ContextLengthExceededError, match="300 tokens but the context holds 256"):
        llm.prefill([list(range(300))])
    last, _ = llm.prefill([list(range(250))])  # fits; generation then stops at the context end, not a crash
    from edge.sampling import SamplingOptions
    out = list(llm.generate(last, SamplingOptions.greedy_decoding(), max_new_tokens=50))
    assert len(out) == 256 - 250 and llm.last_finish_reason == "context"
    llm.close()


def _rewrite_without(path, header, drop):
    """Rewrite a safetensors file without some tensors (test helper; the format is header-length + JSON + data)."""
    import struct

    keep = [h for n, h in header.items() if n not in drop]
    raw = path.read_bytes()
    meta, blobs, off = {}, [], 0
    for h in keep:
        blob = raw[h.offset:h.offset + h.nbytes]
        meta[h.name] = {"dtype": h.dtype, "shape": list(h.shape), "data_offsets": [off, off + len(blob)]}
        blobs.append(blob)
        off += len(blob)
    js = json.dumps(meta).encode()
    js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + b"".join(blobs))
