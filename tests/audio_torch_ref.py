"""The former torch exporter modules of the audio part (whole-utterance and streaming Whisper encoder +
projector + pooling), kept as a float32 torch reference for the benchmarks (bench/audio.py times onnxruntime
against them). The converter writes its ONNX graphs without torch (converters/audio_encoder.py)."""

from __future__ import annotations

import numpy as np

from converters.audio_encoder import APM, LAYER_NORM_EPS, PROJ, AudioDims
from converters.checkpoint import Checkpoint


def build_torch_modules(ckpt: Checkpoint, dims: AudioDims):
    """(whole, stream) torch modules holding the checkpoint's float32 weights. torch is imported here only."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def param(name: str) -> nn.Parameter:
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(ckpt.f32(name))), requires_grad=False)

    class Layer(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            p = f"{APM}layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                setattr(self, n + "_w", param(p + f"self_attn.{n}.weight"))
            self.q_b, self.v_b = param(p + "self_attn.q_proj.bias"), param(p + "self_attn.v_proj.bias")
            self.out_b = param(p + "self_attn.out_proj.bias")
            self.ln1_w, self.ln1_b = param(p + "self_attn_layer_norm.weight"), param(p + "self_attn_layer_norm.bias")
            self.ln2_w, self.ln2_b = param(p + "final_layer_norm.weight"), param(p + "final_layer_norm.bias")
            self.fc1_w, self.fc1_b = param(p + "fc1.weight"), param(p + "fc1.bias")
            self.fc2_w, self.fc2_b = param(p + "fc2.weight"), param(p + "fc2.bias")

        def heads(self, x):  # (B, S, D) -> (B, H, S, hd)
            return x.reshape(x.shape[0], x.shape[1], dims.n_heads, dims.head_dim).transpose(1, 2)

        def forward(self, x, mask, past_k=None, past_v=None):
            h = F.layer_norm(x, (dims.d_model,), self.ln1_w, self.ln1_b, LAYER_NORM_EPS)
            q = self.heads(F.linear(h, self.q_proj_w, self.q_b))
            k = self.heads(F.linear(h, self.k_proj_w))  # Whisper's k_proj has no bias
            v = self.heads(F.linear(h, self.v_proj_w, self.v_b))
            if past_k is not None:
                k = torch.cat([past_k, k], dim=2)
                v = torch.cat([past_v, v], dim=2)
            scores = torch.matmul(q, k.transpose(2, 3)) * (dims.head_dim ** -0.5)
            if mask is not None:
                scores = scores + mask
            a = torch.matmul(torch.softmax(scores, dim=-1), v)
            a = a.transpose(1, 2).reshape(x.shape[0], x.shape[1], dims.d_model)
            x = x + F.linear(a, self.out_proj_w, self.out_b)
            h = F.layer_norm(x, (dims.d_model,), self.ln2_w, self.ln2_b, LAYER_NORM_EPS)
            x = x + F.linear(F.gelu(F.linear(h, self.fc1_w, self.fc1_b)), self.fc2_w, self.fc2_b)
            return x, k, v

    class Core(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1_w, self.conv1_b = param(APM + "conv1.weight"), param(APM + "conv1.bias")
            self.conv2_w, self.conv2_b = param(APM + "conv2.weight"), param(APM + "conv2.bias")
            self.pos = param(APM + "embed_positions.weight")
            self.layers = nn.ModuleList(Layer(i) for i in range(dims.n_layers))
            self.ln_w, self.ln_b = param(APM + "layer_norm.weight"), param(APM + "layer_norm.bias")
            self.p1_w, self.p1_b = param(PROJ + "linear1.weight"), param(PROJ + "linear1.bias")
            self.p2_w, self.p2_b = param(PROJ + "linear2.weight"), param(PROJ + "linear2.bias")

        def front(self, mel, offset):
            """conv1+GELU, conv2 (stride 2)+GELU, + position rows offset..offset+S (clamped to the table)."""
            x = F.gelu(F.conv1d(mel, self.conv1_w, self.conv1_b, padding=1))
            x = F.gelu(F.conv1d(x, self.conv2_w, self.conv2_b, stride=2, padding=1)).transpose(1, 2)
            ids = torch.arange(x.shape[1], dtype=torch.int64) + offset
            ids = torch.clamp(ids, max=dims.max_positions - 1)
            return x + self.pos[ids]

        def back(self, x):
            """Final layer norm -> apm_hidden; projector -> AvgPool1d(pool_step) -> audio_embeds."""
            hidden = F.layer_norm(x, (dims.d_model,), self.ln_w, self.ln_b, LAYER_NORM_EPS)
            e = F.linear(torch.relu(F.linear(hidden, self.p1_w, self.p1_b)), self.p2_w, self.p2_b)
            e = F.avg_pool1d(e.transpose(1, 2), dims.pool_step, dims.pool_step).transpose(1, 2)
            return hidden, e

    class Whole(nn.Module):
        def __init__(self, core):
            super().__init__()
            self.core = core

        def forward(self, mel, attn_mask):
            x = self.core.front(mel, 0)
            for layer in self.core.layers:
                x, _, _ = layer(x, attn_mask)
            return self.core.back(x)

    class Stream(nn.Module):
        def __init__(self, core):
            super().__init__()
            self.core = core

        def forward(self, mel, *past):
            x = self.core.front(mel, past[0].shape[2])
            presents = []
            for i, layer in enumerate(self.core.layers):
                x, k, v = layer(x, None, past[2 * i], past[2 * i + 1])
                presents += [k, v]
            hidden, e = self.core.back(x)
            return (hidden, e, *presents)

    core = Core().eval()
    return Whole(core).eval(), Stream(core).eval()
