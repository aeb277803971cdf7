"""LLM backbone (llama.cpp through llama-cpp-python) against transformers' Qwen2 with the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from edge.llm import LLM, LLMOptions
from edge.sampling import SamplingOptions
from tests.helpers import cosine, rel_err

torch = pytest.importorskip("torch")

N_PROMPT = 64
N_GREEDY = 32
SEED = 1234


def _ref_logits(model, ids=None, embeds=None) -> np.ndarray:
    with torch.no_grad():
        if embeds is not None:
            out = model(inputs_embeds=torch.from_numpy(embeds)[None])
        else:
            out = model(torch.tensor([ids]))
    return out.logits[0].numpy()


def _ref_greedy(model, ids, n) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, num_beams=1,
                             eos_token_id=None, pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def prompt_ids(golden_ckpt):
    rng = np.random.default_rng(SEED)
    return rng.integers(0, 590, size=N_PROMPT).tolist()  # ordinary (non-special) token ids


@pytest.fixture(scope="module")
def llm_f32(golden_gguf):
    return LLM(golden_gguf("f32"), LLMOptions.exact(n_ctx=512))


def test_f32_logits_match_transformers(llm_f32, qwen2_reference, prompt_ids):
    llm_f32.reset()
    got, _ = llm_f32.prefill([prompt_ids], logits="all")
    ref = _ref_logits(qwen2_reference, prompt_ids)
    err = rel_err(got, ref)
    print(f"f32 GGUF vs transformers, {N_PROMPT} tokens: max|dlogit|/max|logit| = {err:.2e}")
    assert err <= 1e-3


def test_f32_greedy_tokens_match_transformers(llm_f32, qwen2_reference, prompt_ids):
    llm_f32.reset()
    last, _ = llm_f32.prefill([prompt_ids])
    got = [e.token for e in llm_f32.generate(last, SamplingOptions.greedy_decoding(), max_new_tokens=N_GREEDY)]
    assert got == _ref_greedy(qwen2_reference, prompt_ids, N_GREEDY)


def test_embedding_path_interleaved_with_text(llm_f32, qwen2_reference, prompt_ids, golden_ckpt):
    """Text spans and external embedding blocks in one sequence = transformers with inputs_embeds."""
    rng = np.random.default_rng(SEED + 1)
    table = golden_ckpt.f32("llm.model.embed_tokens.weight")
    scale = float(table.std())
    a = (rng.standard_normal((7, table.shape[1])) * scale).astype(np.float32)
    b = (rng.standard_normal((12, table.shape[1])) * scale).astype(np.float32)
    t1, t2, t3 = prompt_ids[:10], prompt_ids[10:30], prompt_ids[30:]
    segments = [t1, a, t2, b, t3]
    embeds = np.concatenate([table[t1], a, table[t2], b, table[t3]]).astype(np.float32)
    llm_f32.reset()
    got, _ = llm_f32.prefill(segments, logits="all")
    ref = _ref_logits(qwen2_reference, embeds=embeds)
    err = rel_err(got, ref)
    print(f"embedding path vs transformers inputs_embeds: {err:.2e}")
    assert err <= 1e-3
    # and greedy continuation from the mixed prompt
    llm_f32.reset()
    last, _ = llm_f32.prefill(segments)
    got_tokens = [e.token for e in llm_f32.generate(last, SamplingOptions.greedy_decoding(), max_new_tokens=8)]
    with torch.no_grad():
        out = qwen2_reference.generate(inputs_embeds=torch.from_numpy(embeds)[None], max_new_tokens=8,
                                       do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=8)
    assert got_tokens == out[0, -8:].tolist()


def test_hidden_states_are_final_norm_output(llm_f32, qwen2_reference, prompt_ids):
    """The TTS speaker embedding is the last hidden state (after the final RMSNorm) at chosen positions."""
    llm_f32.reset()
    _, hidden = llm_f32.prefill([prompt_ids], hidden_positions=[3, 40, N_PROMPT - 1])
    with torch.no_grad():
        ref = qwen2_reference(torch.tensor([prompt_ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    for p in (3, 40, N_PROMPT - 1):
        assert rel_err(hidden[p], ref[p]) <= 1e-4


@pytest.mark.parametrize("quant,min_cos,min_top1", [
    # f16 weights: ~3 decimal digits per weight; tiny random model logits stay nearly collinear.
    ("f16", 0.9999, 0.95),
    # q8_0: 8-bit blocks of 32; still close, top-1 may flip where random-model margins are tiny.
    ("q8_0", 0.999, 0.9),
])
def test_quantized_logits_close(golden_gguf, qwen2_reference, prompt_ids, quant, min_cos, min_top1):
    llm = LLM(golden_gguf(quant), LLMOptions.exact(n_ctx=256))
    got, _ = llm.prefill([prompt_ids], logits="all")
    ref = _ref_logits(qwen2_reference, prompt_ids)
    cos = min(cosine(g, r) for g, r in zip(got, ref))
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    print(f"{quant}: min per-position logit cosine {cos:.5f}, top-1 agreement {top1:.3f}")
    assert cos >= min_cos and top1 >= min_top1
    llm.close()


def test_two_turn_kv_reuse_equals_full_prefill(llm_f32, prompt_ids):
    llm_f32.reset()
    turn1 = prompt_ids[:40]
    last, _ = llm_f32.prefill([turn1])
    reply = [e.token for e in llm_f32.generate(last, SamplingOptions.greedy_decoding(), max_new_tokens=6)]
    history = turn1 + reply
    turn2 = history + prompt_ids[40:]
    cached_before = llm_f32.n_past
    got, _ = llm_f32.prefill([turn2], logits="last")
    assert cached_before == len(history)  # nothing was thrown away before the new tail
    llm_f32.reset()
    full, _ = llm_f32.prefill([turn2], logits="last")
    assert rel_err(got, full) <= 1e-5


def test_sampling_is_seeded(llm_f32, prompt_ids):
    opts = SamplingOptions(seed=7)
    runs = []
    for _ in range(2):
        llm_f32.reset()
        last, _ = llm_f32.prefill([prompt_ids])
        runs.append([e.token for e in llm_f32.generate(last, opts, max_new_tokens=12)])
    assert runs[0] == runs[1]


def test_hidden_state_of_a_cached_position_is_recomputed(llm_f32, prompt_ids):
    """A follow-up prefill that reuses the cache still returns the hidden state it asks for."""
    llm_f32.reset()
    _, h1 = llm_f32.prefill([prompt_ids], hidden_positions=[20])
    _, h2 = llm_f32.prefill([prompt_ids], hidden_positions=[20])
    assert 20 in h2 and rel_err(h2[20], h1[20]) <= 1e-5


def test_set_threads_changes_llama_cpp_counts_and_keeps_results(golden_gguf, prompt_ids):
    """Live mode lends cores to the decode and takes them back: the counts reach llama.cpp and the logits do not
    depend on them (f32, exact options)."""
    import llama_cpp

    from edge.errors import InvalidInputError

    llm = LLM(golden_gguf("f32"), LLMOptions.exact(n_ctx=256, n_threads=1, n_threads_batch=1))
    try:
        first, _ = llm.prefill([prompt_ids[:8]])
        llm.set_threads(2, 2)
        assert (llama_cpp.llama_n_threads(llm._ctx), llama_cpp.llama_n_threads_batch(llm._ctx)) == (2, 2)
        assert (llm.n_threads, llm.n_threads_batch) == (2, 2)
        llm.reset()
        again, _ = llm.prefill([prompt_ids[:8]])
        np.testing.assert_allclose(again, first, rtol=0, atol=1e-5 * np.abs(first).max())
        llm.set_threads(1)
        assert (llama_cpp.llama_n_threads(llm._ctx), llama_cpp.llama_n_threads_batch(llm._ctx)) == (1, 2)
        with pytest.raises(InvalidInputError):
            llm.set_threads(0)
    finally:
        llm.close()
