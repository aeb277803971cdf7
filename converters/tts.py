"""Export the MiniCPM-o 2.6 TTS (ConditionalChatTTS + DVAE decoder + Vocos) to ONNX graphs and numpy tables.

What is written (under `tts/` in the bundle; roles/names are owned by edge/tts/backbone.py and decoder.py):
- backbone.{fp32,int8}.onnx: the 20-layer Llama of `tts.model` with explicit past keys/values in, the new
  positions' keys/values out, an additive attention mask and position ids in; works for n-token prefill and 1-token
  steps, with any past length (0 included). Attention is split into a past part and a new part so the graph never
  concatenates (copies) the cache.
- projector.fp32.onnx: `tts.projector` (Linear-ReLU-Linear) + L2 normalisation, as `merge_inputs_embeds` does.
  The graph also applies the 4 `head_code` projections to the last position (weights = the weight-norm fold
  g * v / ||v|| per output row, computed with torch's own `_weight_norm`): in-graph they are quantised with the
  rest and avoid numpy/OpenBLAS threads fighting onnxruntime's on small machines.
- emb_text.npy, emb_code.npy: embedding tables looked up in numpy.
- dvae.{fp32,int8}.onnx: GFSQ code embedding -> DVAEDecoder -> out_conv -> * coef (the decode path only).
- vocos.{fp32,int8}.onnx: VocosBackbone + ISTFTHead linear, exp/clip magnitude, cos/sin phase (ISTFT in numpy).
- istft_window.npy: `head.istft.window` from `assets/Vocos.pt` (never recomputed, spec §10).
- tokenizer/: copy of `assets/chattts_tokenizer/`.

Every graph is built from plain torch modules written here (not the official classes) and checked against
onnxruntime on a probe input at export time; int8 = 8-bit blockwise MatMulNBits for the backbone's projections and
onnxruntime dynamic quantisation of the MatMul weights (per channel) for DVAE and Vocos, each with its cosine against
fp32 recorded in the meta.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.int8 import REDUCE_RANGE
from converters.progress import reporter
from edge.bundle import BundleFile, BundlePart
from edge.errors import CorruptModelFileError, ModelFilesNotFoundError
from edge.tts import backbone as B
from edge.tts import decoder as D
from edge.tts.text import TOKENIZER_DIR, TOKENIZER_FILES

log = logging.getLogger("converters.tts")

TTS_DIR = "tts"
VOCOS_FILE = "assets/Vocos.pt"
TOKENIZER_SRC = "assets/chattts_tokenizer"
OPSET = 17

# Hard-coded sizes of the official code (`initialize_vocos`, `DVAE.__init__`, `GFSQ`), spec §1.7.
SAMPLE_RATE = 24000
VOCOS_N_FFT, VOCOS_HOP, VOCOS_MELS = 1024, 256, 100
FSQ_LEVELS = (5, 5, 5, 5)
FSQ_GROUPS, FSQ_RESIDUALS = 2, 2
DVAE_KERNEL, DVAE_DILATION = 7, 2
VOCOS_KERNEL = 7
LAYER_NORM_EPS = 1e-6  # ConvNeXt / Vocos LayerNorms
RMS_NORM_EPS = 1e-6  # transformers LlamaConfig default, which ConditionalChatTTS does not override
ROPE_THETA = 10000.0  # idem
MAG_CLIP = 1e2  # ISTFTHead: torch.clip(exp(mag), max=1e2)
L2_EPS = 1e-12  # F.normalize default

# ConditionalChatTTSConfig defaults (official configuration_minicpm.py) for keys a config.json may omit.
TTS_CONFIG_DEFAULTS = {
    "llm_dim": 2560, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 20, "num_audio_tokens": 626, "num_text_tokens": 21178, "num_mel_bins": 100, "num_vq": 4,
    "use_speaker_embedding": True, "spk_emb_token_id": 21143, "num_spk_embs": 1, "audio_bos_token_id": 21132,
    "text_eos_token_id": 21133, "streaming_text_chunk_size": 10, "streaming_text_reserved_len": 300,
    "streaming_audio_chunk_size": 50, "use_mlp": True, "top_p": 0.7, "top_k": 20, "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class _Cfg:
    c: dict

    def __getitem__(self, k):
        return self.c.get(k, TTS_CONFIG_DEFAULTS.get(k))


def _say(progress: bool, msg: str) -> None:
    reporter("tts", progress)(msg)


# --- torch modules (imported lazily: torch is a converter-only dependency) ----------------------------------------
def _modules():
    import torch
    from torch import nn

    def lin(w, b=None):
        m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        m.weight.data = torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy
        if b is not None:
            m.bias.data = torch.from_numpy(np.array(b, dtype=np.float32))
        return m

    def conv(w, b=None, padding=0, dilation=1, groups=1):
        m = nn.Conv1d(w.shape[1] * groups, w.shape[0], w.shape[2], padding=padding, dilation=dilation,
                      groups=groups, bias=b is not None)
        m.weight.data = torch.from_numpy(np.array(w, dtype=np.float32))
        if b is not None:
            m.bias.data = torch.from_numpy(np.array(b, dtype=np.float32))
        return m

    def layer_norm(w, b):
        m = nn.LayerNorm(w.shape[0], eps=LAYER_NORM_EPS)
        m.weight.data, m.bias.data = torch.from_numpy(w.copy()), torch.from_numpy(b.copy())
        return m

    class RMSNorm(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.weight = nn.Parameter(torch.from_numpy(w.copy()))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS))

    class Llama(nn.Module):
        """LlamaModel forward with external cache; attention = softmax([q.Kpast, q.Knew] + mask) split back.

        Built for few graph nodes, because a 1-frame step is dominated by per-node overhead, not FLOPs: q/k/v are one
        Linear (and gate/up another), RoPE's rotate_half is a matmul with a fixed signed permutation `rot` (exact:
        entries are 0 and +-1) applied to q and k together, splits are Split nodes, reshapes have constant targets
        and the score scale lives in the q weights."""

        def __init__(self, get, n_layers, n_heads, head_dim, heads):
            super().__init__()
            self.heads = lin(heads.reshape(-1, heads.shape[-1]))  # (num_vq * codes, hidden)
            self.head_shape = heads.shape[:2]
            self.n_heads, self.head_dim = n_heads, head_dim
            inv = 1.0 / (ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            self.register_buffer("inv_freq", inv)
            half = head_dim // 2
            rot = torch.zeros(head_dim, head_dim)  # x @ rot == cat(-x[half:], x[:half])
            rot[torch.arange(half) + half, torch.arange(half)] = -1.0
            rot[torch.arange(half), torch.arange(half) + half] = 1.0
            self.register_buffer("rot", rot)
            self.layers = nn.ModuleList()
            for i in range(n_layers):
                p = f"tts.model.layers.{i}."
                m = nn.Module()
                m.ln1 = RMSNorm(get(p + "input_layernorm.weight"))
                m.ln2 = RMSNorm(get(p + "post_attention_layernorm.weight"))
                q_scaled = get(p + "self_attn.q_proj.weight") * np.float32(head_dim ** -0.5)  # exact for 64 (2^-3)
                m.qkv = lin(np.concatenate([q_scaled] + [get(f"{p}self_attn.{n}_proj.weight") for n in ("k", "v")]))
                m.o = lin(get(p + "self_attn.o_proj.weight"))
                m.gate_up = lin(np.concatenate([get(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up")]))
                self.ffn = m.gate_up.weight.shape[0] // 2
                m.down = lin(get(p + "mlp.down_proj.weight"))
                self.layers.append(m)
            self.norm = RMSNorm(get("tts.model.norm.weight"))

        def forward(self, inputs_embeds, position_ids, attention_mask, *past):
            # Batch is always 1 (one utterance per cache): constant reshape targets spare a Shape/Gather/Concat chain
            # per reshape in the graph. The 1/sqrt(head_dim) score scale is folded into the q rows of `qkv`.
            nh, hd, hidden = self.n_heads, self.head_dim, self.n_heads * self.head_dim
            freqs = position_ids.float().unsqueeze(-1) * self.inv_freq
            emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # (1, n, 1, hd), broadcast over q and k heads
            cos, sin = emb.cos(), emb.sin()
            x, new = inputs_embeds, []
            n_past = past[0].shape[2]  # one Shape node for all layers: every layer's cache has the same length
            for i, m in enumerate(self.layers):
                qk, v = torch.split(m.qkv(m.ln1(x)).reshape(1, -1, 3 * nh, hd), [2 * nh, nh], dim=2)
                qk = qk * cos + (qk @ self.rot) * sin
                q, k = (t.transpose(1, 2) for t in torch.split(qk, [nh, nh], dim=2))
                v = v.transpose(1, 2)
                pk, pv = past[2 * i], past[2 * i + 1]
                p = torch.softmax(torch.cat([q @ pk.transpose(-1, -2), q @ k.transpose(-1, -2)], dim=-1)
                                  + attention_mask, dim=-1)
                o = p[..., :n_past] @ pv + p[..., n_past:] @ v
                x = x + m.o(o.transpose(1, 2).reshape(1, -1, hidden))
                g, u = torch.split(m.gate_up(m.ln2(x)), [self.ffn, self.ffn], dim=-1)
                x = x + m.down(torch.nn.functional.silu(g) * u)
                new += [k, v]
            x = self.norm(x)
            logits = self.heads(x[:, -1]).reshape(1, self.head_shape[0], self.head_shape[1])
            return (x, logits, *new)

    class Projector(nn.Module):
        def __init__(self, get):
            super().__init__()
            self.l1 = lin(get("tts.projector.linear1.weight"), get("tts.projector.linear1.bias"))
            self.l2 = lin(get("tts.projector.linear2.weight"), get("tts.projector.linear2.bias"))

        def forward(self, h):
            y = self.l2(torch.relu(self.l1(h)))
            return y / y.norm(p=2, dim=-1, keepdim=True).clamp_min(L2_EPS)

    class ConvNeXt(nn.Module):
        """DVAE / Vocos ConvNeXt block: depthwise conv, LN, Linear-GELU-Linear, layer scale, residual."""

        def __init__(self, get, p, scale_name, dilation):
            super().__init__()
            w = get(p + "dwconv.weight")
            self.dw = conv(w, get(p + "dwconv.bias"), padding=dilation * (w.shape[2] // 2), dilation=dilation,
                           groups=w.shape[0])
            self.norm = layer_norm(get(p + "norm.weight"), get(p + "norm.bias"))
            self.pw1 = lin(get(p + "pwconv1.weight"), get(p + "pwconv1.bias"))
            self.pw2 = lin(get(p + "pwconv2.weight"), get(p + "pwconv2.bias"))
            self.scale = nn.Parameter(torch.from_numpy(get(p + scale_name).copy()))

        def forward(self, x):
            y = self.norm(self.dw(x).transpose(1, 2))
            y = self.pw2(torch.nn.functional.gelu(self.pw1(y))) * self.scale
            return x + y.transpose(1, 2)

    class Dvae(nn.Module):
        """`DVAE.forward(mode="decode")`: GFSQ `_embed` -> (B, 512, 2T) interleave -> decoder -> out_conv -> * coef."""

        def __init__(self, get, n_blocks):
            super().__init__()
            levels = torch.tensor(FSQ_LEVELS)
            basis = torch.cumprod(torch.tensor((1,) + FSQ_LEVELS[:-1]), 0)
            idx = torch.arange(int(np.prod(FSQ_LEVELS)))[:, None]
            half = levels // 2
            self.register_buffer("codebook", (((idx // basis) % levels) - half) / half)  # FSQ implicit codebook
            self.register_buffer("scales", (levels[0].float() - 1) ** -torch.arange(FSQ_RESIDUALS).float())
            self.proj = nn.ModuleList(
                lin(get(f"tts.dvae.vq_layer.quantizer.rvqs.{g}.project_out.weight"),
                    get(f"tts.dvae.vq_layer.quantizer.rvqs.{g}.project_out.bias")) for g in range(FSQ_GROUPS))
            p = "tts.dvae.decoder."
            self.conv_in1 = conv(get(p + "conv_in.0.weight"), get(p + "conv_in.0.bias"), padding=1)
            self.conv_in2 = conv(get(p + "conv_in.2.weight"), get(p + "conv_in.2.bias"), padding=1)
            self.blocks = nn.ModuleList(ConvNeXt(get, f"{p}decoder_block.{i}.", "coef", DVAE_DILATION)
                                        for i in range(n_blocks))
            self.conv_out = conv(get(p + "conv_out.weight"))
            self.out_conv = conv(get("tts.dvae.out_conv.weight"), padding=1)
            self.coef = nn.Parameter(torch.from_numpy(get("tts.dvae.coef").copy()))

        def forward(self, codes):
            x = codes.transpose(1, 2)  # (B, T, num_vq)
            feats = []
            for g in range(FSQ_GROUPS):
                acc = None
                for r in range(FSQ_RESIDUALS):
                    c = self.codebook[x[:, :, g * FSQ_RESIDUALS + r]] * self.scales[r]
                    acc = c if acc is None else acc + c
                feats.append(self.proj[g](acc))
            f = torch.cat(feats, dim=-1).transpose(1, 2)  # (B, 1024, T)
            b, c, t = f.shape[0], f.shape[1], f.shape[2]
            f = f.reshape(b, 2, c // 2, t).permute(0, 2, 3, 1).reshape(b, c // 2, 2 * t)
            y = self.conv_in2(torch.nn.functional.gelu(self.conv_in1(f)))
            for blk in self.blocks:
                y = blk(y)
            return self.out_conv(self.conv_out(y)) * self.coef

    class Vocos(nn.Module):
        def __init__(self, get, n_blocks):
            super().__init__()
            self.embed = conv(get("backbone.embed.weight"), get("backbone.embed.bias"), padding=VOCOS_KERNEL // 2)
            self.norm = layer_norm(get("backbone.norm.weight"), get("backbone.norm.bias"))
            self.blocks = nn.ModuleList(ConvNeXt(get, f"backbone.convnext.{i}.", "gamma", 1) for i in range(n_blocks))
            self.final = layer_norm(get("backbone.final_layer_norm.weight"), get("backbone.final_layer_norm.bias"))
            self.out = lin(get("head.out.weight"), get("head.out.bias"))

        def forward(self, mel):
            x = self.embed(mel)
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
            for blk in self.blocks:
                x = blk(x)
            h = self.out(self.final(x.transpose(1, 2))).transpose(1, 2)
            mag, phase = h.chunk(2, dim=1)
            mag = torch.clip(torch.exp(mag), max=MAG_CLIP)
            return mag * torch.cos(phase), mag * torch.sin(phase)

    return dict(Llama=Llama, Projector=Projector, Dvae=Dvae, Vocos=Vocos)


# --- export -------------------------------------------------------------------------------------------------------
INT8_MIN_COSINE = 0.99  # below this on the export probe an int8 graph is not written (the runtime uses fp32)
# TorchScript exporter names of the backbone's projection MatMuls (module attributes qkv/o/gate_up/down of `Llama`)
BACKBONE_LINEAR_NODE = r"^/(qkv|o|gate_up|down)(_\d+)?/MatMul$"
# MatMulNBits settings: 8-bit symmetric blocks of 32 (the block size of llama.cpp's Q8_0) with int8 activations.
NBITS_BITS, NBITS_BLOCK, NBITS_ACCURACY_LEVEL = 8, 32, 4


def _onnx_export(module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _run(path: Path, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def _check(name: str, got: list[np.ndarray], ref: list, tol: float = 1e-4) -> float:
    """Export self-check: onnxruntime vs the torch module on the probe input."""
    err = max(_rel(g, r.detach().numpy()) for g, r in zip(got, ref))
    if err > tol:
        raise RuntimeError(f"TTS export self-check failed for {name}: onnxruntime differs from torch by {err:.2e} "
                           f"(relative, tolerance {tol:.0e}). Check the onnxruntime/torch versions.")
    return err


def _keep_if_close(out: Path, name: str, feed: dict, ref: list[np.ndarray],
                   progress: bool) -> tuple[Path | None, float]:
    """Keep a quantised graph only if its probe output stays within INT8_MIN_COSINE of fp32."""
    cos = min(_cos(g, r) for g, r in zip(_run(out, feed), ref))
    _say(progress, f"{name} int8: cosine vs fp32 on the probe = {cos:.5f}")
    if cos < INT8_MIN_COSINE:
        log.warning("tts %s int8 cosine %.4f < %.2f: not written, the runtime will use fp32", name, cos,
                    INT8_MIN_COSINE)
        out.unlink()
        return None, cos
    return out, cos


def _int8(fp32: Path, name: str, feed: dict, ref: list[np.ndarray], progress: bool) -> tuple[Path | None, float]:
    """Dynamic int8 quantisation of the MatMul weights (per output channel): the conv-heavy DVAE and Vocos."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = fp32.with_name(fp32.name.replace(".fp32.", ".int8."))
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=REDUCE_RANGE)
    return _keep_if_close(out, name, feed, ref, progress)


def _int8_blockwise(fp32: Path, name: str, feed: dict, ref: list[np.ndarray],
                    progress: bool) -> tuple[Path | None, float]:
    """Weight-only 8-bit MatMulNBits for the backbone's projection MatMuls (BACKBONE_LINEAR_NODE).

    Why not `quantize_dynamic` as for the other graphs: a TTS step is one position, i.e. 80 matrix-vector products,
    and onnxruntime's MatMulNBits kernels (accuracy level 4: int8 dot products) run those markedly faster than
    DynamicQuantizeLinear + MatMulInteger (bench/results/tts-full-*.json). Everything else stays fp32: the code
    heads (their top-1/top-2 margins can be ~1e-3, golden README; int8 flips argmaxes), the attention products
    and RoPE's exact +-1 permutation."""
    import re

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = fp32.with_name(fp32.name.replace(".fp32.", ".int8."))
    model = onnx.load(str(fp32))
    linear = re.compile(BACKBONE_LINEAR_NODE)
    skip = [n.name for n in model.graph.node if n.op_type == "MatMul" and not linear.match(n.name)]
    quantizer = MatMulNBitsQuantizer(model, bits=NBITS_BITS, block_size=NBITS_BLOCK, is_symmetric=True,
                                     accuracy_level=NBITS_ACCURACY_LEVEL, nodes_to_exclude=skip)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")  # logs a line per node
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    onnx.save_model(quantizer.model.model, str(out))
    return _keep_if_close(out, name, feed, ref, progress)


def _required(cfg: _Cfg) -> list[str]:
    names = ["tts.emb_text.weight", "tts.model.norm.weight", "tts.dvae.coef", "tts.dvae.out_conv.weight",
             "tts.projector.linear1.weight", "tts.projector.linear2.weight"]
    names += [f"tts.emb_code.{q}.weight" for q in range(cfg["num_vq"])]
    names += [f"tts.head_code.{q}.parametrizations.weight.original{j}" for q in range(cfg["num_vq"]) for j in (0, 1)]
    names += [f"tts.model.layers.{i}.self_attn.q_proj.weight" for i in range(cfg["num_hidden_layers"])]
    names += [f"tts.dvae.vq_layer.quantizer.rvqs.{g}.project_out.weight" for g in range(FSQ_GROUPS)]
    return names


def export(ckpt: Checkpoint, out_dir: Path, *, int8: bool = True, progress: bool = True) -> BundlePart:
    """Write the TTS part into `out_dir` (files under `tts/`) and return its BundlePart."""
    import torch

    if "tts_config" not in ckpt.config:
        raise ModelFilesNotFoundError(f"{ckpt.root}/config.json has no tts_config: this checkpoint has no TTS.")
    cfg = _Cfg(dict(ckpt.config["tts_config"]))
    if not cfg["use_mlp"] or not cfg["use_speaker_embedding"]:
        raise CorruptModelFileError("only the MiniCPM-o 2.6 TTS layout (use_mlp and use_speaker_embedding) is "
                                      "supported; the official code raises NotImplementedError otherwise too.")
    llm_hidden = ckpt.config.get("hidden_size")
    if llm_hidden is not None and llm_hidden != cfg["llm_dim"]:
        raise CorruptModelFileError(
            f"tts_config.llm_dim is {cfg['llm_dim']} but the LLM hidden size is {llm_hidden}; the speaker projector "
            "maps the LLM's <|spk|> state, so they must match (spec §10).")
    ckpt.require(_required(cfg))
    vocos_path, tok_src = ckpt.root / VOCOS_FILE, ckpt.root / TOKENIZER_SRC
    for p in (vocos_path, tok_src / "tokenizer.json"):
        if not p.is_file():
            raise ModelFilesNotFoundError(f"{p} is missing; the TTS needs the checkpoint's assets/ folder "
                                          "(Vocos.pt and chattts_tokenizer/). Download the checkpoint again.", str(p))
    out_dir = Path(out_dir)
    (out_dir / TTS_DIR).mkdir(parents=True, exist_ok=True)
    mods = _modules()
    get = ckpt.f32
    H, L, NH = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd, nvq, llm_dim = H // NH, cfg["num_vq"], cfg["llm_dim"]
    files: dict[str, str] = {}
    checks: dict[str, float] = {}
    int8_cos: dict[str, float] = {}
    rng = np.random.default_rng(0)

    def rel(name: str) -> str:
        return f"{TTS_DIR}/{name}"

    # tables
    _say(progress, "tables: emb_text, emb_code; head_code weight norm folded")
    np.save(out_dir / rel("emb_text.npy"), get("tts.emb_text.weight"))
    np.save(out_dir / rel("emb_code.npy"), np.stack([get(f"tts.emb_code.{q}.weight") for q in range(nvq)]))
    heads = []
    for q in range(nvq):
        g = torch.from_numpy(get(f"tts.head_code.{q}.parametrizations.weight.original0").copy())
        v = torch.from_numpy(get(f"tts.head_code.{q}.parametrizations.weight.original1").copy())
        heads.append(torch._weight_norm(v, g, 0).numpy())
    files.update({B.ROLE_EMB_TEXT: rel("emb_text.npy"), B.ROLE_EMB_CODE: rel("emb_code.npy")})

    # speaker projector
    _say(progress, "projector")
    proj = mods["Projector"](get).eval()
    x = torch.from_numpy(rng.standard_normal((1, 2, llm_dim)).astype(np.float32))
    path = out_dir / rel("projector.fp32.onnx")
    _onnx_export(proj, (x,), path, [B.PROJ_IN], [B.PROJ_OUT], {B.PROJ_IN: {1: "n"}, B.PROJ_OUT: {1: "n"}})
    checks["projector"] = _check("projector", _run(path, {B.PROJ_IN: x.numpy()}), [proj(x)])
    files[B.variant_role(B.ROLE_PROJECTOR, "fp32")] = rel("projector.fp32.onnx")

    # Llama backbone
    _say(progress, f"backbone: {L} layers, hidden {H}, {NH} heads")
    llama = mods["Llama"](get, L, NH, hd, np.stack(heads)).eval()
    n, past = 3, 5
    feed = {B.IN_EMBEDS: rng.standard_normal((1, n, H)).astype(np.float32),
            B.IN_POSITIONS: np.arange(past, past + n, dtype=np.int64)[None], B.IN_MASK: B.causal_mask(past, n)}
    past_in, past_out, axes = [], [], {B.IN_EMBEDS: {1: "n"}, B.IN_POSITIONS: {1: "n"}, B.IN_MASK: {2: "n", 3: "total"}}
    for i in range(L):
        for nm in B.past_names(i):
            feed[nm] = (rng.standard_normal((1, NH, past, hd)) * 0.5).astype(np.float32)
            past_in.append(nm)
            axes[nm] = {2: "past"}
        for nm in B.new_names(i):
            past_out.append(nm)
            axes[nm] = {2: "n"}
    targs = tuple(torch.from_numpy(feed[k]) for k in [B.IN_EMBEDS, B.IN_POSITIONS, B.IN_MASK] + past_in)
    path = out_dir / rel("backbone.fp32.onnx")
    _onnx_export(llama, targs, path, [B.IN_EMBEDS, B.IN_POSITIONS, B.IN_MASK] + past_in,
                 [B.OUT_HIDDEN, B.OUT_LOGITS] + past_out, axes)
    ref = [r.detach().numpy() for r in llama(*targs)]
    checks["backbone"] = _check("backbone", _run(path, feed), llama(*targs))
    files[B.variant_role(B.ROLE_BACKBONE, "fp32")] = rel("backbone.fp32.onnx")
    if int8:
        q8, int8_cos["backbone"] = _int8_blockwise(path, "backbone", feed, ref, progress)
        if q8:
            files[B.variant_role(B.ROLE_BACKBONE, "int8")] = rel(q8.name)

    # DVAE decoder
    _say(progress, "dvae decoder")
    n_dvae = len({k.split(".")[4] for k in ckpt.names("tts.dvae.decoder.decoder_block.")})
    dvae = mods["Dvae"](get, n_dvae).eval()
    codes = torch.from_numpy(rng.integers(0, cfg["num_audio_tokens"] - 1, (1, nvq, 16)).astype(np.int64))
    path = out_dir / rel("dvae.fp32.onnx")
    _onnx_export(dvae, (codes,), path, [D.DVAE_IN], [D.DVAE_OUT], {D.DVAE_IN: {2: "T"}, D.DVAE_OUT: {2: "F"}})
    mel = dvae(codes)
    checks["dvae"] = _check("dvae", _run(path, {D.DVAE_IN: codes.numpy()}), [mel])
    files[B.variant_role(D.ROLE_DVAE, "fp32")] = rel("dvae.fp32.onnx")
    if int8:
        q8, int8_cos["dvae"] = _int8(path, "dvae", {D.DVAE_IN: codes.numpy()}, [mel.detach().numpy()], progress)
        if q8:
            files[B.variant_role(D.ROLE_DVAE, "int8")] = rel(q8.name)

    # Vocos
    _say(progress, "vocos backbone + ISTFT head")
    sd = {k: v.float().numpy() for k, v in torch.load(vocos_path, weights_only=True, map_location="cpu").items()}
    n_voc = len({k.split(".")[2] for k in sd if k.startswith("backbone.convnext.")})
    vocos = mods["Vocos"](sd.__getitem__, n_voc).eval()
    mel = mel.detach()
    path = out_dir / rel("vocos.fp32.onnx")
    _onnx_export(vocos, (mel,), path, [D.VOCOS_IN], [D.VOCOS_OUT_REAL, D.VOCOS_OUT_IMAG],
                 {D.VOCOS_IN: {2: "F"}, D.VOCOS_OUT_REAL: {2: "F"}, D.VOCOS_OUT_IMAG: {2: "F"}})
    ref = [r.detach().numpy() for r in vocos(mel)]
    checks["vocos"] = _check("vocos", _run(path, {D.VOCOS_IN: mel.numpy()}), vocos(mel))
    files[B.variant_role(D.ROLE_VOCOS, "fp32")] = rel("vocos.fp32.onnx")
    if int8:
        q8, int8_cos["vocos"] = _int8(path, "vocos", {D.VOCOS_IN: mel.numpy()}, ref, progress)
        if q8:
            files[B.variant_role(D.ROLE_VOCOS, "int8")] = rel(q8.name)
    np.save(out_dir / rel("istft_window.npy"), sd["head.istft.window"])
    files[D.ROLE_ISTFT_WINDOW] = rel("istft_window.npy")

    # tokenizer
    (out_dir / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for fname in TOKENIZER_FILES:
        if (tok_src / fname).is_file():
            shutil.copyfile(tok_src / fname, out_dir / TOKENIZER_DIR / fname)
            files[f"tokenizer/{fname}"] = f"{TOKENIZER_DIR}/{fname}"

    meta = {
        "hidden": H, "num_layers": L, "num_heads": NH, "head_dim": hd, "llm_dim": llm_dim, "num_vq": nvq,
        "num_audio_tokens": cfg["num_audio_tokens"], "num_text_tokens": cfg["num_text_tokens"],
        "audio_bos_token_id": cfg["audio_bos_token_id"], "text_eos_token_id": cfg["text_eos_token_id"],
        "spk_emb_token_id": cfg["spk_emb_token_id"], "num_spk_embs": cfg["num_spk_embs"],
        "use_speaker_embedding": bool(cfg["use_speaker_embedding"]),
        "reserved_len": cfg["streaming_text_reserved_len"], "text_chunk": cfg["streaming_text_chunk_size"],
        "audio_chunk": cfg["streaming_audio_chunk_size"], "top_p": cfg["top_p"], "top_k": cfg["top_k"],
        "repetition_penalty": cfg["repetition_penalty"], "num_mel_bins": cfg["num_mel_bins"],
        "sample_rate": SAMPLE_RATE, "hop_length": VOCOS_HOP, "n_fft": VOCOS_N_FFT,
        "export_check_rel_err": checks, "int8_cosine": int8_cos,
    }
    _say(progress, f"done: self-check rel err {checks}, int8 cosine {int8_cos}")
    return BundlePart({role: BundleFile.describe(out_dir, p) for role, p in files.items()}, meta)
