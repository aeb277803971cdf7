"""`apm.*` (Whisper encoder) + `audio_projection_layer` + AvgPool1d(2, 2) of a MiniCPM-o checkpoint -> ONNX.

Two graphs, both ending with the projector and then the pooling (the official order: projection first, so
the pool averages projected LLM-width features, spec §1.6):

- whole utterance (`audio_encoder.onnx`): `mel (B, 80, T)` + `attn_mask (B, 1, S, S)` additive float mask,
  S = (T - 1) // 2 + 1. The runtime passes zeros (full attention, `chunk_length=-1`) or the official 1-s
  block-causal chunk mask (`subsequent_chunk_mask(S, 50)`: a frame sees its own and all earlier 50-frame
  chunks). This is `MiniCPMO.get_audio_embedding`.
- streaming step (`audio_encoder_stream.onnx`): `mel (1, 80, Tc)` for one chunk (up to 100 frames) +
  `past_key_{i}` / `past_value_{i}` (1, heads, P, head_dim) per layer -> `present_key_{i}` / `present_value_{i}`
  (P + Sc positions). Positions continue at P (the cache length), as `MiniCPMWhisperEncoder.forward` with
  `use_cache=True` does; position ids past the table end repeat the last row (the official warning path).
  This is `MiniCPMO.get_audio_embedding_streaming`.

Conv padding at chunk borders (read in the official `get_audio_embedding_streaming` / `MiniCPMWhisperEncoder`):
the streaming path calls the encoder on each chunk's mel alone, so conv1 and conv2 (kernel 3, padding 1) see
zeros beyond the chunk edges: there is no conv state across chunks. Only attention state (the KV cache) is
carried. The streaming graph reproduces exactly that, so chunked streaming is *not* bit-equal to the
whole-utterance block-causal mask at chunk borders (there, conv windows reach one mel frame into the
neighbouring chunk, and the mel itself is computed on the whole utterance); see tests/test_audio_encoder.py.

The graphs are written with converters/onnx_graph.py straight from the checkpoint's tensors (no torch), with
onnxruntime's fused CPU operators: MultiHeadAttention (the streaming graph's past keys/values go in as its
past inputs and come out concatenated as present), SkipLayerNormalization (residual add + next LayerNorm +
the projection's bias) and BiasGelu. The two graphs of a variant share one external-data weights file,
written tensor by tensor while the graphs are built, so the weights are on disk once per variant and never
all in memory. Both graphs also output `apm_hidden`, the encoder's final hidden state (after the final layer
norm), the input of the projector. int8 variants: per-channel int8 weights in DynamicQuantizeMatMul (the
convolutions stay float: a small share of the compute, and ConvInteger is slower than float Conv on most CPU
builds of onnxruntime).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.onnx_graph import Graph, LinearKind, WeightStore
from converters.progress import reporter
from edge import audio_encoder as rt
from edge.bundle import BundleFile, BundlePart
from edge.errors import InvalidInputError

APM = "apm."
PROJ = "audio_projection_layer."
# openai/whisper-medium encoder values (spec §1.6), used only when config.json lacks the key.
WHISPER_MEDIUM_HEADS = 16
# nn.LayerNorm default eps; Whisper's layer norms are built without an eps argument.
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class AudioDims:
    n_mels: int
    d_model: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_positions: int
    llm_hidden: int
    pool_step: int
    chunk_seconds: float

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> AudioDims:
        """Sizes from tensor shapes (robust to sparse config.json files); heads and pooling from the config."""
        ckpt.require([APM + "conv1.weight", APM + "embed_positions.weight", PROJ + "linear2.weight"])
        d_model, n_mels, _ = ckpt.tensors[APM + "conv1.weight"].shape
        n_layers = len({n.split(".")[2] for n in ckpt.names(APM + "layers.")})
        acfg = ckpt.config.get("audio_config", {})
        act = acfg.get("activation_function", "gelu")
        if act != "gelu":
            raise InvalidInputError(f"audio_config.activation_function is {act!r}; this exporter implements the "
                                    "Whisper encoder with exact (erf) GELU only.")
        n_heads = int(acfg.get("encoder_attention_heads", WHISPER_MEDIUM_HEADS))
        if d_model % n_heads:
            raise InvalidInputError(f"audio d_model {d_model} is not divisible by {n_heads} heads; check "
                                    "audio_config.encoder_attention_heads in config.json.")
        return cls(
            n_mels=int(n_mels), d_model=int(d_model), n_layers=n_layers, n_heads=n_heads,
            ffn_dim=int(ckpt.tensors[APM + "layers.0.fc1.weight"].shape[0]),
            max_positions=int(ckpt.tensors[APM + "embed_positions.weight"].shape[0]),
            llm_hidden=int(ckpt.tensors[PROJ + "linear2.weight"].shape[0]),
            pool_step=int(ckpt.config.get("audio_pool_step", rt.POOL_STEP)),
            chunk_seconds=float(ckpt.config.get("audio_chunk_length", rt.CHUNK_SECONDS)),
        )


def required_tensors(dims: AudioDims) -> list[str]:
    names = [APM + f"{c}.{p}" for c in ("conv1", "conv2", "layer_norm") for p in ("weight", "bias")]
    names += [APM + "embed_positions.weight"]
    names += [PROJ + f"linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    per_layer = ["self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.out_proj.weight",
                 "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias",
                 "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight",
                 "final_layer_norm.bias"]
    names += [APM + f"layers.{i}.{n}" for i in range(dims.n_layers) for n in per_layer]
    return names


F32 = np.float32


def _front(g: Graph, ckpt: Checkpoint, mel: str, offset: str | None, dims: AudioDims) -> str:
    """conv1+GELU, conv2 (stride 2)+GELU, + position rows offset..offset+S (clamped to the table's last row)."""
    get = ckpt.f32
    x = mel
    for name, stride in (("conv1", 1), ("conv2", 2)):
        w = get(APM + name + ".weight")
        x = g.ms("Gelu", g.op("Conv", x, g.const(w, APM + name + ".weight"), g.const(get(APM + name + ".bias"),
                                                                                     APM + name + ".bias"),
                               pads=[1, 1], strides=[stride], kernel_shape=[w.shape[2]]))
    x = g.op("Transpose", x, perm=[0, 2, 1])  # (B, S, d_model)
    n = g.op("Squeeze", g.op("Slice", g.op("Shape", x), g.i64(1), g.i64(2)), g.i64(0))
    ids = g.op("Range", g.const(np.array(0, np.int64)), n, g.const(np.array(1, np.int64)))
    if offset is not None:
        ids = g.op("Add", ids, offset)
    ids = g.op("Min", ids, g.const(np.array(dims.max_positions - 1, np.int64)))
    return g.op("Add", x, g.op("Gather", g.const(get(APM + "embed_positions.weight"), APM + "embed_positions"), ids,
                               axis=0))


def _encoder(g: Graph, ckpt: Checkpoint, x: str, dims: AudioDims, kind: LinearKind, *, mask: str | None = None,
             past: list[str] | None = None) -> tuple[str, list[str]]:
    """The pre-LN Whisper layers and the final layer norm; returns (apm_hidden, present keys/values)."""
    get, d = ckpt.f32, dims.d_model
    presents: list[str] = []
    p0 = f"{APM}layers.0."
    h = g.layer_norm(x, get(p0 + "self_attn_layer_norm.weight"), get(p0 + "self_attn_layer_norm.bias"),
                     LAYER_NORM_EPS, p0 + "ln1")
    for i in range(dims.n_layers):
        p = f"{APM}layers.{i}."
        wqkv = np.concatenate([get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")])
        bqkv = np.concatenate([get(p + "self_attn.q_proj.bias"), np.zeros(d, F32),  # Whisper's k_proj has no bias
                               get(p + "self_attn.v_proj.bias")])
        q, k, v = g.op("Split", g.linear(h, wqkv, None, p + "qkv", kind), axis=-1, outputs=3)
        ins = [q, k, v, g.const(bqkv, p + "qkv.bias"), None, mask]
        if past is not None:
            ins += [past[2 * i], past[2 * i + 1]]
        outs = g.ms("MultiHeadAttention", *ins, outputs=3 if past is not None else 1, num_heads=dims.n_heads)
        a = outs[0] if past is not None else outs
        if past is not None:
            presents += outs[1:]
        a = g.linear(a, get(p + "self_attn.out_proj.weight"), None, p + "out_proj", kind)
        h, _, _, x = g.ms("SkipLayerNormalization", x, a, g.const(get(p + "final_layer_norm.weight"), p + "ln2.w"),
                          g.const(get(p + "final_layer_norm.bias"), p + "ln2.b"),
                          g.const(get(p + "self_attn.out_proj.bias"), p + "out_proj.bias"), outputs=4,
                          epsilon=LAYER_NORM_EPS)
        f = g.ms("BiasGelu", g.linear(h, get(p + "fc1.weight"), None, p + "fc1", kind),
                 g.const(get(p + "fc1.bias"), p + "fc1.bias"))
        f = g.linear(f, get(p + "fc2.weight"), None, p + "fc2", kind)
        nxt = f"{APM}layers.{i + 1}."
        ln_w, ln_b = ((APM + "layer_norm.weight", APM + "layer_norm.bias") if i == dims.n_layers - 1 else
                      (nxt + "self_attn_layer_norm.weight", nxt + "self_attn_layer_norm.bias"))
        h, _, _, x = g.ms("SkipLayerNormalization", x, f, g.const(get(ln_w), ln_w), g.const(get(ln_b), ln_b),
                          g.const(get(p + "fc2.bias"), p + "fc2.bias"), outputs=4, epsilon=LAYER_NORM_EPS)
    return h, presents


def _back(g: Graph, ckpt: Checkpoint, hidden: str, dims: AudioDims, kind: LinearKind) -> str:
    """Projector (Linear-ReLU-Linear) -> AvgPool1d(pool_step, pool_step) over positions -> audio_embeds."""
    get = ckpt.f32
    e = g.op("Relu", g.linear(hidden, get(PROJ + "linear1.weight"), get(PROJ + "linear1.bias"), PROJ + "l1", kind))
    e = g.linear(e, get(PROJ + "linear2.weight"), get(PROJ + "linear2.bias"), PROJ + "l2", kind)
    e = g.op("AveragePool", g.op("Transpose", e, perm=[0, 2, 1]), kernel_shape=[dims.pool_step],
             strides=[dims.pool_step])
    return g.op("Transpose", e, perm=[0, 2, 1])


def build_whole(g: Graph, ckpt: Checkpoint, dims: AudioDims, kind: LinearKind) -> None:
    """`get_audio_embedding`: mel (B, n_mels, T) + additive mask (B, 1, S, S) -> apm_hidden, audio_embeds."""
    mel = g.input(rt.IN_MEL, F32, ["batch", dims.n_mels, "frames"])
    mask = g.input(rt.IN_MASK, F32, ["batch", 1, "seq", "seq"])
    hidden, _ = _encoder(g, ckpt, _front(g, ckpt, mel, None, dims), dims, kind, mask=mask)
    g.output(hidden, rt.OUT_HIDDEN, F32, ["batch", "seq", dims.d_model])
    g.output(_back(g, ckpt, hidden, dims, kind), rt.OUT_EMBEDS, F32, ["batch", "tokens", dims.llm_hidden])


def build_stream(g: Graph, ckpt: Checkpoint, dims: AudioDims, kind: LinearKind) -> None:
    """`get_audio_embedding_streaming`: one chunk + per-layer past keys/values -> ..., present keys/values."""
    mel = g.input(rt.IN_MEL, F32, [1, dims.n_mels, "frames"])
    past = [g.input(rt.past_name(kind_, i), F32, [1, dims.n_heads, "past", dims.head_dim])
            for i in range(dims.n_layers) for kind_ in ("key", "value")]
    offset = g.op("Squeeze", g.op("Slice", g.op("Shape", past[0]), g.i64(2), g.i64(3)), g.i64(0))
    hidden, presents = _encoder(g, ckpt, _front(g, ckpt, mel, offset, dims), dims, kind, past=past)
    g.output(hidden, rt.OUT_HIDDEN, F32, [1, "seq", dims.d_model])
    g.output(_back(g, ckpt, hidden, dims, kind), rt.OUT_EMBEDS, F32, [1, "tokens", dims.llm_hidden])
    for (i, kind_), name in zip([(i, k) for i in range(dims.n_layers) for k in ("key", "value")], presents):
        g.output(name, rt.present_name(kind_, i), F32, [1, dims.n_heads, "total", dims.head_dim])


def export(ckpt: Checkpoint, out_dir: Path, *, int8: bool = True, progress: bool = True) -> BundlePart:
    """Write the audio part (fp32 whole + streaming graphs, and their int8 variants) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = AudioDims.from_checkpoint(ckpt)
    ckpt.require(required_tensors(dims))
    say = reporter("audio", progress)
    say(f"Whisper encoder d_model {dims.d_model}, {dims.n_layers} layers, {dims.n_heads} heads -> "
        f"projector {dims.llm_hidden}; writing ONNX graphs")
    variants = [("fp32", LinearKind.FP32, rt.FILE_WHOLE, rt.FILE_STREAM, rt.FILE_WEIGHTS)]
    if int8:
        variants.append(("int8", LinearKind.INT8, rt.FILE_WHOLE_INT8, rt.FILE_STREAM_INT8, rt.FILE_WEIGHTS_INT8))
    files = {}
    for variant, kind, whole, stream, weights in variants:
        say(f"{variant}: {whole}, {stream}, shared weights {weights}")
        with WeightStore(out_dir / weights) as store:
            for name, build in ((whole, build_whole), (stream, build_stream)):
                g = Graph(Path(name).stem, store)
                build(g, ckpt, dims, kind)
                g.save(out_dir / name)
        files.update({rt.ROLE_WHOLE[variant]: whole, rt.ROLE_STREAM[variant]: stream,
                      rt.ROLE_WEIGHTS[variant]: weights})
    meta = {**asdict(dims), "head_dim": dims.head_dim, "variants": [v[0] for v in variants]}
    say("done")
    return BundlePart(files={role: BundleFile.describe(out_dir, rel) for role, rel in files.items()}, meta=meta)
