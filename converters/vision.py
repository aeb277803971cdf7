"""`vpm.*` (SigLIP NaViT) + `resampler.*` of a MiniCPM-o checkpoint -> one ONNX graph (+ an int8 variant).

The graph is written from the spec (§1.4, §1.5) with converters/onnx_graph.py straight from the checkpoint's
tensors (no torch, no remote code), with onnxruntime's fused CPU operators: MultiHeadAttention (padded keys
masked by a key padding mask), SkipLayerNormalization (residual add + next LayerNorm + projection bias) and
FastGelu (= tanh GELU). The graph contract (inputs, outputs, what numpy prepares) is documented in
`edge/vision.py`; both batch (slices) and patch count are dynamic.

Official details reproduced here:
- SigLIP: patch conv (stride = kernel = 14) == a Linear on each patch's (c, r, col)-flattened pixels; learned
  position table of (980/14)^2 rows indexed by NaViT bucketed ids; pre-LN blocks with tanh-GELU MLP;
  `post_layernorm` on the output; padded keys masked with float32 min. `drop_vision_last_layer` drops the
  last block, as `MiniCPMO.init_vision_module` does.
- Resampler: `kv_proj` (no bias) -> `ln_kv`; keys = that + 2-D sin/cos position, values without it; queries
  `ln_q(query)`; `nn.MultiheadAttention` with `embed_dim // 128` heads (spec §10: a head count that is not a
  config key) and packed in_proj; `ln_post`; `@ proj`. LayerNorm eps 1e-6 (hard-coded in resampler.py).
- 2-D sin/cos: omega computed in numpy float32 exactly like `get_1d_sincos_pos_embed_from_grid_new` and baked
  in as a constant; the first half of the channels encodes the column (x), the second the row (y).

int8: per-channel 8-bit weights in DynamicQuantizeMatMul for the weight MatMuls only (the attention products
stay float: quantising softmax probabilities to 8 bits costs accuracy for no size gain). The cosine
of int8 vs fp32 embeddings on a synthetic image is measured at export time and stored in the part meta.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.onnx_graph import Graph, LinearKind, WeightStore, probe_run
from converters.progress import reporter
from edge import vision as rt
from edge.bundle import BundleFile, BundlePart
from edge.errors import InvalidInputError
from edge.image_preprocess import (
    MAX_SLICE_NUMS,
    SCALE_RESOLUTION,
    SliceOptions,
    preprocess_image,
)

VPM = "vpm."
RES = "resampler."
# Official defaults (spec §1.4 default_vision_config, resampler.py), used when config.json lacks a key.
SIGLIP_HEADS = 16
SIGLIP_LAYERS = 27
SIGLIP_LN_EPS = 1e-6
SIGLIP_ACT = "gelu_pytorch_tanh"
RESAMPLER_HEAD_DIM = 128  # MiniCPMO.init_resampler: num_heads = embed_dim // 128
RESAMPLER_LN_EPS = 1e-6
SINCOS_BASE = 10000.0
# Above this many weight bytes the fp32 graph goes to ONNX external data (protobuf files stop at 2 GiB; the
# real checkpoint's ~485 M vision parameters are ~1.94 GB in float32).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024
# The int8 graph's external data when the fp32 graph has one too (the runtime only opens the graph file).
FILE_INT8_DATA = "vision.int8.onnx.data"
ROLE_INT8_DATA = "int8_data"
# Synthetic image for the int8-vs-fp32 check: 640x480 slices into a 2x1 grid (3 slices of real sizes).
_CHECK_IMAGE_SIZE = (640, 480)


@dataclass(frozen=True)
class VisionDims:
    vision_hidden: int
    vision_heads: int
    vision_layers: int
    vision_ffn: int
    patch_size: int
    num_patches_per_side: int
    layer_norm_eps: float
    llm_hidden: int
    query_num: int
    resampler_heads: int
    vision_batch_size: int

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> VisionDims:
        """Sizes from tensor shapes; head/layer counts and flags from config.json (official defaults)."""
        ckpt.require([VPM + "embeddings.patch_embedding.weight", VPM + "embeddings.position_embedding.weight",
                      VPM + "encoder.layers.0.mlp.fc1.weight", RES + "query"])
        cfg = ckpt.config
        vcfg = cfg.get("vision_config", {})
        hidden, channels, patch, _ = ckpt.tensors[VPM + "embeddings.patch_embedding.weight"].shape
        n_pos = ckpt.tensors[VPM + "embeddings.position_embedding.weight"].shape[0]
        side = int(round(n_pos ** 0.5))
        if side * side != n_pos or channels != 3:
            raise InvalidInputError(f"unexpected SigLIP embedding shapes (position table {n_pos} rows, {channels} "
                                    "channels); is this a MiniCPM-o 2.6 checkpoint?")
        act = vcfg.get("hidden_act", SIGLIP_ACT)
        if act != SIGLIP_ACT:
            raise InvalidInputError(f"vision_config.hidden_act is {act!r}; this exporter implements {SIGLIP_ACT}.")
        heads = int(vcfg.get("num_attention_heads", SIGLIP_HEADS))
        layers = int(vcfg.get("num_hidden_layers", SIGLIP_LAYERS)) - (1 if cfg.get("drop_vision_last_layer") else 0)
        query_num, llm_hidden = ckpt.tensors[RES + "query"].shape
        if hidden % heads or llm_hidden % RESAMPLER_HEAD_DIM:
            raise InvalidInputError(
                f"vision hidden {hidden} / {heads} heads or resampler width {llm_hidden} / {RESAMPLER_HEAD_DIM} "
                "does not divide; check vision_config.num_attention_heads and hidden_size in config.json.")
        return cls(
            vision_hidden=hidden, vision_heads=heads, vision_layers=layers,
            vision_ffn=ckpt.tensors[VPM + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            patch_size=patch, num_patches_per_side=side,
            layer_norm_eps=float(vcfg.get("layer_norm_eps", SIGLIP_LN_EPS)),
            llm_hidden=llm_hidden, query_num=query_num, resampler_heads=llm_hidden // RESAMPLER_HEAD_DIM,
            vision_batch_size=int(cfg.get("vision_batch_size", rt.VISION_BATCH_SIZE)),
        )


def required_tensors(dims: VisionDims) -> list[str]:
    names = [VPM + f"embeddings.patch_embedding.{k}" for k in ("weight", "bias")]
    names += [VPM + "embeddings.position_embedding.weight", VPM + "post_layernorm.weight", VPM + "post_layernorm.bias"]
    for i in range(dims.vision_layers):
        pre = f"{VPM}encoder.layers.{i}."
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [pre + mod + ".weight", pre + mod + ".bias"]
    names += [RES + n for n in ("query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias",
                                "attn.out_proj.weight", "attn.out_proj.bias", "proj")]
    names += [RES + f"{ln}.{k}" for ln in ("ln_q", "ln_kv", "ln_post") for k in ("weight", "bias")]
    return names


def sincos_omega(embed_dim: int) -> np.ndarray:
    """(embed_dim/4,) float32 frequencies, computed in float32 exactly as the official resampler.py does."""
    half = embed_dim // 2  # each of x and y gets half the channels; sin and cos a quarter each
    omega = np.arange(half // 2, dtype=np.float32)
    omega /= half / 2.0
    return (1.0 / SINCOS_BASE ** omega).astype(np.float32)


F32 = np.float32


def _siglip(g: Graph, ckpt: Checkpoint, dims: VisionDims, x: str, key_mask: str, kind: LinearKind) -> str:
    """Pre-LN SigLIP blocks and `post_layernorm`; returns vpm_out (B, L, hidden)."""
    get, eps = ckpt.f32, dims.layer_norm_eps
    pre0 = f"{VPM}encoder.layers.0."
    h = g.layer_norm(x, get(pre0 + "layer_norm1.weight"), get(pre0 + "layer_norm1.bias"), eps, pre0 + "ln1")
    for i in range(dims.vision_layers):
        pre = f"{VPM}encoder.layers.{i}."
        wqkv = np.concatenate([get(pre + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")])
        bqkv = np.concatenate([get(pre + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
        q, k, v = g.op("Split", g.linear(h, wqkv, None, pre + "qkv", kind), axis=-1, outputs=3)
        a = g.ms("MultiHeadAttention", q, k, v, g.const(bqkv, pre + "qkv.bias"), key_mask,
                 num_heads=dims.vision_heads)
        a = g.linear(a, get(pre + "self_attn.out_proj.weight"), None, pre + "o", kind)
        h, _, _, x = g.ms("SkipLayerNormalization", x, a, g.const(get(pre + "layer_norm2.weight"), pre + "ln2.w"),
                          g.const(get(pre + "layer_norm2.bias"), pre + "ln2.b"),
                          g.const(get(pre + "self_attn.out_proj.bias"), pre + "o.bias"), outputs=4, epsilon=eps)
        f = g.ms("FastGelu", g.linear(h, get(pre + "mlp.fc1.weight"), None, pre + "fc1", kind),
                 g.const(get(pre + "mlp.fc1.bias"), pre + "fc1.bias"))
        f = g.linear(f, get(pre + "mlp.fc2.weight"), None, pre + "fc2", kind)
        nxt = f"{VPM}encoder.layers.{i + 1}."
        ln_w, ln_b = ((VPM + "post_layernorm.weight", VPM + "post_layernorm.bias") if i == dims.vision_layers - 1
                      else (nxt + "layer_norm1.weight", nxt + "layer_norm1.bias"))
        h, _, _, x = g.ms("SkipLayerNormalization", x, f, g.const(get(ln_w), ln_w), g.const(get(ln_b), ln_b),
                          g.const(get(pre + "mlp.fc2.bias"), pre + "fc2.bias"), outputs=4, epsilon=eps)
    return h


def _layer_norm_np(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True, dtype=F32)
    var = np.square(x - mu).mean(-1, keepdims=True, dtype=F32)
    return ((x - mu) / np.sqrt(var + F32(eps)) * w + b).astype(F32)


def _sincos(g: Graph, grid_xy: str, dims: VisionDims) -> str:
    """2-D sin/cos key position: [sin x, cos x, sin y, cos y] with x = column (graph version of resampler.py)."""
    omega = g.const(sincos_omega(dims.llm_hidden), "resampler.omega")
    x = g.op("Mul", g.op("Slice", grid_xy, g.i64(0), g.i64(1), g.i64(-1)), omega)
    y = g.op("Mul", g.op("Slice", grid_xy, g.i64(1), g.i64(2), g.i64(-1)), omega)
    return g.op("Concat", g.op("Sin", x), g.op("Cos", x), g.op("Sin", y), g.op("Cos", y), axis=-1)


def _resampler(g: Graph, ckpt: Checkpoint, dims: VisionDims, vpm: str, grid_xy: str, key_mask: str,
               kind: LinearKind) -> str:
    """kv_proj -> ln_kv; keys + 2-D sin/cos; nn.MultiheadAttention with the 64 learned queries; ln_post; @ proj.

    The queries do not depend on the image: `in_proj_q(ln_q(query))` is computed here once, in float32."""
    def r(n):
        return ckpt.f32(RES + n)
    dd = dims.llm_hidden
    kv = g.layer_norm(g.linear(vpm, r("kv_proj.weight"), None, RES + "kv_proj", kind), r("ln_kv.weight"),
                      r("ln_kv.bias"), RESAMPLER_LN_EPS, RES + "ln_kv")
    wq, wk, wv = np.split(r("attn.in_proj_weight"), 3)
    bq, bk, bv = np.split(r("attn.in_proj_bias"), 3)
    q = (_layer_norm_np(r("query"), r("ln_q.weight"), r("ln_q.bias"), RESAMPLER_LN_EPS) @ wq.T + bq).astype(F32)
    k = g.linear(g.op("Add", kv, _sincos(g, grid_xy, dims)), wk, bk, RES + "k", kind)
    v = g.linear(kv, wv, bv, RES + "v", kind)
    batch = g.op("Slice", g.op("Shape", k), g.i64(0), g.i64(1))
    queries = g.op("Expand", g.const(q[None], RES + "q"), g.op("Concat", batch, g.i64(dims.query_num, dd), axis=0))
    o = g.ms("MultiHeadAttention", queries, k, v, None, key_mask, num_heads=dims.resampler_heads)
    o = g.linear(o, r("attn.out_proj.weight"), r("attn.out_proj.bias"), RES + "out_proj", kind)
    o = g.layer_norm(o, r("ln_post.weight"), r("ln_post.bias"), RESAMPLER_LN_EPS, RES + "ln_post")
    return g.op("MatMul", o, g.const(r("proj"), RES + "proj"))


def build_graph(g: Graph, ckpt: Checkpoint, dims: VisionDims, kind: LinearKind) -> None:
    """The vision graph (contract in edge/vision.py): patches, position_ids, key_bias, grid_xy ->
    vision_embeds, vpm_out."""
    d, p = dims.vision_hidden, dims.patch_size
    patches = g.input(rt.IN_PATCHES, F32, ["slices", "patches", 3 * p * p])
    pos = g.input(rt.IN_POSITION_IDS, np.int64, ["slices", "patches"])
    key_bias = g.input(rt.IN_KEY_BIAS, F32, ["slices", "patches"])
    grid_xy = g.input(rt.IN_GRID_XY, F32, ["slices", "patches", 2])
    # key_bias is 0 on real patches and float32 min on padding; the fused attention takes it as a 0/1 mask
    key_mask = g.op("Cast", g.op("Equal", key_bias, g.const(np.array(0, F32))), to=6)  # int32
    x = g.linear(patches, ckpt.f32(VPM + "embeddings.patch_embedding.weight").reshape(d, -1),
                 ckpt.f32(VPM + "embeddings.patch_embedding.bias"), VPM + "patch", LinearKind.FP32)
    x = g.op("Add", x, g.op("Gather", g.const(ckpt.f32(VPM + "embeddings.position_embedding.weight"),
                                              VPM + "position_embedding"), pos, axis=0))
    vpm = _siglip(g, ckpt, dims, x, key_mask, kind)
    g.output(_resampler(g, ckpt, dims, vpm, grid_xy, key_mask, kind), rt.OUT_EMBEDS, F32,
             ["slices", dims.query_num, dims.llm_hidden])
    g.output(vpm, rt.OUT_VPM, F32, ["slices", "patches", d])


def _example_batch(dims: VisionDims) -> rt.VisionBatch:
    """A small real batch (3 slices of a synthetic image) used as export example and for the int8 check."""
    w, h = _CHECK_IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 32 + yy // 32) % 2) * 255], axis=-1).astype(np.uint8)
    from PIL import Image

    pre = preprocess_image(Image.fromarray(rgb, "RGB"), SliceOptions(patch_size=dims.patch_size))
    return rt.build_batch(pre.slices, pre.tgt_sizes, dims.patch_size, dims.num_patches_per_side)


def weight_bytes_f32(ckpt: Checkpoint, dims: VisionDims) -> int:
    """The fp32 graph's weight bytes, known before building it (decides inline vs external data)."""
    return sum(4 * int(np.prod(ckpt.tensors[n].shape)) for n in required_tensors(dims))


def _write(ckpt: Checkpoint, dims: VisionDims, out_dir: Path, kind: LinearKind, file: str,
           data_file: str | None) -> None:
    """Build and save one variant; with `data_file` the weights stream into it as the graph is built."""
    import onnx

    if data_file is None:
        g = Graph(Path(file).stem)
        build_graph(g, ckpt, dims, kind)
        g.save(out_dir / file)
    else:
        with WeightStore(out_dir / data_file) as store:
            g = Graph(Path(file).stem, store)
            build_graph(g, ckpt, dims, kind)
            g.save(out_dir / file)
    onnx.checker.check_model(str(out_dir / file))


def int8_cosine(fp32_path: Path, int8_path: Path, dims: VisionDims) -> float:
    """Cosine similarity of int8 vs fp32 vision embeddings on the synthetic check image."""
    feeds = _example_batch(dims).feeds()
    a = probe_run(fp32_path, feeds, [rt.OUT_EMBEDS])[0].astype(np.float64).ravel()
    b = probe_run(int8_path, feeds, [rt.OUT_EMBEDS])[0].astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def export(ckpt: Checkpoint, out_dir: Path, *, int8: bool = True, progress: bool = True,
           external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> BundlePart:
    """Write the vision part (fp32 graph, optional int8 graph) into `out_dir` and describe it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = VisionDims.from_checkpoint(ckpt)
    ckpt.require(required_tensors(dims))

    say = reporter("vision", progress)

    say(f"SigLIP {dims.vision_hidden}x{dims.vision_layers} layers, {dims.vision_heads} heads; resampler "
        f"{dims.query_num}x{dims.llm_hidden}, {dims.resampler_heads} heads; writing the ONNX graph")
    external = weight_bytes_f32(ckpt, dims) > external_data_threshold
    _write(ckpt, dims, out_dir, LinearKind.FP32, rt.FILE_FP32, rt.FILE_FP32_DATA if external else None)
    roles = [(rt.ROLE_FP32, rt.FILE_FP32)] + ([(rt.ROLE_FP32_DATA, rt.FILE_FP32_DATA)] if external else [])
    meta = {**asdict(dims), "variants": [rt.ROLE_FP32]}
    if int8:
        say("int8: per-channel 8-bit weight MatMuls")
        _write(ckpt, dims, out_dir, LinearKind.INT8, rt.FILE_INT8, FILE_INT8_DATA if external else None)
        roles.append((rt.ROLE_INT8, rt.FILE_INT8))
        if external:
            roles.append((ROLE_INT8_DATA, FILE_INT8_DATA))
        meta["variants"].append(rt.ROLE_INT8)
        meta["int8_cosine_vs_fp32"] = int8_cosine(out_dir / rt.FILE_FP32, out_dir / rt.FILE_INT8, dims)
        say(f"int8 vs fp32 cosine on a synthetic image: {meta['int8_cosine_vs_fp32']:.5f}")
    cfg = ckpt.config
    slice_cfg = cfg.get("slice_config", {})
    meta["slice"] = {
        "max_slice_nums": int(slice_cfg.get("max_slice_nums", MAX_SLICE_NUMS)),
        "scale_resolution": int(slice_cfg.get("scale_resolution", cfg.get("image_size", SCALE_RESOLUTION))),
        "patch_size": int(slice_cfg.get("patch_size", dims.patch_size)),
        "image_feature_size": int(cfg.get("query_num", dims.query_num)),
        "use_image_id": bool(cfg.get("use_image_id", True)),
    }
    say("done")
    return BundlePart(files={role: BundleFile.describe(out_dir, rel) for role, rel in roles}, meta=meta)
