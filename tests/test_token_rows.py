"""Text tokens fed as token-table rows inside embedding batches: rows equal gguf-py's dequantization of the same
file, the LLM gives the same logits either way, and a mixed prompt takes one llama_decode instead of one per run."""

from __future__ import annotations

import numpy as np
import pytest

from edge.llm import LLM, LLMOptions
from edge.token_rows import GGUFFormatError, TokenRows
from tests.helpers import rel_err

IDS = [0, 1, 7, 42, 300, 589]


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_k_m"])
def test_rows_equal_gguf_py_dequantization(golden_gguf, quant):
    import gguf

    path = golden_gguf(quant)
    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = np.asarray(gguf.quants.dequantize(t.data[IDS], t.tensor_type), np.float32).reshape(len(IDS), -1)
    rows = TokenRows(path)
    assert rows.qtype == t.tensor_type
    np.testing.assert_array_equal(rows.rows(IDS), want)
    assert rows.rows([]).shape == (0, want.shape[1])
    with pytest.raises(ValueError, match="out of range"):
        rows.rows([rows.n_vocab])
    rows.close()


def test_truncated_and_foreign_files_are_named(golden_gguf, tmp_path):
    data = golden_gguf("f32").read_bytes()
    cut = tmp_path / "cut.gguf"  # (a file cut after its header is refused by the LLM's own load check first)
    cut.write_bytes(data[:200])
    with pytest.raises(GGUFFormatError, match="truncated"):
        TokenRows(cut)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFFormatError, match="not a GGUF"):
        TokenRows(other)


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_mixed_prompt_in_one_call_gives_the_same_logits(golden_gguf, quant, monkeypatch):
    path = golden_gguf(quant)
    split = LLM(path, LLMOptions.exact(n_ctx=256, text_as_embeddings=False))
    one = LLM(path, LLMOptions.exact(n_ctx=256))
    rng = np.random.default_rng(3)
    scale = 0.02
    a = (rng.standard_normal((9, one.n_embd)) * scale).astype(np.float32)
    b = (rng.standard_normal((25, one.n_embd)) * scale).astype(np.float32)
    segments = [[5, 17, 300], a, [42], b, [7, 8]]  # like a live unit: marker tokens around media rows
    calls = {}
    for name, llm in (("split", split), ("one", one)):
        real = llm._decode
        calls[name] = []
        monkeypatch.setattr(llm, "_decode", lambda seg, pos0, want, real=real, n=name: (calls[n].append(len(seg)),
                                                                                          real(seg, pos0, want))[1])
    got_split, _ = split.prefill(segments, logits="all", reuse=False)
    got_one, _ = one.prefill(segments, logits="all", reuse=False)
    assert calls == {"split": [3, 9, 1, 25, 2], "one": [40]}
    err = rel_err(got_one, got_split)
    print(f"{quant}: one embedding batch vs token/embedding runs, all logits: {err:.2e}")
    assert err <= 1e-5
    # cache keys stay token ids for the text (what the KV journal and the prompt tests read)
    assert one.cached_tokens() == split.cached_tokens()
    assert [k for k in one.cached_tokens() if k is not None] == [5, 17, 300, 42, 7, 8]
    # with prefix reuse (chat, server) the runs stay separate: see LLMOptions.text_as_embeddings
    one.reset()
    calls["one"].clear()
    one.prefill(segments)
    assert calls["one"] == [3, 9, 1, 25, 2]
    split.close()
    one.close()
