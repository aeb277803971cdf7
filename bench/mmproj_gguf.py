"""A llama.cpp mmproj GGUF (arch "clip", projector "resampler") from a checkpoint's `vpm.*` + `resampler.*`.

    python -m bench.mmproj_gguf CKPT_DIR OUT.gguf [--dtype f16|f32]

Benchmark tool only (not part of the runtime): it lets bench/vision_mtmd.py time llama.cpp's own vision path
(libmtmd, `clip_graph_minicpmv`) on the very weights our ONNX graph runs. The layout is learned from the public
llama.cpp source, not copied: `tools/mtmd/legacy-models/minicpmv-convert-image-encoder-to-gguf.py` (what the
official MiniCPM-o 2.6 mmproj files were written with), `tools/mtmd/clip-impl.h` (key and tensor names),
`tools/mtmd/clip.cpp` (what the loader requires) and `tools/mtmd/models/minicpmv.cpp` (the graph):

- keys: `clip.projector_type` = "resampler", `clip.minicpmv_version` = 4 (MiniCPM-o 2.6), SigLIP sizes under
  `clip.vision.*`, `clip.use_gelu` (tanh GELU = gelu_pytorch_tanh), image mean/std 0.5, `image_size` = the
  slice side (config `image_size`, 448), `clip.minicpmv_query_num`.
- SigLIP tensors `v.*`: `v.patch_embd.{weight,bias}`, `v.position_embd.weight` (70x70 table),
  `v.blk.N.attn_{q,k,v,out}`, `v.blk.N.ln{1,2}`, `v.post_ln`. The official converter names `mlp.fc1` as
  `ffn_down` and `fc2` as `ffn_up` (legacy naming); clip.cpp detects that by shape and swaps them back. We
  write the same legacy names so the file is what the official tool would produce.
- resampler: `resampler.query`, `resampler.kv.weight`, packed `attn.in_proj_*` split into `attn.{q,k,v}.*`,
  `attn.out.*`, `ln_{q,kv,post}.*`, `proj.weight` = `proj`^T (the checkpoint applies `x @ proj`; ggml's
  matmul wants (out, in)), plus `resampler.pos_embed_k`: the 2-D sin/cos table for a 70x70 grid that the loader
  requires (the graph itself recomputes the position embedding per slice size).
- dtypes as the official converter: 4-D (the patch conv) always f16; with `f16`, 2-D `*.weight` tensors f16
  and everything else f32; with `f32`, everything but the conv in f32.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from converters.checkpoint import Checkpoint
from converters.vision import RESAMPLER_HEAD_DIM, SIGLIP_HEADS, SIGLIP_LAYERS
from edge.errors import InvalidInputError

ARCH = "clip"
PROJECTOR_TYPE = "resampler"
MINICPMV_VERSION_O26 = 4  # converter --minicpmv_version: "MiniCPM-o-2.6 use 4"
DTYPES = ("f16", "f32")
# general.file_type written by the official converter: 0 = all f32, 1 = mostly f16.
FILE_TYPE = {"f32": 0, "f16": 1}
# SigLIP / resampler constants the official code hard-codes (spec §1.4, §1.5; converter defaults).
LAYER_NORM_EPS = 1e-6
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
POS_EMBED_GRID = 70  # resampler max_size (70, 70); the converter's pos_embed_k table side
SINCOS_BASE = 10000.0
DEFAULT_SLICE_SIDE = 448  # config image_size default
DEFAULT_QUERY_NUM = 64

# Key names (clip-impl.h).
K_HAS_TEXT = "clip.has_text_encoder"
K_HAS_VISION = "clip.has_vision_encoder"
K_HAS_MINICPMV = "clip.has_minicpmv_projector"
K_PROJ_TYPE = "clip.projector_type"
K_MINICPMV_VERSION = "clip.minicpmv_version"
K_QUERY_NUM = "clip.minicpmv_query_num"
K_IMAGE_SIZE = "clip.vision.image_size"
K_PATCH_SIZE = "clip.vision.patch_size"
K_N_EMBD = "clip.vision.embedding_length"
K_N_FF = "clip.vision.feed_forward_length"
K_PROJ_DIM = "clip.vision.projection_dim"
K_N_HEAD = "clip.vision.attention.head_count"
K_LN_EPS = "clip.vision.attention.layer_norm_epsilon"
K_N_BLOCK = "clip.vision.block_count"
K_IMAGE_MEAN = "clip.vision.image_mean"
K_IMAGE_STD = "clip.vision.image_std"
K_USE_GELU = "clip.use_gelu"
PROJ_WEIGHT = "resampler.proj.weight"

# checkpoint name (under vpm.encoder.layers.N.) -> GGUF name (under v.blk.N.)
_LAYER_MAP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
    "mlp.fc1": "ffn_down", "mlp.fc2": "ffn_up",  # legacy names, see module docstring
}


@dataclass(frozen=True)
class MmprojOptions:
    """dtype: "f16" (what the published MiniCPM-o 2.6 mmproj files use) or "f32" (for a tight parity check)."""

    dtype: str = "f16"
    minicpmv_version: int = MINICPMV_VERSION_O26

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"mmproj dtype {self.dtype!r} is not one of {', '.join(DTYPES)}.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]  # float32, already in GGUF layout


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
    """(grid*grid, embed_dim) float32 2-D sin/cos table, row-major over (row, col): the first half of the
    channels encodes the column, the second the row, each as [sin, cos] over embed_dim/4 frequencies
    (resampler.py `get_2d_sincos_pos_embed`, "w goes first")."""
    quarter = embed_dim // 4
    omega = 1.0 / SINCOS_BASE ** (np.arange(quarter, dtype=np.float32) / np.float32(quarter))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def half(pos: np.ndarray) -> np.ndarray:
        ang = pos.reshape(-1, 1) * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([half(cols), half(rows)], axis=1).astype(np.float32)


def vision_hparams(ckpt: Checkpoint) -> dict:
    """Sizes from tensor shapes (robust to a config missing keys), counts from config.json."""
    cfg, vcfg = ckpt.config, ckpt.config.get("vision_config", {})
    ckpt.require(["vpm.embeddings.patch_embedding.weight", "vpm.encoder.layers.0.mlp.fc1.weight",
                  "resampler.query", "resampler.proj"])
    hidden, _, patch, _ = ckpt.tensors["vpm.embeddings.patch_embedding.weight"].shape
    layers = int(vcfg.get("num_hidden_layers", SIGLIP_LAYERS))
    if cfg.get("drop_vision_last_layer"):
        layers -= 1  # MiniCPMO.init_vision_module drops the last SigLIP block
    query_num, llm_hidden = ckpt.tensors["resampler.query"].shape
    if llm_hidden % RESAMPLER_HEAD_DIM:
        raise InvalidInputError(f"resampler width {llm_hidden} is not a multiple of {RESAMPLER_HEAD_DIM}: mtmd's "
                                "resampler graph (models/minicpmv.cpp) hard-codes 128-wide heads.")
    return {
        "hidden": int(hidden), "ffn": int(ckpt.tensors["vpm.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "heads": int(vcfg.get("num_attention_heads", SIGLIP_HEADS)), "layers": layers, "patch": int(patch),
        "slice_side": int(cfg.get("image_size", DEFAULT_SLICE_SIDE)), "query_num": int(query_num),
        "llm_hidden": int(llm_hidden),
    }


def tensor_specs(ckpt: Checkpoint, hp: dict) -> Iterator[TensorSpec]:
    """Every tensor of the mmproj with a lazy loader (one tensor in memory at a time when writing)."""
    def direct(src: str, gguf: str) -> TensorSpec:
        return TensorSpec(gguf, tuple(ckpt.tensors[src].shape), lambda: ckpt.f32(src))

    yield direct("vpm.embeddings.patch_embedding.weight", "v.patch_embd.weight")
    yield direct("vpm.embeddings.patch_embedding.bias", "v.patch_embd.bias")
    yield direct("vpm.embeddings.position_embedding.weight", "v.position_embd.weight")
    for i in range(hp["layers"]):
        for src, dst in _LAYER_MAP.items():
            for kind in ("weight", "bias"):
                yield direct(f"vpm.encoder.layers.{i}.{src}.{kind}", f"v.blk.{i}.{dst}.{kind}")
    for kind in ("weight", "bias"):
        yield direct(f"vpm.post_layernorm.{kind}", f"v.post_ln.{kind}")

    e = hp["llm_hidden"]
    yield direct("resampler.query", "resampler.query")
    yield direct("resampler.kv_proj.weight", "resampler.kv.weight")
    for kind, src in (("weight", "resampler.attn.in_proj_weight"), ("bias", "resampler.attn.in_proj_bias")):
        for j, part in enumerate("qkv"):
            shape = (e, e) if kind == "weight" else (e,)
            yield TensorSpec(f"resampler.attn.{part}.{kind}", shape,
                             lambda src=src, j=j: np.ascontiguousarray(ckpt.f32(src)[j * e:(j + 1) * e]))
    for kind in ("weight", "bias"):
        yield direct(f"resampler.attn.out_proj.{kind}", f"resampler.attn.out.{kind}")
        for ln in ("q", "kv", "post"):
            yield direct(f"resampler.ln_{ln}.{kind}", f"resampler.ln_{ln}.{kind}")
    yield TensorSpec(PROJ_WEIGHT, (e, e), lambda: np.ascontiguousarray(ckpt.f32("resampler.proj").T))
    yield TensorSpec("resampler.pos_embed_k", (POS_EMBED_GRID ** 2, e), lambda: sincos_2d(e, POS_EMBED_GRID))


def stored_dtype(spec: TensorSpec, dtype: str) -> type:
    """The official converter's rule (see module docstring)."""
    if len(spec.shape) == 4:
        return np.float16
    if dtype == "f16" and spec.name.endswith(".weight") and len(spec.shape) == 2:
        return np.float16
    return np.float32


def write_mmproj(ckpt: Checkpoint, path: Path, options: MmprojOptions = MmprojOptions()) -> Path:
    """Write the mmproj GGUF to `path` (atomically, via a .incomplete file) and return `path`."""
    import gguf

    hp = vision_hparams(ckpt)
    ckpt.require(_source_names(hp))
    specs = list(tensor_specs(ckpt, hp))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".incomplete")
    w = gguf.GGUFWriter(str(tmp), arch=ARCH)
    w.add_bool(K_HAS_TEXT, False)
    w.add_bool(K_HAS_VISION, True)
    w.add_bool(K_HAS_MINICPMV, True)
    w.add_file_type(FILE_TYPE[options.dtype])
    w.add_description("image encoder for MiniCPM-V (MiniCPM-o Edge bench/mmproj_gguf.py)")
    w.add_string(K_PROJ_TYPE, PROJECTOR_TYPE)
    w.add_int32(K_MINICPMV_VERSION, options.minicpmv_version)
    w.add_uint32(K_IMAGE_SIZE, hp["slice_side"])
    w.add_uint32(K_PATCH_SIZE, hp["patch"])
    w.add_uint32(K_N_EMBD, hp["hidden"])
    w.add_uint32(K_N_FF, hp["ffn"])
    w.add_uint32(K_PROJ_DIM, 0)
    w.add_uint32(K_N_HEAD, hp["heads"])
    w.add_float32(K_LN_EPS, LAYER_NORM_EPS)
    w.add_uint32(K_N_BLOCK, hp["layers"])
    w.add_uint32(K_QUERY_NUM, hp["query_num"])
    w.add_array(K_IMAGE_MEAN, list(IMAGE_MEAN))
    w.add_array(K_IMAGE_STD, list(IMAGE_STD))
    w.add_bool(K_USE_GELU, True)
    for s in specs:
        dt = np.dtype(stored_dtype(s, options.dtype))
        w.add_tensor_info(s.name, s.shape, dt, int(np.prod(s.shape)) * dt.itemsize)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for s in specs:
            arr = s.load()
            if arr.shape != s.shape:
                raise InvalidInputError(f"{s.name}: checkpoint tensor has shape {arr.shape}, expected {s.shape}.")
            w.write_tensor_data(np.ascontiguousarray(arr.astype(stored_dtype(s, options.dtype))))
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _source_names(hp: dict) -> list[str]:
    names = ["vpm.embeddings.patch_embedding.bias", "vpm.embeddings.position_embedding.weight",
             "vpm.post_layernorm.weight", "vpm.post_layernorm.bias", "resampler.kv_proj.weight",
             "resampler.attn.in_proj_weight", "resampler.attn.in_proj_bias", "resampler.attn.out_proj.weight",
             "resampler.attn.out_proj.bias"]
    names += [f"resampler.ln_{ln}.{k}" for ln in ("q", "kv", "post") for k in ("weight", "bias")]
    names += [f"vpm.encoder.layers.{i}.{src}.{k}" for i in range(hp["layers"]) for src in _LAYER_MAP
              for k in ("weight", "bias")]
    return names


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=DTYPES, default="f16")
    a = ap.parse_args(argv)
    print(write_mmproj(Checkpoint.open(a.ckpt), a.out, MmprojOptions(dtype=a.dtype)))


if __name__ == "__main__":
    main()
