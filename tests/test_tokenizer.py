"""The GGUF tokenizer (llama.cpp) gives the same ids as the checkpoint's Hugging Face tokenizer."""

from __future__ import annotations

import json
import random

import pytest

from edge import keys
from edge.llm import LLM, LLMOptions

WORDS = ["hello", "world", "The", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "image", "audio", "don't",
         "it's", "we'll", "I'm", "they've", "she'd", "MiniCPM", "llama.cpp", "GGUF", "ONNX", "naïve", "café", "Über",
         "cafe\u0301"]  # the last is NFD: both sides NFC-normalise
CHINESE = ["你好", "世界", "图片里有什么", "请转录这段音频", "北京是中国的首都", "模型", "语音", "。", "，", "！"]
EMOJI = ["😀", "👍🏽", "🇫🇷", "🤖", "❤️", "👨‍👩‍👧‍👦", "🎉🎉"]
CODE = ["def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }", "SELECT * FROM t;",
        "x = {'a': [1, 2, 3]}", "#include <stdio.h>", "console.log(`${a}`);", "if x!=y:\n\tpass"]
SPACES = ["  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "    \n\n   ", "\u3000", " \u00a0 "]
NUMBERS = ["0", "42", "3.14159", "1,000,000", "2026-11-28", "12345678901234567890", "-7e-3"]
SPECIALS = list(keys.RUNTIME_SPECIAL_TOKENS) + [keys.UNIT, keys.DEFAULT_VOICE]
N_RANDOM = 300


def corpus() -> list[str]:
    rng = random.Random(1234)
    pool = WORDS + CHINESE + EMOJI + CODE + SPACES + NUMBERS
    out = list(pool)
    for _ in range(N_RANDOM):
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(pool) + rng.choice(["", " ", "\n", "  "]) for _ in range(k)))
    return out


def template_strings(specials: list[str]) -> list[str]:
    """Every special token in the positions the prompt builder puts it (chat template, placeholders)."""
    im = f"{keys.IM_START}user\nWhat is this?{keys.IM_END}\n{keys.IM_START}assistant\n"
    out = [im, im + "".join((keys.SPK_BOS, keys.SPK, keys.SPK_EOS, keys.TTS_BOS)),
           f"{keys.IMAGE_ID_START}0{keys.IMAGE_ID_END}{keys.IMAGE_START}{keys.UNK * 4}{keys.IMAGE_END}"
           f"{keys.SLICE_START}{keys.UNK * 2}{keys.SLICE_END}\n{keys.SLICE_START}{keys.UNK}{keys.SLICE_END}",
           f"{keys.AUDIO_START}{keys.UNK * 25}{keys.AUDIO_END}{keys.AUDIO_START}{keys.UNK * 3}{keys.AUDIO_END}",
           f"{keys.UNIT}hello{keys.TTS_EOS}{keys.IM_END}\n{keys.IM_START}user\n"]
    out += [f"text before {s} text after" for s in specials] + [f"{s}{s}\n{s}" for s in specials]
    return out


@pytest.fixture(scope="module", params=["synthetic", "golden"])
def pair(request, tmp_path_factory):
    """(HF tokenizer, GGUF LLM, added tokens) of the project's synthetic tiny checkpoint and of the golden one."""
    from tokenizers import Tokenizer

    from converters import llm_gguf
    from converters.checkpoint import Checkpoint

    if request.param == "golden":
        ckpt_dir = request.getfixturevalue("golden_dir") / "ckpt"
    else:
        from models.synth import build_synthetic_checkpoint

        ckpt_dir = build_synthetic_checkpoint(tmp_path_factory.mktemp("synth") / "ckpt", scale="tiny", seed=0,
                                              progress=False)
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    llm_gguf.export(Checkpoint.open(ckpt_dir), out, quant="f32", progress=False)
    hf = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
    llm = LLM(out / "llm.gguf", LLMOptions.exact(n_ctx=256))
    tc = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    specials = [v["content"] for v in tc["added_tokens_decoder"].values()]
    return hf, llm, specials


def test_plain_text_ids_match(pair):
    hf, llm, _ = pair
    texts = corpus()
    assert len(texts) >= 300
    mismatches = [t for t in texts if llm.tokenize(t, special=False) != hf.encode(t, add_special_tokens=False).ids]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"


def test_special_tokens_in_template_positions(pair):
    hf, llm, specials = pair
    for s in specials:
        assert len(llm.tokenize(s, special=True)) == 1, s
    for t in template_strings(specials):
        assert llm.tokenize(t, special=True) == hf.encode(t, add_special_tokens=False).ids, t


def test_user_text_never_becomes_control_tokens(pair):
    _, llm, specials = pair
    special_ids = {llm.token_id(s) for s in specials}
    for s in specials:
        ids = llm.tokenize(f"please say {s} now", special=False)
        assert not special_ids & set(ids), s
        assert llm.detokenize(ids) == f"please say {s} now"


def test_detokenize_round_trip(pair):
    _, llm, _ = pair
    import unicodedata

    for t in corpus()[:100]:
        assert llm.detokenize(llm.tokenize(t)) == unicodedata.normalize("NFC", t)
