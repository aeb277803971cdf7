"""Streaming sessions: the official prompt rules (pure), the tokens a session feeds the LLM, KV/Whisper cache reuse
(logits after N streamed units == one-go prefill, llama.cpp and transformers), no re-encoding."""

from __future__ import annotations

import numpy as np
import pytest

from edge import streaming as st
from edge import streaming_rules as rules
from edge.constants import AUDIO_SAMPLE_RATE, UNIT_SAMPLES
from edge.events import Finished, TextDelta
from edge.sampling import official_sampling
from tests.helpers import rel_err

# The official strings, spelled out here independently of edge/streaming.py (modeling_minicpmo.py
# streaming_prefill / streaming_generate).
GEN = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
USER = "<|im_start|>user\n"
AFTER_DONE = "<|im_end|>\n<|im_start|>user\n"
AFTER_CUT = "<|tts_eos|><|im_end|>\n<|im_start|>user\n"


# --- pure rules ---------------------------------------------------------------------------------------------------
def test_rules_new_session_turns_completed_and_interrupted():
    events = [
        ("prefill", "s1", "user", "SYS"),        # first message: TTS chat template, no generation prompt
        ("prefill", "s1", "user", "U1"),         # new user turn
        ("prefill", "s1", "user", "U2"),         # same turn: content only
        ("generate", "R1", False),               # interrupted (barge-in)
        ("prefill", "s1", "user", "U3"),
        ("generate", "R2", True),                # completed (terminator sampled)
        ("prefill", "s1", "user", "U4"),
        ("prefill", "s1", "user", "U5"),
        ("generate", "R3", True),
    ]
    want = ("<|im_start|>user\nSYS<|im_end|>\n" + USER + "U1U2" + GEN + "R1" + AFTER_CUT + "U3" + GEN + "R2"
            + AFTER_DONE + "U4U5" + GEN + "R3")
    assert rules.expected_prompt_text(events) == want


def test_rules_new_session_id_resets_and_system_message():
    s, plan = rules.plan_prefill(rules.RuleState(), "a", "system")
    assert plan.new_session and plan.prefix == "<|im_start|>system\n" and plan.suffix == "<|im_end|>\n"
    assert plan.reset_audio_after and s.new_user_msg
    s, _ = rules.plan_generate(s)
    s = rules.finish_generate(s, True)
    # an assistant message mid-session: content only, resets the Whisper cache, next user turn re-opens
    s, plan = rules.plan_prefill(s, "a", "assistant")
    assert (plan.prefix, plan.suffix, plan.reset_audio_before, plan.new_session) == ("", "", True, False)
    s, plan = rules.plan_prefill(s, "a", "user")
    assert plan.prefix == AFTER_DONE  # llm_generated / completed survive the assistant message, as officially
    # another session id starts over
    s2, plan = rules.plan_prefill(s, "b", "user")
    assert plan.new_session and s2 == rules.RuleState(session_id="b")


def test_rules_errors():
    with pytest.raises(ValueError, match="streaming_prefill"):
        rules.plan_generate(rules.RuleState())
    with pytest.raises(ValueError, match="role"):
        rules.plan_prefill(rules.RuleState(), "a", "tool")


# --- a session on the golden bundle -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omni(golden_bundle):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions

    # one llama.cpp thread: on a busy 2-core box a spinning multi-thread pool slows prefill 10-100x
    o = Omni.load(golden_bundle, OmniOptions(llm=LLMOptions.exact(n_ctx=2048, n_threads=1)))
    yield o
    o.close()


@pytest.fixture(scope="module")
def frames(golden_dir):
    from PIL import Image

    return [Image.open(golden_dir / "inputs" / f"img{k}.png").convert("RGB") for k in (0, 1)]


def _waves(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(UNIT_SAMPLES) / AUDIO_SAMPLE_RATE
    return [(0.3 * np.sin(2 * np.pi * (200 + 90 * k) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
            for k in range(n)]


def _expected_ids(omni, parts) -> list[int]:
    """Token ids of a list of (text, trusted) parts, tokenized the way the official processor does: template text
    with special tokens, adjacent plain text merged. Written independently of edge.prompt."""
    import re

    names = sorted(omni.special, key=len, reverse=True)
    split = re.compile("(" + "|".join(re.escape(n) for n in names) + ")")
    ids, plain = [], []
    for text, trusted in parts:
        chunks = split.split(text) if trusted else [text]
        for c in chunks:
            if trusted and c in omni.special:
                if plain:
                    ids += omni.llm.tokenize("".join(plain))
                    plain = []
                ids.append(omni.special[c])
            elif c:
                plain.append(c)
    if plain:
        ids += omni.llm.tokenize("".join(plain))
    return ids


def _cache_ids(omni) -> list[int]:
    """What the LLM's KV cache holds: token ids, with embedding rows shown as `<unk>` (their placeholder)."""
    unk = omni.special["<unk>"]
    return [unk if k is None else k for k in omni.llm.cached_tokens()]


def _reply(sess, sampling, *, max_new_tokens: int = 512, stop_after: int | None = None):
    """Run one reply through the session's events; cancel after `stop_after` text deltas."""
    import threading

    cancel = threading.Event()
    done, n = None, 0
    for ev in sess.reply(sampling, max_new_tokens=max_new_tokens, cancel=cancel):
        if isinstance(ev, TextDelta):
            n += 1
            if stop_after is not None and n >= stop_after:
                cancel.set()
        elif isinstance(ev, Finished):
            done = ev
    return list(done.tokens), done


def test_session_tokens_follow_official_rules(omni, frames):
    """Scripted session: voice prompt, units with frames, an interrupted reply, a completed reply, a reply cut
    by max_new_tokens. The KV cache must hold exactly the rule-built sequence."""
    from edge.audio_encoder import audio_placeholder

    sess = st.StreamingSession(omni)
    ref_audio = np.concatenate(_waves(2, seed=3))[:24000]
    units = _waves(4)
    img_ph = omni.preprocess_image(frames[0], 1, use_image_id=False).placeholder
    a_ph = audio_placeholder(UNIT_SAMPLES)
    unit_marker = rules.UNIT_MARKER if rules.UNIT_MARKER in omni.special else None
    want: list[tuple[str, bool]] = []

    def unit(k, frame=True):
        content = ["<unit>", frames[0], units[k]] if frame else [units[k]]
        sess.streaming_prefill("s", [{"role": "user", "content": content}])
        # "<unit>" is not a token of the golden vocab: official tokenizer spells it in plain tokens
        return ([("<unit>", unit_marker is not None), (img_ph, True)] if frame else []) + [(a_ph, True)]

    sess.streaming_prefill("s", [{"role": "user", "content": ["Talk to me, <|im_end|> friend. ", ref_audio]}])
    want += [("<|im_start|>user\n", True), ("Talk to me, <|im_end|> friend. ", False),
             (audio_placeholder(ref_audio.size), True), ("<|im_end|>\n", True)]
    assert sess.rules.new_user_msg and sess.audio_stream.cache_length == 0  # reset after the first prefill
    want += [(USER, True)] + unit(0) + unit(1)
    assert sess.audio_stream.cache_length == 2 * 50  # 2 units x 50 encoder positions, cached

    # reply 1: interrupted after 4 tokens
    toks1, done = _reply(sess, official_sampling(True, seed=1), stop_after=4)
    assert sess.audio_stream.cache_length == 0  # generation resets the Whisper cache
    assert done.finish_reason == "interrupted" and len(toks1) == 4
    want += [(GEN, True)]
    gen1 = len(_expected_ids(omni, want))
    want += [(AFTER_CUT, True)] + unit(2, frame=False)

    # reply 2 "completed": random weights never sample a terminator, so a probe run names the 3rd token this
    # context samples with seed 7, and that token is declared a terminator (same code path as <|im_end|>)
    snap, rules0 = sess.session.snapshot(), sess.rules
    third = _reply(sess, official_sampling(True, seed=7), max_new_tokens=3)[0][-1]
    sess.session.restore(snap)
    sess.rules = rules0
    sess.terminator_ids = sess.terminator_ids + [third]
    toks2, done = _reply(sess, official_sampling(True, seed=7), max_new_tokens=20)
    assert done.completed and done.finish_reason == "stop" and len(toks2) == 2 and third not in toks2
    want += [(GEN, True)]
    gen2 = len(_expected_ids(omni, want))
    want += [(AFTER_DONE, True)]
    want += unit(3)

    # reply 3: cut by max_new_tokens -> treated as interrupted next turn
    toks3, done = _reply(sess, official_sampling(True, seed=2), max_new_tokens=5)
    assert done.finish_reason == "length" and len(toks3) == 5
    want += [(GEN, True)]
    gen3 = len(_expected_ids(omni, want))
    sess.streaming_prefill("s", [{"role": "user", "content": ["thanks"]}])
    want += [(AFTER_CUT, True), ("thanks", False)]

    ids = _expected_ids(omni, want)
    # the generated tokens sit where the replies were; splice them into the rule-built sequence (last first)
    for at, toks in ((gen3, toks3), (gen2, toks2), (gen1, toks1)):
        ids = ids[:at] + toks + ids[at:]
    assert _cache_ids(omni) == ids
    # nothing encoded twice: one image per frame unit, one Whisper step per audio unit, the voice prompt whole
    assert sess.encoder_calls == {"image": 3, "audio_step": 4, "audio_whole": 1}


def test_streamed_units_equal_one_go_prefill(omni, frames, qwen2_reference):
    """Logits after N streamed units == the same content prefilled in one go (llama.cpp after a reset, and
    transformers Qwen2 on the same input embeddings). Embeddings for the one-go run are computed independently
    (fresh Whisper stream, whole voice prompt with full attention); nothing is encoded twice by the session."""
    import torch

    from edge.audio_encoder import audio_placeholder

    sess = st.StreamingSession(omni)
    voice = np.concatenate(_waves(2, seed=5))[:20000]
    units = _waves(3, seed=9)
    sess.streaming_prefill("r", [{"role": "user", "content": ["Be kind.", voice]}])
    for k in range(3):
        sess.streaming_prefill("r", [{"role": "user", "content": ["<unit>", frames[k % 2], units[k]]}])
    streamed = sess.last_logits.copy()
    assert sess.encoder_calls == {"image": 3, "audio_step": 3, "audio_whole": 1}

    # one go: the same sequence built independently
    unk = omni.special["<unk>"]
    segs: list = []
    head = _expected_ids(omni, [("<|im_start|>user\n", True), ("Be kind.", False)])
    segs.append(head)
    segs.append(omni.audio.encode_audio(voice, chunked=False))
    tail_ph = _expected_ids(omni, [(audio_placeholder(voice.size), True)])
    assert tail_ph.count(unk) == segs[-1].shape[0]
    stream = omni.audio.stream()
    body = []
    for k in range(3):
        pre = omni.preprocess_image(frames[k % 2], 1, use_image_id=False)
        body.append(([("<unit>", False), (pre.placeholder, True), (audio_placeholder(UNIT_SAMPLES), True)],
                     [omni.vision(pre).reshape(-1, omni.llm.n_embd), stream.step_audio(units[k])]))

    def pour(ids, embeds):
        out, i, e = [], 0, list(embeds)
        while i < len(ids):
            if ids[i] == unk:
                j = i
                while j < len(ids) and ids[j] == unk:
                    j += 1
                x = e[0][: j - i]
                e[0] = e[0][j - i:]
                if e[0].shape[0] == 0:
                    e.pop(0)
                out.append(x)
                i = j
            else:
                j = i
                while j < len(ids) and ids[j] != unk:
                    j += 1
                out.append(ids[i:j])
                i = j
        return out

    segs = [head] + pour(tail_ph + _expected_ids(omni, [("<|im_end|>\n", True)]), [segs[1]])
    segs += pour(_expected_ids(omni, [(USER, True)]), [])
    for k, (parts, embeds) in enumerate(body):
        segs += pour(_expected_ids(omni, parts), embeds)
    omni.llm.reset()
    one_go, _ = omni.llm.prefill(segs)
    err_cpp = rel_err(streamed, one_go)
    assert err_cpp <= 1e-5, err_cpp

    x = omni.token_embeddings(segs)
    with torch.no_grad():
        hf = qwen2_reference(inputs_embeds=torch.from_numpy(x)[None]).logits[0, -1].numpy()
    err_hf = rel_err(streamed, hf)
    assert err_hf <= 1e-4, err_hf
    print(f"streamed vs one-go llama.cpp rel err {err_cpp:.2e}, vs transformers {err_hf:.2e}")


def test_streaming_generate_text_and_audio(omni):
    """streaming_generate yields text, and with speech 24 kHz chunks whose text adds up to the decoded reply;
    the flags after a reply cut by max_new_tokens give the interruption prefix next."""
    from edge.tts.generate import TTS, TTSOptions

    tts = TTS(omni.bundle, options=TTSOptions(max_codes=60))
    sess = st.StreamingSession(omni, tts=tts)
    sess.streaming_prefill("g", [{"role": "user", "content": ["Hello there."]}])
    sess.streaming_prefill("g", [{"role": "user", "content": [_waves(1)[0]]}])
    start = omni.llm.n_past
    chunks = list(sess.streaming_generate("g", max_new_tokens=12, seed=0))
    audio = [c.audio for c in chunks if c.audio is not None]
    assert audio and all(c.sampling_rate == 24000 for c in chunks if c.audio is not None)
    gen_ids = omni.llm.cached_tokens()[start:]
    n_prompt = len(_expected_ids(omni, [(GEN, True)]))
    text = "".join(c.text for c in chunks)
    assert text == omni.llm.detokenize(gen_ids[n_prompt:])
    assert len(gen_ids) - n_prompt == 12 and not sess.rules.llm_generate_completed
    with pytest.raises(ValueError, match="session"):
        next(sess.streaming_generate("other"))


def test_streaming_generate_speech_that_ends_early(omni, monkeypatch):
    """The TTS ends its speech after 3 frames: the text chunks still add up to the whole decoded reply."""
    from edge.tts.generate import TTS
    from tests.helpers import end_speech_after, never_stop

    never_stop(monkeypatch)
    tts = TTS(omni.bundle)
    sampled = end_speech_after(monkeypatch, tts, frames=3)
    sess = st.StreamingSession(omni, tts=tts)
    sess.streaming_prefill("e", [{"role": "user", "content": ["Hello there."]}])
    start = omni.llm.n_past
    chunks = list(sess.streaming_generate("e", max_new_tokens=40, seed=0))
    assert len(sampled) == 4
    gen_ids = omni.llm.cached_tokens()[start:]
    n_prompt = len(_expected_ids(omni, [(GEN, True)]))
    assert len(gen_ids) - n_prompt == 40
    assert "".join(c.text for c in chunks) == omni.llm.detokenize(gen_ids[n_prompt:])
    last_audio = max(i for i, c in enumerate(chunks) if c.audio is not None)
    assert any(c.text for c in chunks[last_audio + 1:])
