"""Conformance of the whole chat path with the official implementation (golden fixture, section (c)).

Everything goes through the runtime on the converted golden bundle: Omni.build_prompt (template, placeholders,
ids, bounds), the ONNX encoders, the embedding injection and llama.cpp's prefill (f32 GGUF, f32 KV cache).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import golden_messages, rel_err

CASES = ["text", "image", "audio"]
TOL = 1e-4  # golden README: float32 implementation, d <= 1e-4 * max|ref|


@pytest.mark.parametrize("name", CASES)
def test_prompt_ids_and_bounds_exact(golden_omni, golden_dir, golden_ref, name):
    p = golden_omni.build_prompt(golden_messages(golden_dir, name))
    assert p.text == str(golden_ref[f"chat_{name}_prompt"])
    assert p.ids == golden_ref[f"chat_{name}_input_ids"][0].tolist()
    for kind, key in (("image", "image_bound"), ("audio", "audio_bounds")):
        got = np.asarray(p.bounds(kind), dtype=np.int64).reshape(-1, 2)
        np.testing.assert_array_equal(got, golden_ref[f"chat_{name}_{key}"])
    np.testing.assert_array_equal(np.asarray(p.spk_bounds, dtype=np.int64).reshape(-1, 2),
                                  golden_ref[f"chat_{name}_spk_bounds"])


def test_image_tgt_sizes(golden_omni, golden_dir, golden_ref):
    p = golden_omni.build_prompt(golden_messages(golden_dir, "image"))
    np.testing.assert_array_equal(p.media[0].payload.tgt_sizes, golden_ref["chat_image_tgt_sizes"])


@pytest.mark.parametrize("name", CASES)
def test_inputs_embeds(golden_omni, golden_dir, golden_ref, name):
    got = golden_omni.inputs_embeds(golden_messages(golden_dir, name))
    err = rel_err(got, golden_ref[f"chat_{name}_inputs_embeds"])
    print(f"chat_{name}_inputs_embeds rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("name", CASES)
def test_prefill_logits(golden_omni, golden_dir, golden_ref, name):
    got = golden_omni.prefill_logits(golden_messages(golden_dir, name), all_positions=True)
    ref = golden_ref[f"chat_{name}_logits"]
    err = rel_err(got, ref)
    print(f"chat_{name}_logits rel err {err:.2e}")
    assert err <= TOL
    assert rel_err(got[-1], golden_ref[f"chat_{name}_last_logits"]) <= TOL
    assert int(np.argmax(got[-1])) == int(np.argmax(golden_ref[f"chat_{name}_last_logits"]))
