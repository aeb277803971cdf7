"""Synthetic tokenizers in the `openbmb/MiniCPM-o-2_6` file layout, built deterministically with `tokenizers`.

Two tokenizers ship with the official checkpoint and both are needed to run it end to end:
- the LLM tokenizer: Qwen2 byte-level BPE (NFC, the Qwen2 split regex, ByteLevel) plus the Qwen2 and MiniCPM-o
  special tokens as added tokens -> tokenizer.json, vocab.json, merges.txt, tokenizer_config.json (ChatML chat
  template), special_tokens_map.json, added_tokens.json;
- the ChatTTS text tokenizer: BERT WordPiece with the ChatTTS control tokens ([Stts] [Ptts] [Etts] [spk_emb] ...)
  -> assets/chattts_tokenizer/{tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.txt}.

The real vocabularies cannot be downloaded here, so the BPE is trained on a small fixed built-in corpus and the
WordPiece vocabulary is a fixed list: token ids are synthetic (small), the file formats and token strings are real.
Every added/special token is an added token with `normalized=False`, so it always encodes to exactly one id.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

# --- LLM tokenizer (Qwen2 byte-level BPE) -------------------------------------------------------------------------
# The pre-tokenizer regex of Qwen2's tokenizer.json (Split, behavior "Isolated").
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5 special tokens, in their id order (151643..151664 in the real vocabulary).
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
# MiniCPM-o 2.6 added tokens (spec §3.1), in the order of the golden fixture's added_tokens.json. `<unit>` (the
# streaming 1-s unit marker of the web demo, spec §3.1) is not in the golden list; it is appended last so that
# every other token keeps its relative order.
MINICPMO_ADDED_TOKENS = (
    "<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>",
    "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>", "<|audio_start|>", "<|audio|>", "<|audio_end|>",
    "<|spk_bos|>", "<|spk|>", "<|spk_eos|>", "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>",
    "<|interrupt|>", "<|vad_start|>", "<|vad_end|>",
    *(f"<reserved_{i}>" for i in range(43, 54)),
    "<unit>",
)
ADDED_TOKENS = QWEN2_SPECIAL_TOKENS + MINICPMO_ADDED_TOKENS
EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|im_end|>", "<|endoftext|>", "<unk>"

# ChatML with Qwen2's default system prompt: the template of the official tokenizer_config.json (as in the golden
# fixture). chat() switches to a TTS template itself when audio is present, so only this one is stored.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# transformers' VERY_LARGE_INTEGER, written as model_max_length when the tokenizer sets no limit.
VERY_LARGE_INTEGER = int(1e30)
TOKENIZER_CLASS = "MiniCPMOTokenizerFast"
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [None, "tokenization_minicpmo_fast.MiniCPMOTokenizerFast"]}

# Fixed training text: English, Chinese, emoji, code, digits — enough distinct pairs for a few thousand merges.
BPE_CORPUS = (
    "You are a helpful assistant. What is the capital of France? Answer in one word. Paris is the capital.",
    "Please transcribe the audio. What is in this image? Describe the picture in detail, then summarize it.",
    "The quick brown fox jumps over the lazy dog while the small cat sleeps on the warm windowsill.",
    "Hello world, this is a test of the speech synthesis system. Speak slowly and clearly, please.",
    "An omni-modal model reads images, listens to audio, and answers with text and a natural voice.",
    "Streaming input arrives one second at a time; the model thinks, listens, speaks, and can be interrupted.",
    "Tokenizers split text into pieces: words, sub-words, bytes. Byte-level BPE never needs an unknown token.",
    "Running on the edge means small memory, few threads, and no network; every megabyte and millisecond counts.",
    "I'd like two tickets for tomorrow's concert, and we'll meet at the station at 7:45 pm, if that's OK.",
    "They've said it's fine, but I'm not sure they'll remember; you're welcome to call me if you'd prefer.",
    "The meeting moved from Monday, March 3rd to Thursday, March 6th, 2025, in room 12-B on the 4th floor.",
    "Prices: 3 apples cost $1.25, 12 eggs cost $3.49, and 1.5 kg of rice costs 2.80 EUR (about 19.9 CNY).",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 100 128 256 448 512 1024 2048 3584 16000 24000 151643",
    "Phone +1 (555) 010-2030, order #A-7781, version 2.6.0, pi = 3.14159, e = 2.71828, 1e-6, 0x7FFF.",
    "你好，我是一个乐于助人的助手。请问今天天气怎么样？今天是晴天，温度二十五度，适合出去散步。",
    "这张图片里有什么？图片里有一只猫和一只狗，它们在草地上玩耍。请用一句话描述这段音频。",
    "我们的模型可以看图片、听声音，并且用自然的语音回答问题。它运行在手机和平板电脑上。",
    "中国的首都是北京，法国的首都是巴黎。请把下面这句话翻译成英文：我喜欢学习新的语言。",
    "语音合成需要文本、说话人和韵律信息；流式处理每次输入一秒钟的音频，然后立即回复。",
    "Emoji test: 😀 😂 🎉 👍 🚀 🌍 🐱 🐶 ❤️ ✅ 🔥 🎵 and a mixed line 你好 👋 hello 世界 🌏.",
    "Café, naïve, résumé, Zürich, São Paulo, Kraków, Ångström, coöperate; NFC keeps é as one character.",
    "def add(a: int, b: int) -> int:\n    return a + b\n\nprint(add(2, 3))  # prints 5\n",
    "for (int i = 0; i < n; ++i) {\n    sum += x[i] * w[i];\n}\nreturn sum;\n",
    "import numpy as np\nx = np.zeros((3, 14, 14), dtype=np.float32)\n"
    "if x.sum() == 0:\n    raise ValueError('empty')\n",
    "{\"role\": \"user\", \"content\": \"Hello!\"}, {\"role\": \"assistant\", \"content\": \"Hi, how can I help?\"}",
    "SELECT name, count(*) FROM tokens WHERE id < 151700 GROUP BY name ORDER BY 2 DESC LIMIT 10;",
    "<div class=\"answer\">The answer is <b>42</b>.</div>\t<a href=\"https://example.com/a?b=1&c=2\">link</a>",
    "Whitespace   runs,\ttabs,\r\nCRLF line ends,\n\n\nblank lines and trailing spaces   \n",
    "Numbers in words: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million.",
    "Questions and answers: Who? What? Where? When? Why? How? Because the data said so; therefore, we agree.",
    "Listen to the music, laugh a little, take a short break, then speak again with a calm and friendly voice.",
    "The vision encoder cuts each image into slices of 448 by 448 pixels and patches of 14 by 14 pixels.",
    "The audio encoder turns 16 kHz sound into 80 mel bins, 100 frames per second, 25 tokens per second.",
)
# BpeTrainer settings: merges need a pair seen at least twice, so the corpus' one-off pairs do not become tokens.
BPE_MIN_FREQUENCY = 2
# 256 byte tokens + 334 merges: with the 62 added tokens the tokenizer has 652 ids, the golden tiny vocab_size.
BPE_VOCAB_SIZE = 590
BYTE_TOKENS = 256  # the ByteLevel alphabet: one token per byte value

# --- ChatTTS text tokenizer (BERT WordPiece) -----------------------------------------------------------------------
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# ChatTTS control tokens in the golden fixture's order; their ids go into config.json tts_config.
CHATTTS_CONTROL_TOKENS = (
    "[Stts]", "[Ptts]", "[Etts]", "[spk_emb]", "[empty_spk]", "[music]", "[laugh]", "[uv_break]", "[lbreak]",
    "[Sbreak]", "[Pbreak]", *(f"[break_{i}]" for i in range(8)),
)
TTS_AUDIO_BOS, TTS_TEXT_EOS, TTS_SPK_EMB = "[Ptts]", "[Etts]", "[spk_emb]"
CHATTTS_CJK = "你好我是的了不在有人这中大来上个们到说和"
CHATTTS_WORDS = (
    "hello", "world", "this", "is", "test", "the", "of", "and", "to", "in", "it", "you", "are", "helpful",
    "assistant", "voice", "speak", "listen", "music", "one", "two", "three", "what", "image", "audio", "model",
)
CHATTTS_DIR = Path("assets") / "chattts_tokenizer"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the checkpoint writer needs from a written tokenizer."""

    size: int  # number of ids (base vocabulary + added tokens)
    ids: dict[str, int]  # added/special/control token -> id


def write_json(path: Path, obj, *, compact: bool = False) -> None:
    """UTF-8 JSON as transformers writes it (indent 2, trailing newline), or compact like vocab.json."""
    text = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) if compact
            else json.dumps(obj, ensure_ascii=False, indent=2))
    path.write_text(text + ("" if compact else "\n"), encoding="utf-8")


def _added_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _legacy_merges(tokenizer_json: dict) -> None:
    """Store BPE merges as "a b" strings (tokenizers < 0.20 cannot read the newer [a, b] pairs; byte-level tokens
    never contain a space, so the legacy form is unambiguous)."""
    model = tokenizer_json["model"]
    model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_qwen2_tokenizer(out_dir: Path, *, bpe_vocab_size: int) -> TokenizerInfo:
    """Train the byte-level BPE on BPE_CORPUS (`bpe_vocab_size` = 256 byte tokens + merges) and write the LLM
    tokenizer files into out_dir. Added tokens get the ids after the BPE vocabulary, in ADDED_TOKENS order."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=bpe_vocab_size, min_frequency=BPE_MIN_FREQUENCY, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(BPE_CORPUS, trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=False)
    if base != bpe_vocab_size:
        raise ValueError(f"BPE_CORPUS gave {base - BYTE_TOKENS} merges, {bpe_vocab_size - BYTE_TOKENS} were "
                         "asked for: lower bpe_vocab_size or extend BPE_CORPUS.")
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in ADDED_TOKENS])
    ids = {t: tok.token_to_id(t) for t in ADDED_TOKENS}
    assert sorted(ids.values()) == list(range(base, base + len(ADDED_TOKENS))), "added tokens must follow the BPE"

    data = json.loads(tok.to_str())
    _legacy_merges(data)
    write_json(out_dir / "tokenizer.json", data)
    vocab = data["model"]["vocab"]
    write_json(out_dir / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])), compact=True)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in data["model"]["merges"]),
                                        encoding="utf-8")
    write_json(out_dir / "added_tokens.json", dict(sorted(ids.items())))
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
    write_json(out_dir / "special_tokens_map.json", {k: _added_token_entry(v) for k, v in special_map.items()})
    write_json(out_dir / "tokenizer_config.json", {
        "added_tokens_decoder": {str(i): {**_added_token_entry(t), "special": True} for t, i in ids.items()},
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": VERY_LARGE_INTEGER,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": TOKENIZER_CLASS,
        "unk_token": UNK_TOKEN,
        "auto_map": TOKENIZER_AUTO_MAP,
    })
    return TokenizerInfo(size=tok.get_vocab_size(with_added_tokens=True), ids=ids)


def chattts_vocab() -> list[str]:
    """The fixed WordPiece vocabulary: BERT specials, ASCII punctuation/digits/letters, a few CJK characters,
    ## continuations, whole words, then the ChatTTS control tokens (the real vocab also ends with them)."""
    chars = list(string.punctuation) + list(string.digits) + list(string.ascii_lowercase) + list(CHATTTS_CJK)
    cont = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return [*BERT_SPECIAL_TOKENS, *chars, *cont, *CHATTTS_WORDS, *CHATTTS_CONTROL_TOKENS]


def write_chattts_tokenizer(ckpt_dir: Path) -> TokenizerInfo:
    """Write assets/chattts_tokenizer (BertTokenizerFast files) under ckpt_dir; return the control token ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out = ckpt_dir / CHATTTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    vocab = chattts_vocab()
    index = {t: i for i, t in enumerate(vocab)}
    assert len(index) == len(vocab), "duplicate WordPiece entries"
    tok = Tokenizer(models.WordPiece(vocab=index, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", index["[CLS]"]), ("[SEP]", index["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    specials = BERT_SPECIAL_TOKENS + CHATTTS_CONTROL_TOKENS
    tok.add_special_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                       special=True) for t in specials])
    ids = {t: tok.token_to_id(t) for t in specials}
    assert all(ids[t] == index[t] for t in specials), "special tokens must keep their vocab.txt ids"

    write_json(out / "tokenizer.json", json.loads(tok.to_str()))
    (out / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    named = {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
             "unk_token": "[UNK]"}
    write_json(out / "special_tokens_map.json", {
        "additional_special_tokens": [_added_token_entry(t) for t in CHATTTS_CONTROL_TOKENS],
        **named,
    })
    write_json(out / "tokenizer_config.json", {
        "added_tokens_decoder": {str(ids[t]): {**_added_token_entry(t), "special": True}
                                 for t in sorted(specials, key=ids.__getitem__)},
        "additional_special_tokens": list(CHATTTS_CONTROL_TOKENS),
        "clean_up_tokenization_spaces": True,
        "cls_token": "[CLS]",
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "mask_token": "[MASK]",
        "model_max_length": VERY_LARGE_INTEGER,
        "never_split": None,
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
        "unk_token": "[UNK]",
    })
    return TokenizerInfo(size=len(vocab), ids=ids)
