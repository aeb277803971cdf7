"""Omni's TTS introspection API against the official outputs (golden section (d)), on the converted bundle."""

from __future__ import annotations

import numpy as np

from tests.helpers import rel_err

TOL = 1e-4


def test_tts_text_preparation(golden_omni, golden_ref):
    prompt, ids, mask = golden_omni.tts_prepare_text(str(golden_ref["tts_text"]))
    assert prompt == str(golden_ref["tts_prompt"])
    np.testing.assert_array_equal(ids, golden_ref["tts_input_ids"])
    np.testing.assert_array_equal(mask, golden_ref["tts_streaming_mask"])


def test_tts_step_logits_and_greedy_codes(golden_omni, golden_ref):
    text, spk = str(golden_ref["tts_text"]), golden_ref["tts_spk_emb"]
    schedule = [tuple(int(v) for v in row) for row in golden_ref["tts_chunk_calls"]]
    logits = golden_omni.tts_step_logits(spk, text, golden_ref["tts_codes"], schedule)
    err = rel_err(logits, golden_ref["tts_step_logits"])
    print(f"tts_step_logits rel err {err:.2e}")
    assert err <= TOL
    np.testing.assert_array_equal(golden_omni.tts_greedy_codes(spk, text, schedule), golden_ref["tts_codes"])


def test_decode_codes(golden_omni, golden_ref):
    mel, wav = golden_omni.decode_codes(golden_ref["tts_codes"])
    assert rel_err(mel, golden_ref["tts_mel"]) <= TOL
    assert rel_err(wav, golden_ref["tts_wav"]) <= TOL
    mel, wav = golden_omni.decode_codes(golden_ref["dvae_fixed_codes"])
    assert rel_err(mel, golden_ref["dvae_fixed_mel"]) <= TOL
    assert rel_err(wav, golden_ref["vocos_fixed_wav"]) <= TOL
