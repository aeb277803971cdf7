"""TTS (ConditionalChatTTS + DVAE + Vocos): ONNX/numpy runtime vs the golden fixture, vs an independent torch
reference (transformers LlamaModel with the official streaming masks), streaming vs one-shot audio, int8 figures."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest

from edge import keys
from edge.bundle import Bundle
from edge.errors import InvalidInputError
from edge.tts import TTS, SamplingOptions, TTSOptions
from edge.tts.backbone import MASK_MIN, build_text_mask, step_mask
from edge.tts.decoder import overlap_add2
from edge.tts.sampling import CodeSampler, repetition_penalty, top_k_filter, top_p_filter
from edge.tts.text import NumberStyle, normalize_piece, prepare_tts_text, replace_numbers, sentence_end
from tests.helpers import cosine, rel_err

TOL = 1e-4  # golden README: float32 d <= 1e-4 * max|ref|
GREEDY = TTSOptions(sampling=SamplingOptions(greedy=True))


@pytest.fixture(scope="session")
def tts_bundle(golden_ckpt, tmp_path_factory):
    """Export once per session."""
    from converters.tts import export

    root = tmp_path_factory.mktemp("tts_bundle")
    part = export(golden_ckpt, root, int8=True, progress=False)
    b = Bundle(root, keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, source={}, dims={}, special_tokens={},
               parts={keys.PART_TTS: part})
    b.save()
    return Bundle.load(root)


@pytest.fixture(scope="session")
def tts(tts_bundle):
    return TTS(tts_bundle, variant="fp32", options=GREEDY)


@pytest.fixture(scope="session")
def tts8(tts_bundle):
    return TTS(tts_bundle, variant="int8", options=GREEDY)


def _teacher_forced(t: TTS, ref) -> np.ndarray:
    """Golden schedule (README (d)): zero KV of 302 positions; per chunk prefill [begin, end) then steps up to the
    chunk's code total, feeding the golden codes; returns (24, 4, 626) step logits."""
    ids, mask, codes = ref["tts_input_ids"], ref["tts_streaming_mask"], ref["tts_codes"]
    spk = t.speaker_embedding(ref["tts_spk_emb"])
    st, logits = t.new_state(), []
    for begin, end, total in ref["tts_chunk_calls"]:
        t.backbone.prefill_text(st.cache, ids[begin:end], int(begin), spk if begin == 0 else None)
        while len(st.codes) < total:
            emb = t.backbone.audio_bos_embed() if not st.codes else t.backbone.code_embeds(st.codes[-1])
            logits.append(t.backbone.step(st.cache, emb, mask))
            st.codes.append(codes[len(st.codes)])
    return np.stack(logits)


def _greedy_codes(t: TTS, ref) -> np.ndarray:
    ids, mask = ref["tts_input_ids"], ref["tts_streaming_mask"]
    spk = t.speaker_embedding(ref["tts_spk_emb"])
    st, sampler = t.new_state(), t.new_sampler()
    for begin, end, total in ref["tts_chunk_calls"]:
        t.backbone.prefill_text(st.cache, ids[begin:end], int(begin), spk if begin == 0 else None)
        t.generate(st, mask, int(total) - len(st.codes), sampler)
    return np.stack(st.codes)


# --- golden: text side --------------------------------------------------------------------------------------------
def test_prompt_ids_and_text_mask_exact(tts, golden_ref):
    prompt, n = prepare_tts_text(str(golden_ref["tts_text"]), tts.tokenizer)
    assert prompt == str(golden_ref["tts_prompt"])
    ids, n2 = tts.prompt_ids(str(golden_ref["tts_text"]))
    np.testing.assert_array_equal(ids, golden_ref["tts_input_ids"])
    assert n == n2 == 8
    np.testing.assert_array_equal(build_text_mask(n, tts.dims), golden_ref["tts_streaming_mask"])


def _official_step_mask_torch(past: int, n_new: int, text_mask: np.ndarray) -> np.ndarray:
    """Independent re-statement of `make_streaming_chunk_mask_generation` in torch (official defaults)."""
    import torch

    reserved, audio_chunk, text_chunk, n_spk = 300, 50, 10, 1
    m = torch.zeros(1, past + n_new)
    start = min(math.ceil((past - reserved) / audio_chunk) * text_chunk, reserved) + 1 + n_spk
    m[0, start: reserved + 1 + n_spk + 1] = torch.finfo(torch.float32).min
    m[0, : 1 + n_spk + reserved + 1].masked_fill_(torch.from_numpy(text_mask) == 0, torch.finfo(torch.float32).min)
    return m.expand(n_new, -1).numpy()


@pytest.mark.parametrize("past", [302, 303, 350, 351, 401, 2000, 4000])
def test_step_mask_matches_official_rule(tts, golden_ref, past):
    tm = golden_ref["tts_streaming_mask"]
    got = step_mask(past, 1, tm, tts.dims)[0, 0]
    np.testing.assert_array_equal(got, _official_step_mask_torch(past, 1, tm))
    assert got[0, 302] == MASK_MIN  # the [Ptts] quirk (spec §10): never visible, not even to the audio-bos step
    if past > 302:
        assert (got[0, 303:] == 0).all()  # every audio position, the current one included


# --- golden: backbone ---------------------------------------------------------------------------------------------
def test_step_logits_teacher_forced_golden(tts, golden_ref):
    got = _teacher_forced(tts, golden_ref)
    err = rel_err(got, golden_ref["tts_step_logits"])
    print(f"\ntts_step_logits fp32 rel err {err:.2e}")
    assert err <= TOL


def test_greedy_codes_exact(tts, golden_ref):
    np.testing.assert_array_equal(_greedy_codes(tts, golden_ref), golden_ref["tts_codes"])


# --- golden: DVAE + Vocos -----------------------------------------------------------------------------------------
def test_dvae_vocos_golden(tts, golden_ref):
    d = tts.decoder
    errs = {
        "tts_mel": rel_err(d.codes_to_mel(golden_ref["tts_codes"]), golden_ref["tts_mel"]),
        "tts_wav": rel_err(d.mel_to_wav(golden_ref["tts_mel"]), golden_ref["tts_wav"]),
        "dvae_fixed_mel": rel_err(d.codes_to_mel(golden_ref["dvae_fixed_codes"]), golden_ref["dvae_fixed_mel"]),
        "vocos_fixed_wav": rel_err(d.mel_to_wav(golden_ref["dvae_fixed_mel"]), golden_ref["vocos_fixed_wav"]),
    }
    print("\n" + ", ".join(f"{k} rel err {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL, errs


# --- independent torch reference: transformers LlamaModel ---------------------------------------------------------
def _hf_heads(ckpt):
    """The 4 code heads with torch's own weight-norm parametrisation (stored g = original0, v = original1)."""
    import torch

    c, heads = ckpt.config["tts_config"], []
    for q in range(c["num_vq"]):
        lin = torch.nn.utils.parametrizations.weight_norm(
            torch.nn.Linear(c["hidden_size"], c["num_audio_tokens"], bias=False))
        for j in (0, 1):
            name = f"tts.head_code.{q}.parametrizations.weight.original{j}"
            getattr(lin.parametrizations.weight, f"original{j}").data = torch.from_numpy(ckpt.f32(name).copy())
        heads.append(lin)
    return heads


def test_backbone_vs_transformers_llama(tts, golden_ckpt, golden_ref):
    """The official procedure on transformers' LlamaModel (same weights): prefill chunks with the cache cut at
    `begin` and a causal mask, steps with the 4-D streaming mask; compare logits and the cached keys/values."""
    import torch
    from transformers import LlamaConfig, LlamaModel
    from transformers.cache_utils import DynamicCache

    c = golden_ckpt.config["tts_config"]
    cfg = LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_attention_heads=c["num_attention_heads"], num_hidden_layers=c["num_hidden_layers"],
                      max_position_embeddings=c["max_position_embeddings"], attn_implementation="sdpa")
    model = LlamaModel(cfg).eval()
    sd = {k[len("tts.model."):]: torch.from_numpy(golden_ckpt.f32(k).copy()) for k in golden_ckpt.names("tts.model.")}
    model.load_state_dict(sd, strict=True)
    heads = _hf_heads(golden_ckpt)
    nl, nh, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    full = [(torch.zeros(1, nh, 302, hd), torch.zeros(1, nh, 302, hd)) for _ in range(nl)]
    ids, tmask, codes = golden_ref["tts_input_ids"], golden_ref["tts_streaming_mask"], golden_ref["tts_codes"]
    spk = torch.from_numpy(tts.speaker_embedding(golden_ref["tts_spk_emb"]))
    st = tts.new_state()
    ort_spk = tts.speaker_embedding(golden_ref["tts_spk_emb"])
    ref_logits, ort_logits, n_codes = [], [], 0
    with torch.no_grad():
        for begin, end, total in golden_ref["tts_chunk_calls"]:
            begin, end = int(begin), int(end)
            emb = torch.from_numpy(tts.backbone.text_embeds(ids[begin:end], spk.numpy() if begin == 0 else None))
            cache = DynamicCache()
            for i, (k, v) in enumerate(full):
                cache.update(k[:, :, :begin].clone(), v[:, :, :begin].clone(), i)
            pos = torch.arange(begin, end)[None]
            out = model(inputs_embeds=emb[None], position_ids=pos, past_key_values=cache, use_cache=True,
                        cache_position=pos[0], attention_mask=None)
            for i in range(nl):
                full[i][0][:, :, begin:end] = out.past_key_values[i][0][:, :, begin:end]
                full[i][1][:, :, begin:end] = out.past_key_values[i][1][:, :, begin:end]
            tts.backbone.prefill_text(st.cache, ids[begin:end], begin, ort_spk if begin == 0 else None)
            while n_codes < total:
                past = full[0][0].shape[2]
                x = tts.backbone.audio_bos_embed() if n_codes == 0 else tts.backbone.code_embeds(codes[n_codes - 1])
                cache = DynamicCache()
                for i, (k, v) in enumerate(full):
                    cache.update(k.clone(), v.clone(), i)
                mask = torch.from_numpy(_official_step_mask_torch(past, 1, tmask))[None, None]
                out = model(inputs_embeds=torch.from_numpy(x)[None], position_ids=torch.tensor([[past]]),
                            past_key_values=cache, use_cache=True, cache_position=torch.tensor([past]),
                            attention_mask=mask)
                full = [(out.past_key_values[i][0], out.past_key_values[i][1]) for i in range(nl)]
                h = out.last_hidden_state[0, -1]
                ref_logits.append(torch.stack([head(h) for head in heads]).numpy())
                ort_logits.append(tts.backbone.step(st.cache, x, tmask))
                n_codes += 1
    err_logits = rel_err(np.stack(ort_logits), np.stack(ref_logits))
    k_ref = torch.stack([k for k, _ in full]).numpy()
    err_kv = rel_err(st.cache.keys[:, :, :, : k_ref.shape[3]], k_ref)
    err_golden = rel_err(np.stack(ref_logits), golden_ref["tts_step_logits"])
    print(f"\nvs transformers LlamaModel: logits rel {err_logits:.2e}, keys rel {err_kv:.2e}; "
          f"transformers vs golden {err_golden:.2e}")
    assert err_logits <= TOL and err_kv <= TOL and err_golden <= TOL


# --- streaming vs one-shot ----------------------------------------------------------------------------------------
def _official_overlap_add_torch(prev: np.ndarray, cur: np.ndarray, overlap: int):
    """Independent torch re-statement of `_linear_overlap_add2_wav`."""
    import torch

    f0, f1 = torch.from_numpy(prev), torch.from_numpy(cur)
    n0, n1 = f0.shape[-1], f1.shape[-1]
    w = torch.linspace(0, 1, max(n0, n1) + overlap + 2, dtype=torch.float32)[1:-1]
    w = 0.5 - (w - 0.5).abs()
    out, ws = torch.zeros(n0 + n1 - overlap), torch.zeros(n0 + n1 - overlap)
    out[:n0] += w[-n0:] * f0
    ws[:n0] += w[-n0:]
    out[n0 - overlap: n0 - overlap + n1] += w[:n1] * f1
    ws[n0 - overlap: n0 - overlap + n1] += w[:n1]
    out = out / ws
    return out[:n0].numpy(), out[n0:].numpy()


def test_overlap_add_matches_official(rng=np.random.default_rng(3)):
    for n0, n1 in [(12800, 14848), (14848, 5632), (4096, 2048)]:
        a, b = rng.standard_normal(n0).astype(np.float32), rng.standard_normal(n1).astype(np.float32)
        got, ref = overlap_add2(a, b, 2048), _official_overlap_add_torch(a, b, 2048)
        np.testing.assert_allclose(got[0], ref[0], rtol=0, atol=1e-5)  # weights agree to 1 ulp
        np.testing.assert_allclose(got[1], ref[1], rtol=0, atol=1e-5)


def _stream(tts, pieces, spk, *, early: bool, eager: bool = False, states=None, on_chunk=None):
    keep = tts.options
    tts.options = dataclasses.replace(keep, early_audio=early, eager_codes=eager)
    try:
        out = []
        for c in tts.stream(pieces, spk, states=states):
            if not c.size:  # one empty chunk per piece read while no audio is ready
                continue
            if on_chunk is not None:
                on_chunk()
            out.append(c)
        return out
    finally:
        tts.options = keep


def test_streaming_vs_one_shot(tts, golden_ref):
    text = "Hello world, this is a test. " * 4
    states = []
    pieces = [w + " " for w in text.split()]
    chunks = _stream(tts, pieces, golden_ref["tts_spk_emb"], early=False, states=states)
    assert len(states) == 1
    st = states[0]
    codes = np.stack(st.codes)
    assert len(st.call_ends) >= 3 and len(chunks) == len(st.call_ends)
    # reference: decode each generate call's codes with 4 frames of left context, blend as the official code does
    wavs, prev = [], 0
    for end in st.call_ends:
        wavs.append(tts.decoder.codes_to_wav(codes[max(prev - 4, 0): end]))
        prev = end
    ref, held = [], wavs[0]
    for w in wavs[1:]:
        done, held = _official_overlap_add_torch(held, w, 2048)
        ref.append(done)
    ref.append(held)
    for got, exp in zip(chunks, ref):
        np.testing.assert_allclose(got, exp, rtol=0, atol=1e-5 * np.abs(exp).max())
    streamed, one_shot = np.concatenate(chunks), tts.decoder.codes_to_wav(codes)
    assert streamed.shape == one_shot.shape == (codes.shape[0] * tts.decoder.samples_per_code,)
    seams = np.cumsum([c.shape[0] for c in chunks])[:-1]
    jumps = np.abs(np.diff(streamed))[seams - 1]
    max_jump = np.abs(np.diff(one_shot)).max()
    cos = cosine(streamed, one_shot)
    print(f"\nstreaming: {len(chunks)} chunks, {codes.shape[0]} frames; cosine vs one-shot {cos:.5f}, "
          f"max rel diff {rel_err(streamed, one_shot):.3f}; seam jumps {np.round(jumps, 4).tolist()} "
          f"vs max sample jump of the one-shot wave {max_jump:.4f}")
    assert cos >= 0.99
    assert jumps.max() <= max_jump

    # early audio: the same waveform, but the first chunk comes out after the first generate call, not the second
    calls = []
    generate = tts.generate

    def counting_generate(*a, **k):
        calls.append(1)
        return generate(*a, **k)

    tts.generate = counting_generate
    calls_at_chunk = []
    try:
        early = _stream(tts, pieces, golden_ref["tts_spk_emb"], early=True,
                        on_chunk=lambda: calls_at_chunk.append(len(calls)))
    finally:
        del tts.generate
    assert calls_at_chunk[0] == 1 and len(early) == len(chunks) + 1
    np.testing.assert_allclose(np.concatenate(early), streamed, rtol=0, atol=1e-6 * np.abs(streamed).max())
    hop = chunks[0].shape[0] - 2048
    np.testing.assert_array_equal(early[0], wavs[0][:hop])  # the part the overlap-add never touches, as decoded


SHORT = "One two three four five six seven eight nine ten. Eleven twelve."


@pytest.mark.parametrize("text,max_codes", [
    (SHORT, 2048),
    (SHORT, 120),  # the official stop past max_codes, reached inside the text
    ("One two three four five six seven eight nine ten. " * 5, 2048),  # 160 ids: a segment roll-over
])
def test_eager_codes_are_the_official_codes_sooner(tts, golden_ref, text, max_codes):
    """eager_codes: every frame the prefilled text already fixes is made right after its chunk. Same codes, same
    audio as the official cadence, but more of it before the text ends (what a slow LLM leaves the TTS waiting
    for)."""
    from edge.tts.backbone import frames_determined_by, released_text
    from edge.tts.sampling import SamplingOptions as CodeSampling

    d = tts.dims
    for past in range(d.condition_length - 1, d.condition_length + 400):  # the closed form vs the mask rule
        for tokens in (10, 20, 50):
            k = frames_determined_by(tokens, past, d)
            assert all(released_text(past + j, d) <= tokens for j in range(k))
            assert released_text(past + k, d) > tokens
    pieces = [w + " " for w in text.split()]
    keep = tts.options
    runs = {}
    try:
        for eager in (False, True):
            # seeded sampling: the tiny random TTS says EOS at once when greedy, and rarely when sampling
            tts.options = dataclasses.replace(keep, max_codes=max_codes, eager_codes=eager, early_audio=True,
                                              sampling=CodeSampling(seed=5))
            states, pulled, before_end, out = [], [], [0], []

            def feed():
                for p in pieces:
                    pulled.append(p)
                    yield p

            for c in tts.stream(feed(), golden_ref["tts_spk_emb"], states=states):
                out.append(c)
                if len(pulled) < len(pieces):
                    before_end[0] += c.size
            runs[eager] = (np.concatenate([np.stack(s.codes) for s in states]), np.concatenate(out), before_end[0])
    finally:
        tts.options = keep
    (codes0, wav0, early0), (codes1, wav1, early1) = runs[False], runs[True]
    np.testing.assert_array_equal(codes1, codes0)
    np.testing.assert_array_equal(wav1, wav0)
    print(f"\n{codes0.shape[0]} frames; audio before the text ended: official {early0}, eager {early1} samples")
    if text == SHORT:  # (~3 golden-tokenizer ids per word: 4 text chunks, no roll-over)
        assert early1 > early0 > 0


def test_stream_and_synthesize_share_first_call(tts, golden_ref):
    """With the whole text in one piece, the first generate call of both official loops is the same."""
    text = "Hello world, this is a test. Hello world."
    states = []
    next(iter(tts.stream([text], golden_ref["tts_spk_emb"], states=states)), None)
    codes = tts.synthesize_codes(text, golden_ref["tts_spk_emb"])
    np.testing.assert_array_equal(np.stack(states[0].codes[:25]), codes[:25])


def test_kv_cache_growth_keeps_contents_and_results(tts, golden_ref):
    """A cache that must grow mid-utterance gives the same step logits as a roomy one."""
    ids, mask = golden_ref["tts_input_ids"], golden_ref["tts_streaming_mask"]
    spk = tts.speaker_embedding(golden_ref["tts_spk_emb"])
    out = []
    for room in (1, 600):
        st = tts.new_state()
        st.cache.keys, st.cache.values = st.cache.keys[:, :, :, :303].copy(), st.cache.values[:, :, :, :303].copy()
        st.cache.ensure(302 + room)
        tts.backbone.prefill_text(st.cache, ids[:12], 0, spk)
        before = st.cache.keys[:, :, :, :12].copy()
        logits = []
        for i in range(5):
            emb = tts.backbone.audio_bos_embed() if i == 0 else tts.backbone.code_embeds(golden_ref["tts_codes"][i - 1])
            logits.append(tts.backbone.step(st.cache, emb, mask))
        np.testing.assert_array_equal(st.cache.keys[:, :, :, :12], before)
        out.append(np.stack(logits))
    assert rel_err(out[0], out[1]) <= 1e-6


# --- int8 ---------------------------------------------------------------------------------------------------------
def test_int8_figures(tts8, golden_ref):
    assert tts8.backbone.variant == "int8"
    logits = _teacher_forced(tts8, golden_ref)
    codes = _greedy_codes(tts8, golden_ref)
    mel = tts8.decoder.codes_to_mel(golden_ref["tts_codes"])
    wav = tts8.decoder.mel_to_wav(golden_ref["tts_mel"])
    figs = {
        "step_logits_cos": cosine(logits, golden_ref["tts_step_logits"]),
        "step_logits_rel": rel_err(logits, golden_ref["tts_step_logits"]),
        "codes_match": float((codes == golden_ref["tts_codes"]).mean()),
        "dvae_mel_cos": cosine(mel, golden_ref["tts_mel"]),
        "dvae_mel_rel": rel_err(mel, golden_ref["tts_mel"]),
        "vocos_wav_cos": cosine(wav, golden_ref["tts_wav"]),
        "vocos_wav_rel": rel_err(wav, golden_ref["tts_wav"]),
    }
    print("\nint8: " + ", ".join(f"{k} {v:.5f}" for k, v in figs.items()))
    assert min(figs["step_logits_cos"], figs["dvae_mel_cos"], figs["vocos_wav_cos"]) >= 0.99
    assert figs["codes_match"] == 1.0  # the code heads stay fp32 in the int8 graph (tiny margins)


# --- sampling -----------------------------------------------------------------------------------------------------
def test_warpers_match_transformers():
    import torch
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(1)
    for scale in (1.0, 10.0, 30.0):
        s = (rng.standard_normal((4, 626)) * scale).astype(np.float32)
        ref = TopPLogitsWarper(0.7, min_tokens_to_keep=3)(None, torch.from_numpy(s.copy()))
        ref = TopKLogitsWarper(20, min_tokens_to_keep=3)(None, ref).numpy()
        got = top_k_filter(top_p_filter(s, 0.7, 3), 20, 3)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
        np.testing.assert_array_equal(got[~np.isinf(got)], ref[~np.isinf(ref)])


def test_repetition_penalty_matches_chattts_rule():
    import torch

    rng = np.random.default_rng(2)
    s = rng.standard_normal((4, 626)).astype(np.float32)
    hist = rng.integers(0, 30, (40, 4))
    got = repetition_penalty(s, hist, 1.3, 16)
    ids = torch.from_numpy(hist.T[:, -16:])  # (num_vq, window)
    freq = torch.nn.functional.one_hot(ids, 626).sum(1)
    alpha = torch.pow(torch.tensor(1.3), freq)
    t = torch.from_numpy(s)
    ref = torch.where(t < 0, t * alpha, t / alpha).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_sampler_eos_rule_and_support():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((4, 626)).astype(np.float32)
    logits[:, 625] = 50.0  # EOS dominant
    s = CodeSampler(SamplingOptions(seed=0), num_vq=4, eos_id=625)
    hist = np.zeros((3, 4), np.int64)
    for step in range(10):
        assert (s(logits, hist, step, False) != 625).all()  # forbidden for the first min_new_tokens steps
    assert (s(logits, hist, 10, False) == 625).all()
    # draws stay inside the top-p/top-k support and follow its softmax
    logits = (rng.standard_normal((4, 626)) * 3).astype(np.float32)
    temp = np.array([0.1, 0.3, 0.1, 0.3], np.float32)[:, None]
    allowed = top_k_filter(top_p_filter(logits / temp, 0.7, 3), 20, 3)
    p = np.exp(allowed - allowed.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    draws = np.stack([s(logits, hist, 20, False) for _ in range(2000)])
    for q in range(4):
        assert np.isfinite(allowed[q, draws[:, q]]).all()
        top = int(p[q].argmax())
        assert abs((draws[:, q] == top).mean() - p[q, top]) < 0.05
    g = CodeSampler(SamplingOptions(greedy=True), num_vq=4, eos_id=625)
    np.testing.assert_array_equal(g(logits, hist, 20, False), logits.argmax(1))


# --- text normaliser ----------------------------------------------------------------------------------------------
def test_text_normaliser_official_rules(tts):
    assert replace_numbers("I have 23 books", "english") == "I have two three books"
    assert replace_numbers("我有2个苹果", "chinese") == "我有二个苹果"
    assert normalize_piece("**Step 1** done", "english") == "Step one done"
    assert sentence_end("It costs 3.5 dollars") == ""
    assert sentence_end("Done. Next") == "."
    assert sentence_end("你好！") == "！"
    if importlib.util.find_spec("num2words"):  # optional NumberStyle.CARDINAL
        assert replace_numbers("I have 23 books", "english", NumberStyle.CARDINAL) == "I have twenty-three books"
        assert replace_numbers("我有23个", "chinese", NumberStyle.CARDINAL) == "我有二三个"
    prompt, n = prepare_tts_text("word " * 400, tts.tokenizer)
    assert n == 300 and "[Etts]" not in prompt
    assert len(tts.tokenizer.encode(prompt)) == 303


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_errors(tts, tts_bundle):
    with pytest.raises(InvalidInputError, match="EOS"):
        tts.decoder.codes_to_mel(np.full((3, 4), 625))
    with pytest.raises(InvalidInputError, match="llm_dim|hidden"):
        tts.speaker_embedding(np.zeros((1, 7), np.float32))
    with pytest.raises(InvalidInputError, match="variant"):
        TTS(tts_bundle, variant="fp16")
    with pytest.raises(InvalidInputError, match="mel"):
        tts.decoder.mel_to_wav(np.zeros((80, 4), np.float32))


# --- segment roll-over --------------------------------------------------------------------------------------------
def _hf_llama(ckpt):
    import torch
    from transformers import LlamaConfig, LlamaModel

    c = ckpt.config["tts_config"]
    cfg = LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_attention_heads=c["num_attention_heads"], num_hidden_layers=c["num_hidden_layers"],
                      max_position_embeddings=c["max_position_embeddings"], attn_implementation="sdpa")
    model = LlamaModel(cfg).eval()
    model.load_state_dict({k[len("tts.model."):]: torch.from_numpy(ckpt.f32(k).copy())
                           for k in ckpt.names("tts.model.")})
    return model


def test_rollover_audio_prefill_vs_transformers(tts, golden_ckpt, golden_ref):
    """`prefill_audio_ids` of a new segment: text [Stts][spk] + 5 ids (causal), then audio-bos + 49 carried frames
    at 302.. with the broadcast streaming mask, then one step; vs transformers LlamaModel with the same masks."""
    import torch
    from transformers.cache_utils import DynamicCache

    model = _hf_llama(golden_ckpt)
    text_ids = golden_ref["tts_input_ids"][2:7]
    carried = golden_ref["tts_codes"][:20]
    tmask = build_text_mask(5, tts.dims)
    spk = tts.speaker_embedding(golden_ref["tts_spk_emb"])
    ids = np.concatenate([golden_ref["tts_input_ids"][:2], text_ids])
    # ours
    st = tts.new_state()
    tts.backbone.prefill_text(st.cache, ids, 0, spk)
    tts.backbone.prefill_audio(st.cache, carried[:-1], tmask)
    ours = tts.backbone.step(st.cache, tts.backbone.code_embeds(carried[-1]), tmask)
    # transformers: zero 302-position cache, text prefill on the cut cache, then the audio block and one step
    nl = model.config.num_hidden_layers
    with torch.no_grad():
        emb = torch.from_numpy(tts.backbone.text_embeds(ids, spk))[None]
        out = model(inputs_embeds=emb, position_ids=torch.arange(7)[None], use_cache=True,
                    past_key_values=DynamicCache(), cache_position=torch.arange(7))
        shape = (1, model.config.num_attention_heads, 302, model.config.hidden_size // model.config.num_attention_heads)
        cache = DynamicCache()
        for i in range(nl):
            k, v = torch.zeros(shape), torch.zeros(shape)
            k[:, :, :7], v[:, :, :7] = out.past_key_values[i][0], out.past_key_values[i][1]
            cache.update(k, v, i)
        audio = np.concatenate([tts.backbone.audio_bos_embed(), tts.backbone.code_embeds(carried[:-1])])
        n = audio.shape[0]
        mask = torch.from_numpy(_official_step_mask_torch(302, n, tmask))[None, None]
        pos = torch.arange(302, 302 + n)
        out = model(inputs_embeds=torch.from_numpy(audio)[None], position_ids=pos[None], past_key_values=cache,
                    use_cache=True, cache_position=pos, attention_mask=mask)
        past = 302 + n
        mask = torch.from_numpy(_official_step_mask_torch(past, 1, tmask))[None, None]
        x = torch.from_numpy(tts.backbone.code_embeds(carried[-1]))[None]
        out = model(inputs_embeds=x, position_ids=torch.tensor([[past]]), past_key_values=out.past_key_values,
                    use_cache=True, cache_position=torch.tensor([past]), attention_mask=mask)
        ref = torch.stack([head(out.last_hidden_state[0, -1]) for head in _hf_heads(golden_ckpt)]).numpy()
    err = rel_err(ours, ref)
    k_ref = torch.stack([out.past_key_values[i][0] for i in range(nl)]).numpy()
    k_err = rel_err(st.cache.keys[:, :, :, :past + 1], k_ref)
    print(f"\nroll-over prefill vs transformers: logits rel {err:.2e}, keys rel {k_err:.2e}")
    assert err <= TOL and k_err <= TOL


def test_stream_rolls_over_long_text(tts_bundle, golden_ref):
    """126 tokens without a sentence end, then "ok." -> cut + new segment carrying 5 text ids and 50 frames."""
    t = TTS(tts_bundle, options=TTSOptions(sampling=SamplingOptions(greedy=True), max_codes=200))
    pieces = ["Hello world, this is a test " * 18, "ok. ", "Hello world ", "this is a test. ", "Bye now."]
    states = []
    chunks = list(t.stream(pieces, golden_ref["tts_spk_emb"], states=states))
    assert len(states) == 2, "one roll-over expected"
    first, second = states
    assert first.finished and len(first.codes) < 200
    np.testing.assert_array_equal(np.stack(second.codes[:50]), np.stack(first.codes[-50:]))
    assert second.call_ends[0] == 50 + t.options.codes_per_call
    # every generated frame is heard once, the 4 context frames of the new segment's first chunk twice (official)
    expected = (len(first.codes) + len(second.codes) - 50 + 4) * t.decoder.samples_per_code
    assert sum(c.shape[0] for c in chunks) == expected
