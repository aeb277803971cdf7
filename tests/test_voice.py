"""Voice: official system prompts, voice cloning through chat(), streamed speech, reference-clip errors."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import InvalidInputError
from edge.voice import ASSISTANT_SUFFIX, CLONE_PREFIX, DEFAULT_VOICE_TEXT, sys_prompt

SR = 16000


def _clip(freq: float, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def test_official_prompt_shapes():
    ref = _clip(220)
    m = sys_prompt(ref, "audio_assistant")
    assert m["role"] == "user" and m["content"][0] == CLONE_PREFIX and m["content"][2] == ASSISTANT_SUFFIX
    assert sys_prompt(None, "audio_assistant")["content"] == [DEFAULT_VOICE_TEXT, ASSISTANT_SUFFIX]
    with pytest.raises(InvalidInputError, match="needs a reference clip"):
        sys_prompt(None, "voice_cloning")


def test_default_voice_token_is_a_special_token(golden_omni):
    """`<reserved_53>` in the system prompt is the voice token (trusted text), not characters."""
    p = golden_omni.build_prompt([golden_omni.get_sys_prompt(None), {"role": "user", "content": "hi"}],
                                 use_tts_template=True)
    assert golden_omni.special["<reserved_53>"] in p.ids
    user = golden_omni.build_prompt([{"role": "user", "content": "say <reserved_53>"}], use_tts_template=True)
    assert golden_omni.special["<reserved_53>"] not in user.ids


@pytest.mark.parametrize("bad,match", [
    (np.zeros(0, np.float32), "empty"),
    (_clip(200, 0.3), "at least"),
    (np.zeros(3 * SR, np.float32), "silent"),
])
def test_bad_reference_clips(golden_omni, bad, match):
    with pytest.raises(InvalidInputError, match=match):
        golden_omni.get_sys_prompt(bad)


def test_missing_reference_file(golden_omni, tmp_path):
    with pytest.raises(Exception, match="nope.wav"):
        golden_omni.get_sys_prompt(tmp_path / "nope.wav")


def _spk(omni, ref):
    msgs = [omni.get_sys_prompt(ref), {"role": "user", "content": "Say hello."}]
    r = omni.chat(msgs, sampling=False, max_new_tokens=2, generate_audio=True)
    return r.spk_embed, r


def test_cloning_changes_the_speaker_embedding(golden_omni, tmp_path):
    a, ra = _spk(golden_omni, _clip(180, seed=1))
    a2, _ = _spk(golden_omni, _clip(180, seed=1))
    b, _ = _spk(golden_omni, _clip(900, seed=2))
    d, _ = _spk(golden_omni, None)
    np.testing.assert_allclose(a, a2, rtol=1e-5, atol=1e-6)  # same clip, same voice
    diff_b = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    diff_d = float(np.linalg.norm(a - d) / np.linalg.norm(a))
    print(f"speaker embedding change: other clip {diff_b:.3f}, default voice {diff_d:.3f} (relative L2)")
    assert diff_b > 1e-3 and diff_d > 1e-3
    assert ra.audio is not None and ra.sampling_rate == 24000


def test_streamed_speech_equals_text_reply(golden_omni):
    msgs = [golden_omni.get_sys_prompt(None), {"role": "user", "content": "Tell me something."}]
    chunks = list(golden_omni.chat(msgs, stream=True, generate_audio=True, sampling=False, max_new_tokens=24))
    text = "".join(c.text for c in chunks)
    audio = [c.audio for c in chunks if c.audio is not None]
    ref = golden_omni.chat(msgs, sampling=False, max_new_tokens=24, use_tts_template=True)
    assert text == ref
    assert all(a.dtype == np.float32 and a.ndim == 1 for a in audio)


def test_speech_that_ends_early_keeps_the_whole_text(golden_omni, monkeypatch):
    """The TTS may end its speech (EOS) before the LLM ends its text: the streamed text is still the whole
    reply, and the text after the last audio chunk still arrives."""
    from tests.helpers import end_speech_after, never_stop

    never_stop(monkeypatch)
    msgs = [golden_omni.get_sys_prompt(None), {"role": "user", "content": "Tell me something."}]
    ref = golden_omni.chat(msgs, sampling=False, max_new_tokens=40, use_tts_template=True)
    sampled = end_speech_after(monkeypatch, golden_omni.tts, frames=3)
    chunks = list(golden_omni.chat(msgs, stream=True, generate_audio=True, sampling=False, max_new_tokens=40))
    assert len(sampled) == 4  # 3 frames, then EOS: the speech ended after the first text chunk
    assert "".join(c.text for c in chunks) == ref
    last_audio = max(i for i, c in enumerate(chunks) if c.audio is not None)
    assert any(c.text for c in chunks[last_audio + 1:])
