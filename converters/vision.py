"""`vpm.*` (SigLIP NaViT) + `resampler.*` of a MiniCPM-o checkpoint -> one ONNX graph (+ an int8 variant).

The torch modules below are written from the spec (§1.4, §1.5) and built directly from the checkpoint tensors,
so no remote code is needed. The graph contract (inputs, outputs, what numpy prepares) is documented in
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

int8: onnxruntime dynamic quantisation of the weight MatMuls only (activation x activation MatMuls of the
attention stay float: quantising softmax probabilities to 8 bits costs accuracy for no size gain). The cosine
of int8 vs fp32 embeddings on a synthetic image is measured at export time and stored in the part meta.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.int8 import REDUCE_RANGE
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
OPSET = 17
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
    def from_checkpoint(cls, ckpt: Checkpoint) -> "VisionDims":
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


def build_torch_module(ckpt: Checkpoint, dims: VisionDims):
    """The export graph as a torch module with the checkpoint's weights (float32, exact from bf16)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def param(name: str, shape: tuple[int, ...] | None = None) -> nn.Parameter:
        a = ckpt.f32(name)
        return nn.Parameter(torch.from_numpy(a.reshape(shape) if shape else a.copy()), requires_grad=False)

    class Block(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            pre = f"{VPM}encoder.layers.{i}."
            for mod, short in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
                               ("self_attn.out_proj", "o"), ("layer_norm1", "ln1"), ("layer_norm2", "ln2"),
                               ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                setattr(self, short + "_w", param(pre + mod + ".weight"))
                setattr(self, short + "_b", param(pre + mod + ".bias"))

        def forward(self, x, bias):
            d, nh = dims.vision_hidden, dims.vision_heads
            hd = d // nh
            h = F.layer_norm(x, (d,), self.ln1_w, self.ln1_b, dims.layer_norm_eps)
            q = F.linear(h, self.q_w, self.q_b).reshape(x.shape[0], -1, nh, hd).transpose(1, 2)
            k = F.linear(h, self.k_w, self.k_b).reshape(x.shape[0], -1, nh, hd).transpose(1, 2)
            v = F.linear(h, self.v_w, self.v_b).reshape(x.shape[0], -1, nh, hd).transpose(1, 2)
            s = torch.matmul(q, k.transpose(2, 3)) * (hd ** -0.5) + bias
            a = torch.matmul(torch.softmax(s, dim=-1), v).transpose(1, 2).reshape(x.shape[0], -1, d)
            x = x + F.linear(a, self.o_w, self.o_b)
            h = F.layer_norm(x, (d,), self.ln2_w, self.ln2_b, dims.layer_norm_eps)
            h = F.linear(F.gelu(F.linear(h, self.fc1_w, self.fc1_b), approximate="tanh"), self.fc2_w, self.fc2_b)
            return x + h

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            d, p = dims.vision_hidden, dims.patch_size
            self.patch_w = param(VPM + "embeddings.patch_embedding.weight", (d, 3 * p * p))
            self.patch_b = param(VPM + "embeddings.patch_embedding.bias")
            self.pos_table = param(VPM + "embeddings.position_embedding.weight")
            self.blocks = nn.ModuleList([Block(i) for i in range(dims.vision_layers)])
            self.post_w = param(VPM + "post_layernorm.weight")
            self.post_b = param(VPM + "post_layernorm.bias")
            for n in ("query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                      "attn.out_proj.bias", "proj", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias",
                      "ln_post.weight", "ln_post.bias"):
                setattr(self, "r_" + n.replace(".", "_"), param(RES + n))
            self.register_buffer("omega", torch.from_numpy(sincos_omega(dims.llm_hidden)), persistent=False)

        def sincos(self, grid_xy):
            x = grid_xy[..., 0:1] * self.omega
            y = grid_xy[..., 1:2] * self.omega
            return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=-1)

        def forward(self, patches, position_ids, key_bias, grid_xy):
            bias = key_bias[:, None, None, :]
            x = F.linear(patches, self.patch_w, self.patch_b) + F.embedding(position_ids, self.pos_table)
            for blk in self.blocks:
                x = blk(x, bias)
            vpm = F.layer_norm(x, (dims.vision_hidden,), self.post_w, self.post_b, dims.layer_norm_eps)
            # resampler
            dd, nh = dims.llm_hidden, dims.resampler_heads
            hd = dd // nh
            kv = F.layer_norm(F.linear(vpm, self.r_kv_proj_weight), (dd,), self.r_ln_kv_weight, self.r_ln_kv_bias,
                              RESAMPLER_LN_EPS)
            wq, wk, wv = self.r_attn_in_proj_weight.chunk(3, dim=0)
            bq, bk, bv = self.r_attn_in_proj_bias.chunk(3, dim=0)
            q = F.layer_norm(self.r_query, (dd,), self.r_ln_q_weight, self.r_ln_q_bias, RESAMPLER_LN_EPS)
            q = (F.linear(q, wq, bq) * (hd ** -0.5)).reshape(dims.query_num, nh, hd).transpose(0, 1)
            k = F.linear(kv + self.sincos(grid_xy), wk, bk).reshape(x.shape[0], -1, nh, hd).permute(0, 2, 3, 1)
            v = F.linear(kv, wv, bv).reshape(x.shape[0], -1, nh, hd).transpose(1, 2)
            a = torch.softmax(torch.matmul(q, k) + bias, dim=-1)
            o = torch.matmul(a, v).transpose(1, 2).reshape(x.shape[0], dims.query_num, dd)
            o = F.linear(o, self.r_attn_out_proj_weight, self.r_attn_out_proj_bias)
            o = F.layer_norm(o, (dd,), self.r_ln_post_weight, self.r_ln_post_bias, RESAMPLER_LN_EPS)
            return torch.matmul(o, self.r_proj), vpm

    return Graph().eval()


def _example_batch(dims: VisionDims) -> rt.VisionBatch:
    """A small real batch (3 slices of a synthetic image) used as export example and for the int8 check."""
    w, h = _CHECK_IMAGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 32 + yy // 32) % 2) * 255], axis=-1).astype(np.uint8)
    from PIL import Image

    pre = preprocess_image(Image.fromarray(rgb, "RGB"), SliceOptions(patch_size=dims.patch_size))
    return rt.build_batch(pre.slices, pre.tgt_sizes, dims.patch_size, dims.num_patches_per_side)


def _export_onnx(module, dims: VisionDims, path: Path) -> None:
    import torch

    batch = _example_batch(dims)
    args = tuple(torch.from_numpy(a) for a in (batch.patches, batch.position_ids, batch.key_bias, batch.grid_xy))
    axes = {rt.IN_PATCHES: {0: "slices", 1: "patches"}, rt.IN_POSITION_IDS: {0: "slices", 1: "patches"},
            rt.IN_KEY_BIAS: {0: "slices", 1: "patches"}, rt.IN_GRID_XY: {0: "slices", 1: "patches"},
            rt.OUT_EMBEDS: {0: "slices"}, rt.OUT_VPM: {0: "slices", 1: "patches"}}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=[rt.IN_PATCHES, rt.IN_POSITION_IDS, rt.IN_KEY_BIAS,
                                                                rt.IN_GRID_XY],
                          output_names=[rt.OUT_EMBEDS, rt.OUT_VPM], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)


def _save_final(src: Path, out_dir: Path, threshold: int) -> list[tuple[str, str]]:
    """Re-save the exported graph into out_dir: one file, or graph + one external-data file if it is big."""
    import onnx

    model = onnx.load(str(src))
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    dst = out_dir / rt.FILE_FP32
    if weight_bytes > threshold:
        data = out_dir / rt.FILE_FP32_DATA
        if data.exists():
            data.unlink()  # onnx appends to an existing data file
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=rt.FILE_FP32_DATA, size_threshold=1024)
        onnx.checker.check_model(str(dst))
        return [(rt.ROLE_FP32, rt.FILE_FP32), (rt.ROLE_FP32_DATA, rt.FILE_FP32_DATA)]
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return [(rt.ROLE_FP32, rt.FILE_FP32)]


def weight_matmul_nodes(path: Path) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (initializer): the ones worth quantising."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (per-channel weights, activations quantised at run time) of the weight MatMuls."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=REDUCE_RANGE,
                     op_types_to_quantize=["MatMul"], nodes_to_quantize=weight_matmul_nodes(src))


def int8_cosine(fp32_path: Path, int8_path: Path, dims: VisionDims) -> float:
    """Cosine similarity of int8 vs fp32 vision embeddings on the synthetic check image."""
    from edge.onnx_session import make_session

    feeds = _example_batch(dims).feeds()
    a = make_session(fp32_path).run([rt.OUT_EMBEDS], feeds)[0].astype(np.float64).ravel()
    b = make_session(int8_path).run([rt.OUT_EMBEDS], feeds)[0].astype(np.float64).ravel()
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
        f"{dims.query_num}x{dims.llm_hidden}, {dims.resampler_heads} heads; exporting ONNX (opset {OPSET})")
    module = build_torch_module(ckpt, dims)
    tmp = Path(tempfile.mkdtemp(prefix=".vision-", dir=out_dir))
    try:
        _export_onnx(module, dims, tmp / rt.FILE_FP32)
        del module
        roles = _save_final(tmp / rt.FILE_FP32, out_dir, external_data_threshold)
        meta = {**asdict(dims), "opset": OPSET, "variants": [rt.ROLE_FP32]}
        if int8:
            say("int8 dynamic quantisation of the weight MatMuls")
            quantize_int8(out_dir / rt.FILE_FP32, tmp / rt.FILE_INT8)
            (tmp / rt.FILE_INT8).replace(out_dir / rt.FILE_INT8)
            roles.append((rt.ROLE_INT8, rt.FILE_INT8))
            meta["variants"].append(rt.ROLE_INT8)
            meta["int8_cosine_vs_fp32"] = int8_cosine(out_dir / rt.FILE_FP32, out_dir / rt.FILE_INT8, dims)
            say(f"int8 vs fp32 cosine on a synthetic image: {meta['int8_cosine_vs_fp32']:.5f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
