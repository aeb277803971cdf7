"""The quantised bundle (q8_0 LLM, int8 ONNX parts) against the official outputs: cosine per array and
last-position top-1 agreement, printed as a table (issue 8). Bounds are loose on purpose: quantisation moves
values; these catch a broken quantised graph, not rounding."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.helpers import cosine, golden_messages

MIN_COSINE = 0.99
ROWS: list[tuple[str, float, str]] = []


@pytest.fixture(scope="module")
def q_omni(golden_bundle, golden_gguf, tmp_path_factory):
    """The golden bundle's int8 ONNX parts with a q8_0 LLM (the converter's q8_0 GGUF; no second conversion)."""
    from edge.bundle import Bundle
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from tests.helpers import bundle_with_llm

    root = bundle_with_llm(golden_bundle.root, golden_gguf("q8_0"), "q8_0", tmp_path_factory.mktemp("q") / "bundle")
    yield Omni.load(Bundle.load(root), OmniOptions(llm=LLMOptions(n_ctx=1024), vision_variant="int8",
                                                   audio_variant="int8", tts_variant="int8"))
    print("\nquantised bundle vs golden (q8_0 LLM, int8 ONNX):")
    for name, cos, extra in ROWS:
        print(f"  {name:34s} cosine {cos:.5f} {extra}")


@pytest.mark.parametrize("k", [0, 1, 2])
def test_vision_embeds(q_omni, golden_dir, golden_ref, k):
    img = Image.open(golden_dir / "inputs" / f"img{k}.png").convert("RGB")
    got = q_omni.encode_image(img)
    c = cosine(got, golden_ref[f"img{k}_vision_embeds"])
    ROWS.append((f"img{k}_vision_embeds", c, ""))
    assert c >= MIN_COSINE


@pytest.mark.parametrize("k", [0, 1])
def test_audio_embeds(q_omni, golden_dir, golden_ref, k):
    import soundfile as sf

    wav, sr = sf.read(golden_dir / "inputs" / f"wav{k}.wav", dtype="float32")
    got = q_omni.encode_audio(wav, sr)
    c = cosine(got, golden_ref[f"wav{k}_audio_embeds_chunked"])
    ROWS.append((f"wav{k}_audio_embeds_chunked", c, ""))
    assert c >= MIN_COSINE


@pytest.mark.parametrize("name", ["text", "image", "audio"])
def test_chat_logits(q_omni, golden_dir, golden_ref, name):
    got = q_omni.prefill_logits(golden_messages(golden_dir, name), all_positions=True)
    ref = golden_ref[f"chat_{name}_logits"]
    c = cosine(got, ref)
    top1 = int(np.argmax(got[-1])) == int(np.argmax(ref[-1]))
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    ROWS.append((f"chat_{name}_logits", c, f"last top-1 {'same' if top1 else 'DIFFERS'}, all-position top-1 "
                                           f"agreement {agree:.3f}"))
    assert c >= MIN_COSINE
