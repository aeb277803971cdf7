"""`llm.*` of a MiniCPM-o checkpoint -> a Qwen2 GGUF for llama.cpp, with the MiniCPM-o tokenizer and chat template.

Why our own writer and not llama.cpp's `convert_hf_to_gguf.py`: the official route needs the "surgery" script
and a second checkpoint on disk (spec §5.1); here the `llm.` prefix is stripped on the fly and tensors are
streamed one at a time, so the 15 GB bf16 LLM never sits in memory. K-quants are not re-implemented: the base
GGUF (exact BF16, or F32/F16) goes through llama.cpp's own `llama_model_quantize`.

Tokenizer: the Qwen2 byte-level BPE (`tokenizer.ggml.model = gpt2`, `pre = qwen2`), tokens in id order, added
tokens typed as llama.cpp's own `convert_hf_to_gguf.py` (`get_vocab_base`) types them: CONTROL when the added token
is `special` or looks special (`<|...|>`, `does_token_look_special`), USER_DEFINED otherwise (`<tool_call>`:
HF and llama.cpp then both match it in plain text). llama.cpp produces CONTROL tokens only when asked to parse
special tokens, so user text never becomes one. Special ids (bos/eos/unk/pad, add_bos) and the chat template are
written by gguf-py's `SpecialVocab`, the code llama.cpp's converter uses, so they are what it writes (`<unk>` =
128244 on the real vocabulary).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from edge import keys
from edge.errors import CorruptModelFileError, InvalidInputError, ModelFilesNotFoundError

LLM_PREFIX = "llm."
QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
# llama.cpp `enum llama_ftype` values (include/llama.h), used for general.file_type and llama_model_quantize.
_FTYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}

# HF Qwen2 -> GGUF tensor names (gguf-py `TENSOR_NAMES` for MODEL_ARCH.QWEN2).
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@dataclass(frozen=True)
class LLMDims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "LLMDims":
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]), num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_key_value_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
                rope_theta=float(cfg.get("rope_theta", 1e6)), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise InvalidInputError(f"config.json lacks the LLM key {e}; is this a MiniCPM-o checkpoint?") from e

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def tensor_map(dims: LLMDims) -> dict[str, str]:
    """Checkpoint name -> GGUF name for every LLM tensor, in the order they are written."""
    out = {LLM_PREFIX + "model.embed_tokens.weight": "token_embd.weight"}
    for i in range(dims.num_hidden_layers):
        for hf, gg in _LAYER_NAMES.items():
            out[f"{LLM_PREFIX}model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    out[LLM_PREFIX + "model.norm.weight"] = "output_norm.weight"
    if not dims.tie_word_embeddings:
        out[LLM_PREFIX + "lm_head.weight"] = "output.weight"
    return out


# `convert_hf_to_gguf.py` `does_token_look_special`: added tokens that are CONTROL whatever their `special` flag.
_LOOKS_SPECIAL_EXACT = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
_LOOKS_SPECIAL_AFFIXES = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))


def looks_special(token: str) -> bool:
    return token in _LOOKS_SPECIAL_EXACT or any(token.startswith(a) and token.endswith(b)
                                                for a, b in _LOOKS_SPECIAL_AFFIXES)


@dataclass
class TokenizerData:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # every added token -> id
    chat_template: str | None
    template_variables: dict  # bos_token, eos_token, ... (edge.chat_template.template_variables)
    skipped_in_text: list[int]  # the `special` added tokens: what HF's decode(skip_special_tokens=True) drops


def read_tokenizer(root: Path, vocab_size: int) -> TokenizerData:
    """Read the HF Qwen2 tokenizer files; ids missing below `vocab_size` become unused `[PAD{i}]` tokens
    (as llama.cpp's converter does), so the token list always matches the embedding rows."""
    import gguf

    tj_path = root / "tokenizer.json"
    if not tj_path.is_file():
        raise ModelFilesNotFoundError(f"{tj_path} is missing: the checkpoint has no tokenizer.", str(tj_path))
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise CorruptModelFileError(f"{tj_path}: expected a BPE tokenizer, found {model.get('type')}.", str(tj_path))
    tc_path = root / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    added = {int(i): v["content"] for i, v in tc.get("added_tokens_decoder", {}).items()}
    special = {int(i) for i, v in tc.get("added_tokens_decoder", {}).items() if v.get("special", True)}
    for t in tj.get("added_tokens", []):
        if int(t["id"]) not in added:
            added[int(t["id"])] = t["content"]
            if t.get("special", True):
                special.add(int(t["id"]))
    by_id: dict[int, str] = {int(i): s for s, i in model["vocab"].items()}
    by_id.update(added)
    if max(by_id) >= vocab_size:
        raise CorruptModelFileError(
            f"tokenizer has id {max(by_id)} but the LLM vocab_size is {vocab_size}: tokenizer and weights differ.")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i not in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(by_id[i])
            control = i in special or looks_special(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    from edge.chat_template import template_variables

    return TokenizerData(tokens, types, merges, {s: i for i, s in added.items()}, tc.get("chat_template"),
                         template_variables(tc), sorted(special))


def _gguf_dtype(quant: str, gguf_name: str, ndim: int):
    """Storage type of one tensor in the base file: 1-D tensors (norms, biases) stay F32 as llama.cpp does."""
    import gguf

    if ndim == 1 or quant == "f32":
        return gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.BF16  # exact copy of the bf16 checkpoint, quantized afterwards


def _stored(ckpt: Checkpoint, name: str, qtype) -> np.ndarray:
    import gguf

    info = ckpt.tensors[name]
    if qtype == gguf.GGMLQuantizationType.BF16:
        if info.dtype == "BF16":
            return np.ascontiguousarray(ckpt.raw(name))
        from converters.checkpoint import f32_to_bf16_bits
        return f32_to_bf16_bits(ckpt.f32(name))
    x = ckpt.f32(name)
    return x.astype(np.float16) if qtype == gguf.GGMLQuantizationType.F16 else np.ascontiguousarray(x)


def write_base_gguf(ckpt: Checkpoint, path: Path, quant: str, *, progress: bool = True) -> None:
    """Write the unquantized GGUF (F32, F16 or exact BF16), streaming one tensor at a time."""
    import gguf
    from tqdm import tqdm

    dims = LLMDims.from_config(ckpt.config)
    names = tensor_map(dims)
    ckpt.require(list(names))
    tok = read_tokenizer(ckpt.root, dims.vocab_size)

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("MiniCPM-o-2.6 LLM")
    w.add_context_length(dims.max_position_embeddings)
    w.add_embedding_length(dims.hidden_size)
    w.add_block_count(dims.num_hidden_layers)
    w.add_feed_forward_length(dims.intermediate_size)
    w.add_head_count(dims.num_attention_heads)
    w.add_head_count_kv(dims.num_key_value_heads)
    w.add_rope_freq_base(dims.rope_theta)
    w.add_layer_norm_rms_eps(dims.rms_norm_eps)
    w.add_file_type(_FTYPE["bf16" if quant not in ("f32", "f16") else quant])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.token_types)
    w.add_token_merges(tok.merges)
    # bos/eos/unk/pad ids, add_bos/add_eos and the chat template, exactly as llama.cpp's converter writes them.
    gguf.SpecialVocab(ckpt.root, load_merges=False, n_vocab=dims.vocab_size).add_to_gguf(w, quiet=True)

    plan = []
    for src, dst in names.items():
        info = ckpt.tensors[src]
        qtype = _gguf_dtype(quant, dst, len(info.shape))
        np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                    gguf.GGMLQuantizationType.BF16: np.uint16}[qtype]
        nbytes = int(np.prod(info.shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(dst, info.shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype)
        plan.append((src, qtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for src, qtype in tqdm(plan, desc=f"llm.gguf ({quant if quant in ('f32', 'f16') else 'bf16 base'})",
                           unit="tensor", disable=not progress):
        w.write_tensor_data(_stored(ckpt, src, qtype))
    w.close()


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int = 0) -> None:
    """Quantize with llama.cpp's own quantizer (`llama_model_quantize`), not a re-implementation."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _FTYPE[quant]
    params.nthread = threads or (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {quant}) failed with code {rc}")


def export(ckpt: Checkpoint, out_dir: Path, *, quant: str = "q4_k_m", progress: bool = True, threads: int = 0):
    """Write `llm.gguf` into out_dir and return its BundlePart (meta: quant, dims, special token ids)."""
    from edge.bundle import BundleFile, BundlePart

    if quant not in QUANTS:
        raise InvalidInputError(f"--llm-quant {quant!r} is not one of {', '.join(QUANTS)}.")
    out_dir = Path(out_dir)
    final = out_dir / keys.LLM_GGUF
    tmp = out_dir / (keys.LLM_GGUF + ".incomplete")
    if quant in ("f32", "f16"):
        write_base_gguf(ckpt, tmp, quant, progress=progress)
    else:
        base = out_dir / "llm.bf16.gguf.incomplete"
        try:
            write_base_gguf(ckpt, base, quant, progress=progress)
            if progress:
                print(f"quantizing llm.gguf to {quant} with llama.cpp ...", flush=True)
            quantize_gguf(base, tmp, quant, threads=threads)
        finally:
            base.unlink(missing_ok=True)
    tmp.replace(final)
    dims = LLMDims.from_config(ckpt.config)
    tok = read_tokenizer(ckpt.root, dims.vocab_size)
    return BundlePart(
        files={"model": BundleFile.describe(out_dir, keys.LLM_GGUF)},
        meta={"quant": quant, "dims": vars(dims),
              "special_tokens": {s: tok.special_ids[s] for s in keys.RUNTIME_SPECIAL_TOKENS if s in tok.special_ids},
              keys.LLM_META_CHAT_TEMPLATE: tok.chat_template,
              keys.LLM_META_TEMPLATE_VARIABLES: tok.template_variables,
              keys.LLM_META_SKIPPED_IN_TEXT: tok.skipped_in_text},
    )
