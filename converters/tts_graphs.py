"""ONNX graphs of the MiniCPM-o 2.6 TTS, written from numpy weights: Llama backbone (+ code heads), speaker
projector, DVAE decoder and Vocos (names and shapes: edge/tts/backbone.py and decoder.py).

The backbone is built for few nodes, because a 1-frame step is bound by per-operator overhead, not FLOPs:
q/k/v is one MatMul (gate/up another), the RMSNorm and its residual add are one `SkipSimplifiedLayerNormalization`
(onnxruntime contrib), RoPE's rotate_half is a MatMul with a fixed signed permutation (exact: entries 0 and +-1)
applied to q and k together, and the 1/sqrt(head_dim) score scale lives in the q weights. Attention is split
into a past and a new part (scores concatenated, probabilities sliced back) so the graph never copies the cache:
the runtime passes its whole preallocated buffer as past (edge/tts/backbone.py `KVCache`), which
MultiHeadAttention's past input would concatenate (copy) at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from converters.onnx_graph import Graph, LinearKind
from edge.tts import backbone as B
from edge.tts import decoder as D

Get = Callable[[str], np.ndarray]

# Hard-coded sizes of the official code (`DVAE.__init__`, `GFSQ`, `initialize_vocos`), spec §1.7.
FSQ_LEVELS = (5, 5, 5, 5)
FSQ_GROUPS, FSQ_RESIDUALS = 2, 2
DVAE_DILATION = 2
LAYER_NORM_EPS = 1e-6  # ConvNeXt / Vocos LayerNorms
RMS_NORM_EPS = 1e-6  # transformers LlamaConfig default, which ConditionalChatTTS does not override
ROPE_THETA = 10000.0  # idem
MAG_CLIP = 1e2  # ISTFTHead: torch.clip(exp(mag), max=1e2)
L2_EPS = 1e-12  # F.normalize default
F32 = np.float32


@dataclass(frozen=True)
class BackboneDims:
    hidden: int
    layers: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`torch._weight_norm(v, g, 0)`: each output row of v scaled to norm g (float32 as torch computes it)."""
    norm = np.sqrt(np.sum(np.square(v, dtype=F32), axis=1, keepdims=True, dtype=F32), dtype=F32)
    return (v * (g.reshape(-1, 1) / norm)).astype(F32)


def rope_inv_freq(head_dim: int) -> np.ndarray:
    """transformers' default RoPE frequencies, duplicated to head_dim (`cat([freqs, freqs])`)."""
    inv = (F32(1.0) / (F32(ROPE_THETA) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(F32) / F32(head_dim))))
    return np.concatenate([inv, inv]).astype(F32)


def rotate_half_matrix(head_dim: int) -> np.ndarray:
    """x @ rot == cat(-x[half:], x[:half])."""
    half = head_dim // 2
    rot = np.zeros((head_dim, head_dim), F32)
    rot[np.arange(half) + half, np.arange(half)] = -1.0
    rot[np.arange(half), np.arange(half) + half] = 1.0
    return rot


def backbone(g: Graph, get: Get, dims: BackboneDims, heads: np.ndarray, kind: LinearKind) -> None:
    """The 20-layer Llama of `tts.model` with external past keys/values and the 4 code heads on the last position.

    `kind` applies to the projection MatMuls only; the code heads stay fp32 (their top-1/top-2 margins can be
    ~1e-3, golden README: int8 flips argmaxes), and so do the attention products and RoPE's permutation."""
    nh, hd, hidden = dims.heads, dims.head_dim, dims.hidden
    x = g.input(B.IN_EMBEDS, F32, [1, "n", hidden])
    pos = g.input(B.IN_POSITIONS, np.int64, [1, "n"])
    mask = g.input(B.IN_MASK, F32, [1, 1, "n", "total"])
    past = [[g.input(nm, F32, [1, nh, "past", hd]) for nm in B.past_names(i)] for i in range(dims.layers)]
    freqs = g.op("Unsqueeze", g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=1), g.i64(-1)),
                                   g.const(rope_inv_freq(hd), "rope.inv_freq")), g.i64(2))  # (1, n, 1, hd)
    cos, sin = g.op("Cos", freqs), g.op("Sin", freqs)
    rot = g.const(rotate_half_matrix(hd), "rope.rotate_half")
    n_past = g.op("Slice", g.op("Shape", past[0][0]), g.i64(2), g.i64(3))
    qkv_shape, out_shape = g.i64(1, -1, 3 * nh, hd), g.i64(1, -1, hidden)
    eps = float(RMS_NORM_EPS)
    h = g.op("SimplifiedLayerNormalization", x, g.const(get("tts.model.layers.0.input_layernorm.weight"),
                                                        "layers.0.ln1"), axis=-1, epsilon=eps)
    for i in range(dims.layers):
        p = f"tts.model.layers.{i}."
        q_scaled = get(p + "self_attn.q_proj.weight") * F32(hd ** -0.5)  # exact for head_dim 64 (2^-3)
        wqkv = np.concatenate([q_scaled] + [get(f"{p}self_attn.{n}_proj.weight") for n in ("k", "v")])
        qkv = g.op("Reshape", g.linear(h, wqkv, None, f"layers.{i}.qkv", kind), qkv_shape)
        qk, v = g.op("Split", qkv, g.i64(2 * nh, nh), axis=2, outputs=2)
        qk = g.op("Add", g.op("Mul", qk, cos), g.op("Mul", g.op("MatMul", qk, rot), sin))
        q, k = g.op("Split", qk, g.i64(nh, nh), axis=2, outputs=2)
        q, k, v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (q, k, v))
        pk, pv = past[i]
        scores = g.op("Concat", g.op("MatMul", q, g.op("Transpose", pk, perm=[0, 1, 3, 2])),
                      g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2])), axis=-1)
        prob = g.op("Softmax", g.op("Add", scores, mask), axis=-1)
        big = g.i64(np.iinfo(np.int64).max)
        o = g.op("Add", g.op("MatMul", g.op("Slice", prob, g.i64(0), n_past, g.i64(-1)), pv),
                 g.op("MatMul", g.op("Slice", prob, n_past, big, g.i64(-1)), v))
        o = g.op("Reshape", g.op("Transpose", o, perm=[0, 2, 1, 3]), out_shape)
        o = g.linear(o, get(p + "self_attn.o_proj.weight"), None, f"layers.{i}.o", kind)
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", x, o,
                          g.const(get(p + "post_attention_layernorm.weight"), f"layers.{i}.ln2"),
                          outputs=4, domain="com.microsoft", epsilon=eps)
        wgu = np.concatenate([get(f"{p}mlp.{n}_proj.weight") for n in ("gate", "up")])
        gate, up = g.op("Split", g.linear(h, wgu, None, f"layers.{i}.gate_up", kind), axis=-1, outputs=2)
        m = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        m = g.linear(m, get(p + "mlp.down_proj.weight"), None, f"layers.{i}.down", kind)
        last = i == dims.layers - 1
        norm_w, norm_name = ((get("tts.model.norm.weight"), "norm") if last else
                             (get(f"tts.model.layers.{i + 1}.input_layernorm.weight"), f"layers.{i + 1}.ln1"))
        h, _, _, x = g.op("SkipSimplifiedLayerNormalization", x, m, g.const(norm_w, norm_name), outputs=4,
                          domain="com.microsoft", epsilon=eps)
        g.output(k, B.new_names(i)[0], F32, [1, nh, "n", hd])
        g.output(v, B.new_names(i)[1], F32, [1, nh, "n", hd])
    g.output(h, B.OUT_HIDDEN, F32, [1, "n", hidden])
    n_vq, n_codes = heads.shape[:2]
    last_pos = g.op("Gather", h, g.const(np.array(-1, np.int64)), axis=1)  # (1, hidden)
    logits = g.linear(last_pos, heads.reshape(n_vq * n_codes, -1), None, "heads")
    g.output(g.op("Reshape", logits, g.i64(1, n_vq, n_codes)), B.OUT_LOGITS, F32, [1, n_vq, n_codes])
    _outputs_first(g)


def _outputs_first(g: Graph) -> None:
    """Order graph outputs as the old exporter did: hidden, logits, then new keys/values per layer."""
    order = {B.OUT_HIDDEN: 0, B.OUT_LOGITS: 1}
    g.outputs.sort(key=lambda o: order.get(o.name, 2))


def projector(g: Graph, get: Get, llm_dim: int) -> None:
    """`tts.projector` (Linear-ReLU-Linear) + L2 normalisation, as `merge_inputs_embeds` applies it."""
    x = g.input(B.PROJ_IN, F32, [1, "n", llm_dim])
    y = g.linear(g.op("Relu", g.linear(x, get("tts.projector.linear1.weight"), get("tts.projector.linear1.bias"),
                                       "l1")),
                 get("tts.projector.linear2.weight"), get("tts.projector.linear2.bias"), "l2")
    norm = g.op("Max", g.op("ReduceL2", y, axes=[-1], keepdims=1), g.const(np.array(L2_EPS, F32)))
    g.output(g.op("Div", y, norm), B.PROJ_OUT, F32, [1, "n", int(get("tts.projector.linear2.weight").shape[0])])


def _conv(g: Graph, x: str, w: np.ndarray, b: np.ndarray | None, name: str, *, pad: int = 0, dilation: int = 1,
          groups: int = 1, stride: int = 1) -> str:
    ins = [x, g.const(w.astype(F32), name + ".weight")] + ([g.const(b.astype(F32), name + ".bias")] if b is not None
                                                             else [])
    return g.op("Conv", *ins, pads=[pad, pad], dilations=[dilation], group=groups, strides=[stride],
                kernel_shape=[w.shape[2]])


def _convnext(g: Graph, x: str, get: Get, p: str, scale_name: str, dilation: int, kind: LinearKind) -> str:
    """DVAE / Vocos ConvNeXt block on (B, C, T): depthwise conv, LN, Linear-GELU-Linear, layer scale, residual."""
    w = get(p + "dwconv.weight")
    y = _conv(g, x, w, get(p + "dwconv.bias"), p + "dw", pad=dilation * (w.shape[2] // 2), dilation=dilation,
              groups=w.shape[0])
    y = g.layer_norm(g.op("Transpose", y, perm=[0, 2, 1]), get(p + "norm.weight"), get(p + "norm.bias"),
                     LAYER_NORM_EPS, p + "norm")
    y = g.ms("Gelu", g.linear(y, get(p + "pwconv1.weight"), get(p + "pwconv1.bias"), p + "pw1", kind))
    y = g.linear(y, get(p + "pwconv2.weight"), get(p + "pwconv2.bias"), p + "pw2", kind)
    y = g.op("Mul", y, g.const(get(p + scale_name), p + "scale"))
    return g.op("Add", x, g.op("Transpose", y, perm=[0, 2, 1]))


def fsq_tables() -> list[np.ndarray]:
    """GFSQ implicit codebook times each residual's scale: (levels product, len(levels)) per residual."""
    levels = np.array(FSQ_LEVELS)
    basis = np.cumprod((1,) + FSQ_LEVELS[:-1])
    idx = np.arange(int(np.prod(levels)))[:, None]
    half = levels // 2
    codebook = ((((idx // basis) % levels) - half) / half).astype(F32)
    scales = (F32(levels[0]) - 1) ** -np.arange(FSQ_RESIDUALS, dtype=F32)
    return [(codebook * scales[r]).astype(F32) for r in range(FSQ_RESIDUALS)]


def dvae(g: Graph, get: Get, n_vq: int, n_blocks: int, kind: LinearKind) -> None:
    """`DVAE.forward(mode="decode")`: GFSQ `_embed` -> interleave to (B, 512, 2T) -> decoder -> out_conv -> * coef."""
    codes = g.input(D.DVAE_IN, np.int64, ["B", n_vq, "T"])
    x = g.op("Transpose", codes, perm=[0, 2, 1])  # (B, T, num_vq)
    tables = [g.const(t, f"fsq.codebook{r}") for r, t in enumerate(fsq_tables())]
    cols = g.op("Split", x, axis=2, outputs=n_vq)
    feats = []
    for grp in range(FSQ_GROUPS):
        acc = None
        for r in range(FSQ_RESIDUALS):
            c = g.op("Gather", tables[r], g.op("Squeeze", cols[grp * FSQ_RESIDUALS + r], g.i64(2)), axis=0)
            acc = c if acc is None else g.op("Add", acc, c)
        p = f"tts.dvae.vq_layer.quantizer.rvqs.{grp}.project_out."
        feats.append(g.linear(acc, get(p + "weight"), get(p + "bias"), f"fsq.proj{grp}"))
    f = g.op("Concat", *feats, axis=-1)  # (B, T, groups * C)
    c = get("tts.dvae.vq_layer.quantizer.rvqs.0.project_out.weight").shape[0]
    f = g.op("Transpose", g.op("Reshape", f, g.i64(0, 0, FSQ_GROUPS, c)), perm=[0, 3, 1, 2])  # (B, C, T, 2)
    f = g.op("Reshape", f, g.i64(0, c, -1))  # (B, C, 2T): [b, c, 2t + k] = group k, frame t
    p = "tts.dvae.decoder."
    y = g.ms("Gelu", _conv(g, f, get(p + "conv_in.0.weight"), get(p + "conv_in.0.bias"), "conv_in1", pad=1))
    y = _conv(g, y, get(p + "conv_in.2.weight"), get(p + "conv_in.2.bias"), "conv_in2", pad=1)
    for i in range(n_blocks):
        y = _convnext(g, y, get, f"{p}decoder_block.{i}.", "coef", DVAE_DILATION, kind)
    y = _conv(g, _conv(g, y, get(p + "conv_out.weight"), None, "conv_out"), get("tts.dvae.out_conv.weight"), None,
              "out_conv", pad=1)
    mel = g.op("Mul", y, g.const(get("tts.dvae.coef"), "coef"))
    g.output(mel, D.DVAE_OUT, F32, ["B", int(get("tts.dvae.coef").shape[1]), "F"])


def vocos(g: Graph, sd: dict[str, np.ndarray], n_blocks: int, kind: LinearKind) -> None:
    """VocosBackbone + ISTFTHead linear, exp/clip magnitude, cos/sin phase (the ISTFT itself runs in numpy)."""
    get = sd.__getitem__
    w = get("backbone.embed.weight")
    mel = g.input(D.VOCOS_IN, F32, [1, int(w.shape[1]), "F"])
    x = _conv(g, mel, w, get("backbone.embed.bias"), "embed", pad=w.shape[2] // 2)
    x = g.op("Transpose", g.layer_norm(g.op("Transpose", x, perm=[0, 2, 1]), get("backbone.norm.weight"),
                                       get("backbone.norm.bias"), LAYER_NORM_EPS, "norm"), perm=[0, 2, 1])
    for i in range(n_blocks):
        x = _convnext(g, x, get, f"backbone.convnext.{i}.", "gamma", 1, kind)
    x = g.layer_norm(g.op("Transpose", x, perm=[0, 2, 1]), get("backbone.final_layer_norm.weight"),
                     get("backbone.final_layer_norm.bias"), LAYER_NORM_EPS, "final_norm")
    h = g.op("Transpose", g.linear(x, get("head.out.weight"), get("head.out.bias"), "head", kind), perm=[0, 2, 1])
    mag, phase = g.op("Split", h, axis=1, outputs=2)
    mag = g.op("Min", g.op("Exp", mag), g.const(np.array(MAG_CLIP, F32)))
    bins = int(get("head.out.weight").shape[0]) // 2
    g.output(g.op("Mul", mag, g.op("Cos", phase)), D.VOCOS_OUT_REAL, F32, [1, bins, "F"])
    g.output(g.op("Mul", mag, g.op("Sin", phase)), D.VOCOS_OUT_IMAG, F32, [1, bins, "F"])
