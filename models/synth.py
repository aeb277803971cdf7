"""Synthetic MiniCPM-o 2.6 checkpoints in the exact `openbmb/MiniCPM-o-2_6` layout, with random weights.

Why: the real 8B checkpoint cannot be downloaded on every machine (or in CI), but converters, the runtime and the
benchmarks must see the same files, names, shapes and dtypes. `build_synthetic_checkpoint(out, "tiny")` gives a
~64 MB checkpoint with the golden fixture's dims (tests, ~2 s); `"full"` gives the real dims (Qwen2.5-7B,
SigLIP-400M, Whisper-medium encoder, ChatTTS-200M; 8.7 B parameters, 17.4 GB of BF16, ~4 min) for benchmarks.

Layout written (as the official repository): config.json, generation_config.json, preprocessor_config.json, the
LLM tokenizer files (models/tokenizers.py), model-0000i-of-0000n.safetensors shards (a single model.safetensors
when everything fits one shard) + model.safetensors.index.json, assets/chattts_tokenizer/, assets/Vocos.pt.

Weights: each tensor is drawn from its own PCG64 stream seeded by sha256(seed, file, tensor name), so values do
not depend on write order or chunking: N(0, 0.02) (the config's initializer_range) for weights, biases and
embeddings; 1 + N(0, 0.02) for normalization weights; U(0, 1) for the DVAE output scale (ChatTTS init). Tensors
that are fixed functions in the real model are computed, not random: the Whisper sinusoidal position table, the
weight-norm magnitudes `original0` (= row norms of `original1`, as torch's weight_norm initialises them), and in
Vocos.pt the periodic Hann windows and the HTK mel filterbank. Everything is rounded to BF16 (round to nearest even).
Shards are written header first, then tensor by tensor in chunks, so memory stays bounded at any scale
(measured full build: peak RSS 340 MB, most of it the torch import).

Vocabulary gap: the synthetic BPE has 652 ids (590 BPE + 62 added tokens) at both scales; the LLM embedding has
`vocab_size` rows (652 tiny, 151700 full), every tokenizer id is < vocab_size and the remaining rows are simply
never indexed (a GGUF converter pads them as unused tokens). Likewise the ChatTTS vocab has 174 entries and
`num_text_tokens` rows (174 tiny, 21178 full).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from converters.checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, bf16_bits_to_f32, f32_to_bf16_bits
from edge.errors import InvalidInputError
from models import tokenizers as toks


# --- dims -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMDims:
    """Qwen2 backbone (config.json top level)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab_size: int  # embedding / lm_head rows
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768


@dataclass(frozen=True)
class VisionDims:
    """SigLIP NaViT (`vpm`); position table (image_size / patch)^2 entries."""

    hidden: int
    ffn: int
    heads: int
    layers: int
    patch: int = 14
    image_size: int = 980


@dataclass(frozen=True)
class AudioDims:
    """Whisper encoder (`apm`); the decoder entries only appear in config.json (no decoder weights ship)."""

    d_model: int
    layers: int
    heads: int
    ffn: int
    decoder_layers: int
    decoder_heads: int
    decoder_ffn: int
    num_mel_bins: int = 80
    max_source_positions: int = 1500


@dataclass(frozen=True)
class TTSDims:
    """ConditionalChatTTS Llama backbone and embeddings (config.json tts_config)."""

    hidden: int
    ffn: int
    heads: int
    layers: int
    num_text_tokens: int
    num_vq: int = 4
    num_audio_tokens: int = 626  # 625 codes + eos
    num_mel_bins: int = 100
    max_position_embeddings: int = 4096
    backbone_vocab: int = 32000  # LlamaConfig default: `tts.model.embed_tokens` rows (unused, but shipped)


@dataclass(frozen=True)
class SynthDims:
    """All dims of one synthetic scale; shard_bytes = max bytes of a safetensors shard."""

    name: str
    llm: LLMDims
    vision: VisionDims
    audio: AudioDims
    tts: TTSDims
    shard_bytes: int
    query_num: int = 64

    def __post_init__(self):
        # spec §10: the resampler uses hidden // 128 heads; the projector input is encoder_ffn_dim // 4 (spec §1.6).
        assert self.llm.hidden % RESAMPLER_HEAD_DIM == 0, "LLM hidden must be a multiple of 128 (resampler heads)"
        assert self.llm.hidden % self.llm.heads == 0 and self.llm.heads % self.llm.kv_heads == 0
        assert self.audio.ffn // 4 == self.audio.d_model, "projector input (encoder_ffn_dim // 4) must be d_model"


RESAMPLER_HEAD_DIM = 128
# tiny: the golden fixture's dims (shared/golden/README.md "Checkpoint"); 16 MiB shards split it into 3 files so
# that tests exercise the sharded index path.
TINY = SynthDims("tiny", LLMDims(256, 2, 4, 2, 512, 652), VisionDims(32, 64, 2, 2), AudioDims(32, 2, 2, 128, 2, 2, 128),
                 TTSDims(32, 64, 2, 2, 174), shard_bytes=16 * 2**20)
# full: spec §1.2-1.7; shards of at most 5 GB (transformers' default max_shard_size, as in the official repo).
FULL = SynthDims("full", LLMDims(3584, 28, 28, 4, 18944, 151700), VisionDims(1152, 4304, 16, 27),
                 AudioDims(1024, 24, 16, 4096, 24, 16, 4096), TTSDims(768, 3072, 12, 20, 21178), shard_bytes=5 * 10**9)
SCALES = {"tiny": TINY, "full": FULL}

# DVAE and Vocos sizes are hard-coded in the official code (spec §1.7), identical at every scale.
DVAE_IDIM, DVAE_HIDDEN, DVAE_BN, DVAE_LAYERS, DVAE_KERNEL = 512, 256, 128, 12, 7
DVAE_ENC_ODIM, DVAE_DEC_ODIM, GFSQ_GROUPS, GFSQ_LEVELS, DVAE_DOWN_KERNEL = 1024, 512, 2, 4, 4
VOCOS_MELS, VOCOS_DIM, VOCOS_FFN, VOCOS_LAYERS, VOCOS_KERNEL = 100, 512, 1536, 8, 7
VOCOS_N_FFT, VOCOS_SR = 1024, 24000
WHISPER_MAX_TIMESCALE = 10000  # HF WhisperEncoder sinusoids()

INIT_STD = 0.02  # config initializer_range
CHUNK_ELEMS = 1 << 22  # values generated / converted / written per step (16 MB of float32)
VOCOS_FILE = Path("assets") / "Vocos.pt"
TRANSFORMERS_VERSION = "4.44.2"  # what the official files were saved with


class TensorSpec(NamedTuple):
    name: str
    shape: tuple[int, ...]
    init: str = "auto"  # auto | normal | ones | uniform | sinusoid | row_norm (of name[:-1] + "1") | hann | mel_fb

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * 2  # BF16


# --- tensor names and shapes ----------------------------------------------------------------------------------------
def _lin(prefix: str, out: int, inp: int, bias: bool = True) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (out, inp))] + ([TensorSpec(f"{prefix}.bias", (out,))] if bias else [])


def _ln(prefix: str, dim: int, bias: bool = True) -> list[TensorSpec]:
    return [TensorSpec(f"{prefix}.weight", (dim,))] + ([TensorSpec(f"{prefix}.bias", (dim,))] if bias else [])


def _llm(d: LLMDims) -> list[TensorSpec]:
    h, kv = d.hidden, d.kv_heads * (d.hidden // d.heads)
    out = [TensorSpec("llm.model.embed_tokens.weight", (d.vocab_size, h))]
    for i in range(d.layers):
        p = f"llm.model.layers.{i}"
        out += _lin(f"{p}.self_attn.q_proj", h, h) + _lin(f"{p}.self_attn.k_proj", kv, h)
        out += _lin(f"{p}.self_attn.v_proj", kv, h) + _lin(f"{p}.self_attn.o_proj", h, h, bias=False)
        out += _lin(f"{p}.mlp.gate_proj", d.ffn, h, False) + _lin(f"{p}.mlp.up_proj", d.ffn, h, False)
        out += _lin(f"{p}.mlp.down_proj", h, d.ffn, False)
        out += _ln(f"{p}.input_layernorm", h, False) + _ln(f"{p}.post_attention_layernorm", h, False)
    return out + _ln("llm.model.norm", h, False) + _lin("llm.lm_head", d.vocab_size, h, False)


def _vision(d: VisionDims) -> list[TensorSpec]:
    c, grid = d.hidden, d.image_size // d.patch
    out = [TensorSpec("vpm.embeddings.patch_embedding.weight", (c, 3, d.patch, d.patch)),
           TensorSpec("vpm.embeddings.patch_embedding.bias", (c,)),
           TensorSpec("vpm.embeddings.position_embedding.weight", (grid * grid, c))]
    for i in range(d.layers):
        p = f"vpm.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out += _lin(f"{p}.self_attn.{proj}", c, c)
        out += _ln(f"{p}.layer_norm1", c) + _lin(f"{p}.mlp.fc1", d.ffn, c) + _lin(f"{p}.mlp.fc2", c, d.ffn)
        out += _ln(f"{p}.layer_norm2", c)
    return out + _ln("vpm.post_layernorm", c)


def _resampler(e: int, kv_dim: int, queries: int) -> list[TensorSpec]:
    return [TensorSpec("resampler.query", (queries, e)), *_lin("resampler.kv_proj", e, kv_dim, False),
            TensorSpec("resampler.attn.in_proj_weight", (3 * e, e)),
            TensorSpec("resampler.attn.in_proj_bias", (3 * e,)),
            *_lin("resampler.attn.out_proj", e, e), *_ln("resampler.ln_q", e), *_ln("resampler.ln_kv", e),
            *_ln("resampler.ln_post", e), TensorSpec("resampler.proj", (e, e))]


def _audio(d: AudioDims, llm_hidden: int) -> list[TensorSpec]:
    m = d.d_model
    out = [TensorSpec("apm.conv1.weight", (m, d.num_mel_bins, 3)), TensorSpec("apm.conv1.bias", (m,)),
           TensorSpec("apm.conv2.weight", (m, m, 3)), TensorSpec("apm.conv2.bias", (m,)),
           TensorSpec("apm.embed_positions.weight", (d.max_source_positions, m), "sinusoid")]
    for i in range(d.layers):
        p = f"apm.layers.{i}"
        out += _lin(f"{p}.self_attn.k_proj", m, m, False) + _lin(f"{p}.self_attn.v_proj", m, m)
        out += _lin(f"{p}.self_attn.q_proj", m, m) + _lin(f"{p}.self_attn.out_proj", m, m)
        out += _ln(f"{p}.self_attn_layer_norm", m) + _lin(f"{p}.fc1", d.ffn, m) + _lin(f"{p}.fc2", m, d.ffn)
        out += _ln(f"{p}.final_layer_norm", m)
    out += _ln("apm.layer_norm", m)
    return (out + _lin("audio_projection_layer.linear1", llm_hidden, d.ffn // 4)
            + _lin("audio_projection_layer.linear2", llm_hidden, llm_hidden))


def _dvae_coder(p: str, odim: int) -> list[TensorSpec]:
    h = DVAE_HIDDEN
    out = [TensorSpec(f"{p}.conv_in.0.weight", (DVAE_BN, DVAE_IDIM, 3)), TensorSpec(f"{p}.conv_in.0.bias", (DVAE_BN,)),
           TensorSpec(f"{p}.conv_in.2.weight", (h, DVAE_BN, 3)), TensorSpec(f"{p}.conv_in.2.bias", (h,))]
    for j in range(DVAE_LAYERS):
        b = f"{p}.decoder_block.{j}"
        out += [TensorSpec(f"{b}.dwconv.weight", (h, 1, DVAE_KERNEL)), TensorSpec(f"{b}.dwconv.bias", (h,))]
        out += _ln(f"{b}.norm", h) + _lin(f"{b}.pwconv1", 4 * h, h) + _lin(f"{b}.pwconv2", h, 4 * h)
        out += [TensorSpec(f"{b}.coef", (h,), "normal")]
    return out + [TensorSpec(f"{p}.conv_out.weight", (odim, h, 1))]


def _tts(d: TTSDims, llm_hidden: int) -> list[TensorSpec]:
    t = d.hidden
    out = _lin("tts.projector.linear1", t, llm_hidden) + _lin("tts.projector.linear2", t, t)
    out += [TensorSpec(f"tts.emb_code.{q}.weight", (d.num_audio_tokens, t)) for q in range(d.num_vq)]
    out += [TensorSpec("tts.emb_text.weight", (d.num_text_tokens, t))]
    for q in range(d.num_vq):
        p = f"tts.head_code.{q}.parametrizations.weight"
        out += [TensorSpec(f"{p}.original0", (d.num_audio_tokens, 1), "row_norm"),
                TensorSpec(f"{p}.original1", (d.num_audio_tokens, t))]
    out += [TensorSpec("tts.model.embed_tokens.weight", (d.backbone_vocab, t))]
    for i in range(d.layers):
        p = f"tts.model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out += _lin(f"{p}.self_attn.{proj}", t, t, False)
        out += _lin(f"{p}.mlp.gate_proj", d.ffn, t, False) + _lin(f"{p}.mlp.up_proj", d.ffn, t, False)
        out += _lin(f"{p}.mlp.down_proj", t, d.ffn, False)
        out += _ln(f"{p}.input_layernorm", t, False) + _ln(f"{p}.post_attention_layernorm", t, False)
    out += _ln("tts.model.norm", t, False)
    out += [TensorSpec("tts.dvae.coef", (1, d.num_mel_bins, 1), "uniform"),
            TensorSpec("tts.dvae.downsample_conv.0.weight", (DVAE_IDIM, d.num_mel_bins, 3)),
            TensorSpec("tts.dvae.downsample_conv.0.bias", (DVAE_IDIM,)),
            TensorSpec("tts.dvae.downsample_conv.2.weight", (DVAE_IDIM, DVAE_IDIM, DVAE_DOWN_KERNEL)),
            TensorSpec("tts.dvae.downsample_conv.2.bias", (DVAE_IDIM,))]
    out += _dvae_coder("tts.dvae.encoder", DVAE_ENC_ODIM) + _dvae_coder("tts.dvae.decoder", DVAE_DEC_ODIM)
    out += [TensorSpec("tts.dvae.out_conv.weight", (d.num_mel_bins, DVAE_IDIM, 3))]
    group_dim = DVAE_ENC_ODIM // GFSQ_GROUPS
    for g in range(GFSQ_GROUPS):
        p = f"tts.dvae.vq_layer.quantizer.rvqs.{g}"
        out += _lin(f"{p}.project_in", GFSQ_LEVELS, group_dim) + _lin(f"{p}.project_out", group_dim, GFSQ_LEVELS)
    return out


def tensor_specs(dims: SynthDims) -> list[TensorSpec]:
    """Every tensor of the official model.safetensors set, in module order (llm, vpm, resampler, apm, projector,
    tts): the order transformers would shard them in."""
    return (_llm(dims.llm) + _vision(dims.vision) + _resampler(dims.llm.hidden, dims.vision.hidden, dims.query_num)
            + _audio(dims.audio, dims.llm.hidden) + _tts(dims.tts, dims.llm.hidden))


def vocos_specs() -> list[TensorSpec]:
    """The Vocos state_dict of assets/Vocos.pt, in its module order."""
    n_freq, dim = VOCOS_N_FFT // 2 + 1, VOCOS_DIM
    out = [TensorSpec("feature_extractor.mel_spec.spectrogram.window", (VOCOS_N_FFT,), "hann"),
           TensorSpec("feature_extractor.mel_spec.mel_scale.fb", (n_freq, VOCOS_MELS), "mel_fb"),
           TensorSpec("backbone.embed.weight", (dim, VOCOS_MELS, VOCOS_KERNEL)),
           TensorSpec("backbone.embed.bias", (dim,)),
           *_ln("backbone.norm", dim)]
    for i in range(VOCOS_LAYERS):
        p = f"backbone.convnext.{i}"
        out += [TensorSpec(f"{p}.gamma", (dim,), "normal"), TensorSpec(f"{p}.dwconv.weight", (dim, 1, VOCOS_KERNEL)),
                TensorSpec(f"{p}.dwconv.bias", (dim,)), *_ln(f"{p}.norm", dim), *_lin(f"{p}.pwconv1", VOCOS_FFN, dim),
                *_lin(f"{p}.pwconv2", dim, VOCOS_FFN)]
    return (out + _ln("backbone.final_layer_norm", dim) + _lin("head.out", VOCOS_N_FFT + 2, dim)
            + [TensorSpec("head.istft.window", (VOCOS_N_FFT,), "hann")])


# --- values ---------------------------------------------------------------------------------------------------------
def _init_kind(spec: TensorSpec) -> str:
    if spec.init != "auto":
        return spec.init
    parts = spec.name.split(".")
    module = parts[-2] if len(parts) > 1 else ""
    return "ones" if parts[-1] == "weight" and ("norm" in module or module.startswith("ln_")) else "normal"


def _rng(seed: int, key: str) -> np.random.Generator:
    words = struct.unpack("<4Q", hashlib.sha256(f"{seed}\0{key}".encode()).digest())
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(words))))


def _whisper_sinusoids(length: int, channels: int) -> np.ndarray:
    inc = math.log(WHISPER_MAX_TIMESCALE) / (channels // 2 - 1)
    t = np.arange(length, dtype=np.float64)[:, None] * np.exp(-inc * np.arange(channels // 2))[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def _hann(n: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window default)."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def _htk_mel_fb(n_freqs: int, n_mels: int, sample_rate: int) -> np.ndarray:
    """(n_freqs, n_mels) triangular filterbank, HTK mel scale, no norm (torchaudio MelSpectrogram defaults)."""
    hz_to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel_to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    freqs = np.linspace(0, sample_rate // 2, n_freqs)
    f_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    slopes = f_pts[None, :] - freqs[:, None]
    down, up = -slopes[:, :-2] / np.diff(f_pts)[:-1], slopes[:, 2:] / np.diff(f_pts)[1:]
    return np.maximum(0.0, np.minimum(down, up))


def _values(spec: TensorSpec, seed: int, prefix: str, specs: dict[str, TensorSpec]) -> Iterator[np.ndarray]:
    """float32 values of one tensor, flattened in C order, at most CHUNK_ELEMS at a time. Random tensors use one
    stream per (seed, prefix + name), so a tensor's values never depend on which tensors come before it."""
    kind, n = _init_kind(spec), math.prod(spec.shape)
    if kind in ("normal", "ones", "uniform"):
        rng = _rng(seed, prefix + spec.name)
        for start in range(0, n, CHUNK_ELEMS):
            m = min(CHUNK_ELEMS, n - start)
            if kind == "uniform":
                yield rng.random(m, dtype=np.float32)
                continue
            x = rng.standard_normal(m, dtype=np.float32)
            x *= np.float32(INIT_STD)
            if kind == "ones":
                x += np.float32(1.0)
            yield x
    elif kind == "row_norm":  # weight-norm magnitude g = ||v|| per output row, v = the stored (BF16) original1
        v_spec = specs[spec.name[:-1] + "1"]
        v = np.concatenate([bf16_bits_to_f32(f32_to_bf16_bits(c)) for c in _values(v_spec, seed, prefix, specs)])
        yield np.linalg.norm(v.reshape(v_spec.shape[0], -1).astype(np.float64), axis=1).astype(np.float32)
    else:
        fixed = {"sinusoid": lambda: _whisper_sinusoids(*spec.shape), "hann": lambda: _hann(spec.shape[0]),
                 "mel_fb": lambda: _htk_mel_fb(spec.shape[0], spec.shape[1], VOCOS_SR)}[kind]()
        yield np.ascontiguousarray(fixed, dtype=np.float32).ravel()


def _bf16_tensor(spec: TensorSpec, seed: int, prefix: str, specs: dict[str, TensorSpec]) -> np.ndarray:
    """A whole (small) tensor as BF16 bits with its shape, for Vocos.pt and tests."""
    return np.concatenate([f32_to_bf16_bits(c) for c in _values(spec, seed, prefix, specs)]).reshape(spec.shape)


# --- writers --------------------------------------------------------------------------------------------------------
WEIGHTS_KEY = "model.safetensors/"  # RNG key prefixes: one namespace per file family
VOCOS_KEY = "assets/Vocos.pt/"
PROGRESS_EVERY_S = 5.0


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.t0 = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= PROGRESS_EVERY_S or self.done == self.total):
            self.last = now
            print(f"synth: {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB ({100 * self.done / self.total:.0f}%), "
                  f"{now - self.t0:.0f} s", file=sys.stderr, flush=True)


def _write_safetensors(path: Path, specs: list[TensorSpec], seed: int, all_specs: dict[str, TensorSpec],
                       progress: _Progress) -> None:
    """safetensors = u64 header length, JSON header (names sorted, offsets into the data, space-padded to 8 bytes),
    then the raw little-endian tensor data in header order. Tensors are streamed chunk by chunk."""
    ordered = sorted(specs, key=lambda s: s.name)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in ordered:
        header[s.name] = {"dtype": "BF16", "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for s in ordered:
            for chunk in _values(s, seed, WEIGHTS_KEY, all_specs):
                bits = f32_to_bf16_bits(chunk)
                f.write(memoryview(bits))
                progress.add(bits.nbytes)
        assert f.tell() == 8 + len(head) + offset, f"{path}: wrote {f.tell()} bytes, expected {8 + len(head) + offset}"


def _plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy in module order, like transformers' shard_checkpoint: start a new shard when the next tensor would
    overflow the current one."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _write_weights(root: Path, dims: SynthDims, seed: int, progress: bool) -> None:
    specs = tensor_specs(dims)
    by_name = {s.name: s for s in specs}
    assert len(by_name) == len(specs), "duplicate tensor names"
    shards = _plan_shards(specs, dims.shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(s.nbytes for s in specs)
    prog = _Progress(total, progress)
    weight_map = {}
    for fname, shard in zip(names, shards):
        _write_safetensors(root / fname, shard, seed, by_name, prog)
        weight_map.update({s.name: fname for s in shard})
    toks.write_json(root / INDEX_FILE,
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _write_vocos(path: Path, seed: int) -> None:
    """assets/Vocos.pt: the Vocos state_dict, BF16 like the golden fixture, saved with torch.save. torch.save is
    byte-deterministic here: zip entries carry a fixed 1980 timestamp, storages are numbered in order, and
    `.data/serialization_id` is a hash of the record names and data. The zip's root folder is the file stem
    ("Vocos"), so the file is written under its final name."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("writing assets/Vocos.pt needs torch: `pip install torch==2.13.0`") from e
    specs = vocos_specs()
    by_name = {s.name: s for s in specs}
    state = {s.name: torch.from_numpy(_bf16_tensor(s, seed, VOCOS_KEY, by_name)).view(torch.bfloat16) for s in specs}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


# --- config files ---------------------------------------------------------------------------------------------------
# Values of the official config that are not dims (spec §1.2-1.7, golden config.json).
SLICE_CONFIG = {"max_slice_nums": 9, "model_type": "minicpmv", "patch_size": 14, "scale_resolution": 448}
QWEN2_SLIDING_WINDOW = 131072  # Qwen2.5-7B config (unused: use_sliding_window false)
WHISPER_TEXT_VOCAB, WHISPER_MAX_TARGET_POSITIONS = 51865, 448  # whisper-medium config (decoder side, unused)
TTS_STREAMING = {"streaming_text_reserved_len": 300, "streaming_text_chunk_size": 10, "streaming_audio_chunk_size": 50}
WHISPER_FEATURES = {"chunk_length": 30, "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
                    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
                    "sampling_rate": 16000}


def model_config(dims: SynthDims, tts_ids: dict[str, int], seed: int) -> dict:
    """config.json: every key of the official MiniCPMOConfig file, dims from `dims`."""
    llm, v, a, t = dims.llm, dims.vision, dims.audio, dims.tts
    return {
        "_name_or_path": f"synthetic-{dims.name}-seed{seed}",  # not openbmb/...: random weights, say so
        "architectures": ["MiniCPMO"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMOConfig", "AutoModel": "modeling_minicpmo.MiniCPMO",
                     "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO"},
        "model_type": "minicpmo", "version": 2.6,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "hidden_act": "silu",
        "initializer_range": INIT_STD, "max_position_embeddings": llm.max_position_embeddings,
        "max_window_layers": llm.layers, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "sliding_window": QWEN2_SLIDING_WINDOW, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False,
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden, "intermediate_size": llm.ffn,
        "num_hidden_layers": llm.layers, "num_attention_heads": llm.heads, "num_key_value_heads": llm.kv_heads,
        "batch_vision_input": True, "drop_vision_last_layer": False, "image_size": SLICE_CONFIG["scale_resolution"],
        "patch_size": v.patch, "query_num": dims.query_num, "slice_mode": True, "use_image_id": True,
        "vision_batch_size": 16,
        "slice_config": dict(SLICE_CONFIG, patch_size=v.patch),
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": v.hidden, "intermediate_size": v.ffn,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "patch_size": v.patch,
                          "image_size": v.image_size},
        "audio_chunk_length": 1.0, "audio_pool_step": 2, "chunk_input": True, "listen_speak_type": "asr",
        "stream_input": False, "init_vision": True, "init_audio": True, "init_tts": True,
        "audio_config": {
            "model_type": "whisper", "architectures": ["MiniCPMWhisperEncoder"],
            "max_source_positions": a.max_source_positions, "max_target_positions": WHISPER_MAX_TARGET_POSITIONS,
            "vocab_size": WHISPER_TEXT_VOCAB, "activation_function": "gelu", "scale_embedding": False,
            "d_model": a.d_model, "encoder_layers": a.layers, "encoder_attention_heads": a.heads,
            "encoder_ffn_dim": a.ffn, "decoder_layers": a.decoder_layers, "decoder_attention_heads": a.decoder_heads,
            "decoder_ffn_dim": a.decoder_ffn, "num_mel_bins": a.num_mel_bins},
        "tts_config": {
            "model_type": "conditional_chattts", "llm_dim": llm.hidden,
            "max_position_embeddings": t.max_position_embeddings, "num_text_tokens": t.num_text_tokens,
            "audio_bos_token_id": tts_ids[toks.TTS_AUDIO_BOS], "text_eos_token_id": tts_ids[toks.TTS_TEXT_EOS],
            "spk_emb_token_id": tts_ids[toks.TTS_SPK_EMB], "num_spk_embs": 1, **TTS_STREAMING,
            "attn_implementation": "sdpa", "hidden_size": t.hidden, "intermediate_size": t.ffn,
            "num_attention_heads": t.heads, "num_hidden_layers": t.layers, "num_vq": t.num_vq,
            "num_audio_tokens": t.num_audio_tokens, "num_mel_bins": t.num_mel_bins},
        "transformers_version": TRANSFORMERS_VERSION,
    }


def preprocessor_config(dims: SynthDims) -> dict:
    """preprocessor_config.json: MiniCPMVImageProcessor + WhisperFeatureExtractor settings (spec §2)."""
    return {
        "image_processor_type": "MiniCPMVImageProcessor", "feature_extractor_type": "WhisperFeatureExtractor",
        "auto_map": {"AutoProcessor": "processing_minicpmo.MiniCPMOProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "processor_class": "MiniCPMOProcessor",
        "max_slice_nums": SLICE_CONFIG["max_slice_nums"], "scale_resolution": SLICE_CONFIG["scale_resolution"],
        "patch_size": dims.vision.patch, "use_image_id": True, "image_feature_size": dims.query_num,
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": 2.6,
        **WHISPER_FEATURES, "feature_size": dims.audio.num_mel_bins,
    }


# --- entry point ----------------------------------------------------------------------------------------------------
DISK_MARGIN = 1.05  # free space required: 5 % over the expected size


def build_synthetic_checkpoint(out_dir: str | Path, scale: str = "tiny", seed: int = 0, progress: bool = True, *,
                               overwrite: bool = False) -> Path:
    """Write a synthetic checkpoint (official MiniCPM-o 2.6 layout, random BF16 weights) to out_dir; same
    (scale, seed) -> same bytes. Built in a sibling `.<name>.incomplete` directory and renamed at the end, so
    out_dir is either absent or complete. overwrite=True replaces an existing checkpoint directory."""
    if scale not in SCALES:
        raise InvalidInputError(f"unknown scale {scale!r}: use one of {', '.join(SCALES)}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed!r}.")
    dims, seed, out = SCALES[scale], int(seed), Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InvalidInputError(f"{out} already exists and is not empty: choose a new directory, remove it, "
                                    "or pass overwrite=True.")
        if not (out / CONFIG_FILE).is_file():
            raise InvalidInputError(f"{out} exists but is not a checkpoint directory (no {CONFIG_FILE}); refusing to "
                                    "overwrite it. Remove it yourself or choose another directory.")
    tmp = out.with_name(f".{out.name}.incomplete")
    if tmp.exists():
        shutil.rmtree(tmp)  # a previous interrupted build of ours
    tmp.mkdir(parents=True)
    try:
        need = sum(s.nbytes for s in tensor_specs(dims)) + sum(s.nbytes for s in vocos_specs())
        free = shutil.disk_usage(tmp).free
        if free < need * DISK_MARGIN:
            raise OSError(errno.ENOSPC, f"the {scale} checkpoint needs {need / 1e9:.1f} GB but {tmp.parent} has "
                          f"{free / 1e9:.1f} GB free. Free some space or choose another directory.")
        llm_tok = toks.write_qwen2_tokenizer(tmp, bpe_vocab_size=toks.BPE_VOCAB_SIZE)
        tts_tok = toks.write_chattts_tokenizer(tmp)
        assert llm_tok.size <= dims.llm.vocab_size and tts_tok.size <= dims.tts.num_text_tokens
        toks.write_json(tmp / CONFIG_FILE, model_config(dims, tts_tok.ids, seed))
        toks.write_json(tmp / "generation_config.json",
                        {"bos_token_id": None, "eos_token_id": None, "transformers_version": TRANSFORMERS_VERSION})
        toks.write_json(tmp / "preprocessor_config.json", preprocessor_config(dims))
        _write_vocos(tmp / VOCOS_FILE, seed)
        _write_weights(tmp, dims, seed, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
    os.replace(tmp, out)
    return out
