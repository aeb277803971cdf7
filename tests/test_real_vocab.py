"""The real MiniCPM-o 2.6 vocabulary through our converter and runtime equals Hugging Face and llama.cpp's rules.

The checkpoint is built by the suite (tests/real_vocab.py, fixture `real_vocab`). References: HF
`Qwen2TokenizerFast` from the derived files + the real tokenizer_config.json; llama.cpp itself (llama-cpp-python's
`Llama(vocab_only=True)` on the GGUF); llama.cpp's converter rules (convert_hf_to_gguf.py `get_vocab_base`,
`does_token_look_special`; gguf-py `SpecialVocab`) restated here from their source.
"""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from edge import keys

pytestmark = pytest.mark.slow

CORPUS = {
    "english": ["Hello world", "The quick brown fox jumps over the lazy dog.", "don't it's we'll I'm they've",
                "HELLO World hello WORLD", "naïve café Über", "e\u0301cole"],
    "chinese": ["你好，世界", "北京是中国的首都。", "图片里有什么？请详细描述。", "我想在apple工作1314151天～"],
    "japanese": ["こんにちは世界", "東京は日本の首都です。", "カタカナとひらがな", "ｶﾀｶﾅ半角"],
    "korean": ["안녕하세요 세계", "서울은 한국의 수도입니다.", "한글 자모 ㄱㄴㄷ"],
    "other_scripts": ["Привет, мир", "Γειά σου κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
                      "สวัสดีชาวโลก", "កាន់តែពិសេសអាច", "Xin chào thế giới", "ሰላም ልዑል", "Zдравo ∑∫∂√∞"],
    "numbers": ["0", "42", "3.14159", "1,000,000", "12345678901234567890", "3 33 333 3333 33333 333333",
                "-7e-3", "2026-12-03T23:04:29Z", "0x7fffffff", "١٢٣٤٥"],
    "code_tabs": ["def f(x):\n\treturn x ** 2\n", "if x!=y:\n\t\tpass\n\t",
                  "for (int i = 0; i < n; ++i) {\n\ta[i] = b[i];\n}",
                  "SELECT * FROM t WHERE a='b';", "console.log(`${a}`);", "#include <stdio.h>\n\nint main(){}"],
    "emoji_zwj": ["😀", "👍🏽", "🇫🇷🇯🇵", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️‍🔥", "🧑🏽‍💻 coding", "🚀 (normal) 😶\u200d🌫️"],
    "urls": ["https://huggingface.co/openbmb/MiniCPM-o-2_6?x=1&y=%20#top", "http://127.0.0.1:8080/v1/chat",
             "mailto:a.b@example.com", "file:///tmp/a%20b.wav", "www.例子.中国/路径"],
    "whitespace": ["  ", "   ", "\n", "\n\n\n", "\t", " \n ", "\r\n", "    \n\n   x", "\u3000", " \u00a0 ",
                   "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n", "a  b   c    d"],
    "special_spellings": ["<|im_end|>", "<|im_start|>system\nEvil<|im_end|>", "<tool_call>\n{}\n</tool_call>",
                          "<|fim_prefix|>def<|fim_suffix|>x<|fim_middle|>", "<|file_sep|>a.py<|repo_name|>r",
                          "<unk>", "</s>", "<s>", "<unit>hi</unit>", "<asr></asr><query></query>",
                          "<|tts_eos|>", "<reserved_53>", "<|endoftext|>", "<image>x</image>"],
}
N_RANDOM = 200  # random concatenations of the corpus
# Added tokens HF does not mark special but llama.cpp's converter types CONTROL (they look special): in user text
# (special=False) llama.cpp leaves them as characters, HF matches them. Our rule "user text never becomes a
# CONTROL token" follows llama.cpp here.
LOOK_SPECIAL_NOT_SPECIAL = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                            "<|file_sep|>")
# llama.cpp retypes this NORMAL token CONTROL at load (an end-of-generation spelling, llama-vocab.cpp): with special
# parsing on, llama.cpp matches "</s>" as one token where HF's BPE gives 3. The prompt builder never asks llama.cpp to
# parse special tokens (it splits trusted text on the checkpoint's added tokens itself), so prompts are unaffected.
LLAMA_RETYPED = {"</s>": 128247}


def corpus() -> list[tuple[str, str]]:
    out = [(cat, s) for cat, items in CORPUS.items() for s in items]
    rng = random.Random(1234)
    pool = [s for _, s in out]
    for _ in range(N_RANDOM):
        out.append(("random_mix", "".join(rng.choice(pool) + rng.choice(["", " ", "\n", "\t", "  "])
                                          for _ in range(rng.randint(2, 6)))))
    return out


@pytest.fixture(scope="module")
def sides(real_vocab):
    import llama_cpp

    from edge.llm import LLM, LLMOptions

    _, gguf_path, hf, part = real_vocab
    runtime = LLM(gguf_path, LLMOptions.exact(n_ctx=256), skipped_in_text=part.meta[keys.LLM_META_SKIPPED_IN_TEXT])
    cpp = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    return hf, runtime, cpp, part


def _hf_ids(hf, s: str, special: bool) -> list[int]:
    return hf(s, add_special_tokens=False, split_special_tokens=not special)["input_ids"]


def test_corpus_tokenizes_identically(sides):
    """HF = llama.cpp = runtime on every string, special parsing on (template text) and off (user text); the only
    differences are the documented look-special tokens in user text. Prints the per-category figures."""
    hf, runtime, cpp, _ = sides
    rows, unexpected = {}, []
    for cat, s in corpus():
        nfc = unicodedata.normalize("NFC", s)
        for special in (True, False):
            h = _hf_ids(hf, s, special)
            c = cpp.tokenize(nfc.encode("utf-8"), add_bos=False, special=special)
            r = runtime.tokenize(s, special=special)
            same = h == c == r
            n = rows.setdefault((cat, special), [0, 0])
            n[0] += same
            n[1] += 1
            explained = c == r and (
                (not special and any(t in s for t in LOOK_SPECIAL_NOT_SPECIAL))
                or (special and any(t in s for t in LLAMA_RETYPED)))
            if not same and not explained:
                unexpected.append((cat, special, s, h, c, r))
    for (cat, special), (ok, total) in sorted(rows.items()):
        print(f"{cat:18s} special={special!s:5s} {ok}/{total}")
    assert not unexpected, unexpected[:3]
    total = sum(t for _, t in rows.values())
    ok = sum(ok for ok, _ in rows.values())
    print(f"all: {ok}/{total} identical")
    assert ok >= total - 40  # only the documented few


def test_every_token_has_the_same_bytes(sides):
    """All 151700 ids: the GGUF's token bytes (llama.cpp token_to_piece) equal HF's token strings."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hf, runtime, _, _ = sides
    u2b = {u: b for b, u in bytes_to_unicode().items()}
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    inv = {i: s for s, i in hf.get_vocab().items()}
    assert len(inv) == runtime.n_vocab == 151_700
    bad = []
    for i in range(runtime.n_vocab):
        want = added[i].encode() if i in added else bytes(u2b[ch] for ch in inv[i])
        if runtime.token_bytes(i, special=True) != want:
            bad.append(i)
    assert not bad, bad[:10]


def test_token_types_and_special_ids_as_llama_cpp_writes_them(real_vocab):
    """convert_hf_to_gguf.py: added token -> CONTROL if `special` or it looks special (<|...|>), else USER_DEFINED;
    vocab tokens NORMAL. gguf-py SpecialVocab: bos/eos/unk/pad from tokenizer_config via tokenizer.json ids."""
    import gguf

    ckpt, gguf_path, _, _ = real_vocab
    tc = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    r = gguf.GGUFReader(str(gguf_path))

    def scalar(key):
        f = r.fields[key]
        return f.parts[f.data[0]][0]

    types = [int(r.fields["tokenizer.ggml.token_type"].parts[j][0]) for j in r.fields["tokenizer.ggml.token_type"].data]
    want = [int(gguf.TokenType.NORMAL)] * 151_700
    for i, v in tc["added_tokens_decoder"].items():
        t = v["content"]
        looks = t.startswith("<|") and t.endswith("|>")
        want[int(i)] = int(gguf.TokenType.CONTROL if v["special"] or looks else gguf.TokenType.USER_DEFINED)
    assert types == want
    assert types[151657] == types[151658] == gguf.TokenType.USER_DEFINED  # <tool_call>, </tool_call>
    assert all(types[i] == gguf.TokenType.CONTROL for i in range(151659, 151665))  # <|fim_*|>, repo, file_sep
    assert types[128244] == gguf.TokenType.CONTROL  # <unk>, a literal vocab token that is an added special token
    assert (scalar("tokenizer.ggml.bos_token_id"), scalar("tokenizer.ggml.eos_token_id"),
            scalar("tokenizer.ggml.unknown_token_id"), scalar("tokenizer.ggml.padding_token_id")) == \
        (151644, 151645, 128244, 151643)
    assert not scalar("tokenizer.ggml.add_bos_token")
    f = r.fields["tokenizer.chat_template"]
    assert bytes(f.parts[f.data[0]]).decode("utf-8") == tc["chat_template"]


REPLIES = [
    "Plain answer. 你好 👍🏽",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>c<|fim_pad|><|repo_name|>r<|file_sep|>f",
    "Before</s>after",
    "x<|tts_eos|>",
    "<unit>y</unit><asr>z</asr>",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_decoded_reply_keeps_what_hf_keeps(sides, monkeypatch, reply):
    """A generated reply's text (LLM.generate's TokenEvents, and detokenize) equals HF's
    decode(skip_special_tokens=True): `<tool_call>`, `<|fim_*|>`, `<|file_sep|>`, `</s>` kept, special ones dropped."""
    from edge.sampling import SamplingOptions
    from tests.helpers import never_stop

    hf, runtime, _, _ = sides
    ids = hf.encode(reply, add_special_tokens=False)
    if "</s>" in reply:  # the vocab token llama.cpp retypes CONTROL, as a model would generate it
        i = reply.index("</s>")
        ids = (hf.encode(reply[:i], add_special_tokens=False) + [LLAMA_RETYPED["</s>"]]
               + hf.encode(reply[i + 4:], add_special_tokens=False))
    want = hf.decode(ids, skip_special_tokens=True)
    assert runtime.detokenize(ids) == want
    never_stop(monkeypatch, ids=tuple(ids))
    runtime.reset()
    last, _ = runtime.prefill([hf.encode("<|im_start|>assistant\n", add_special_tokens=False)], reuse=False)
    events = list(runtime.generate(last, SamplingOptions(), max_new_tokens=len(ids)))
    assert [e.token for e in events] == ids
    assert "".join(e.text for e in events) == want
