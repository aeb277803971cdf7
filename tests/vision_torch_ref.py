"""The former torch exporter module of the vision part, kept as an independent float32 torch reference for the
tests (tests/test_mtmd_parity.py emulates ggml's f16 steps on it). The converter writes its ONNX graph without
torch (converters/vision.py); this module is written from the spec the same way and holds the same weights."""

from __future__ import annotations

from converters.checkpoint import Checkpoint
from converters.vision import (  # noqa: F401
    RES,
    RESAMPLER_HEAD_DIM,
    RESAMPLER_LN_EPS,
    VPM,
    VisionDims,
    sincos_omega,
)


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


