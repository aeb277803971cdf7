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

The two graphs of a variant share one external-data weights file (`share_weights`), so the weights are on
disk once per variant. Both graphs also output `apm_hidden`, the encoder's final hidden state (after the
final layer norm), the input of the projector. int8 variants come from onnxruntime dynamic quantisation of the
MatMul weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converters.checkpoint import Checkpoint
from converters.int8 import REDUCE_RANGE
from converters.progress import reporter
from edge import audio_encoder as rt
from edge.bundle import BundleFile, BundlePart
from edge.errors import InvalidInputError

APM = "apm."
PROJ = "audio_projection_layer."
OPSET = 17
# openai/whisper-medium encoder values (spec §1.6), used only when config.json lacks the key.
WHISPER_MEDIUM_HEADS = 16
# nn.LayerNorm default eps; Whisper's layer norms are built without an eps argument.
LAYER_NORM_EPS = 1e-5
# Initializers of at least this size go to the shared external-data file, at page-aligned offsets.
EXTERNAL_MIN_BYTES = 1024
EXTERNAL_ALIGN = 4096


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
    def from_checkpoint(cls, ckpt: Checkpoint) -> "AudioDims":
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


def _export_graphs(whole, stream, dims: AudioDims, out_dir: Path) -> None:
    import torch

    t = 2 * rt.MEL_FRAMES_PER_SECOND  # example lengths only; all time axes are dynamic
    s = (t - 1) // 2 + 1
    mel = torch.zeros(1, dims.n_mels, t)
    mask = torch.zeros(1, 1, s, s)
    with torch.no_grad():
        torch.onnx.export(
            whole, (mel, mask), str(out_dir / rt.FILE_WHOLE), input_names=[rt.IN_MEL, rt.IN_MASK],
            output_names=[rt.OUT_HIDDEN, rt.OUT_EMBEDS], opset_version=OPSET, dynamo=False,
            dynamic_axes={rt.IN_MEL: {0: "batch", 2: "frames"}, rt.IN_MASK: {0: "batch", 2: "seq", 3: "seq"},
                          rt.OUT_HIDDEN: {0: "batch", 1: "seq"}, rt.OUT_EMBEDS: {0: "batch", 1: "tokens"}})
        past_names, present_names, axes = [], [], {rt.IN_MEL: {2: "frames"}, rt.OUT_HIDDEN: {1: "seq"},
                                                   rt.OUT_EMBEDS: {1: "tokens"}}
        for i in range(dims.n_layers):
            for kind in ("key", "value"):
                past_names.append(rt.past_name(kind, i))
                present_names.append(rt.present_name(kind, i))
                axes[past_names[-1]] = {2: "past"}
                axes[present_names[-1]] = {2: "total"}
        past = tuple(torch.zeros(1, dims.n_heads, s, dims.head_dim) for _ in past_names)
        torch.onnx.export(
            stream, (torch.zeros(1, dims.n_mels, rt.MEL_FRAMES_PER_SECOND), *past),
            str(out_dir / rt.FILE_STREAM), input_names=[rt.IN_MEL, *past_names],
            output_names=[rt.OUT_HIDDEN, rt.OUT_EMBEDS, *present_names], opset_version=OPSET, dynamo=False,
            dynamic_axes=axes)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic (weight-only int8, activations quantised at run time) quantisation of the MatMul weights.

    Convolutions stay float: they are a small share of the compute and ConvInteger is slower than float Conv
    on most CPU builds of onnxruntime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=REDUCE_RANGE,
                     op_types_to_quantize=["MatMul"])


def share_weights(graphs: list[Path], data_name: str) -> None:
    """Move the initializers of `graphs` into one external-data file, each distinct tensor stored once.

    The whole-utterance and streaming graphs hold the same weights; inline, the audio part of the real
    checkpoint would take 2 x 1.3 GB (fp32). Offsets are page-aligned so onnxruntime can memory-map them."""
    import hashlib

    import onnx

    models = [onnx.load(str(p)) for p in graphs]
    stored: dict[tuple, tuple[int, int]] = {}
    with open(graphs[0].parent / data_name, "wb") as f:
        for model in models:
            for init in model.graph.initializer:
                raw = init.raw_data
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
                if key not in stored:
                    f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGN))
                    stored[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = stored[key]
                init.ClearField("raw_data")
                init.data_location = onnx.TensorProto.EXTERNAL
                del init.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
    for model, path in zip(models, graphs):
        onnx.save(model, str(path))


def export(ckpt: Checkpoint, out_dir: Path, *, int8: bool = True, progress: bool = True) -> BundlePart:
    """Write the audio part (fp32 whole + streaming graphs, and their int8 variants) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dims = AudioDims.from_checkpoint(ckpt)
    ckpt.require(required_tensors(dims))

    say = reporter("audio", progress)

    say(f"Whisper encoder d_model {dims.d_model}, {dims.n_layers} layers, {dims.n_heads} heads -> "
        f"projector {dims.llm_hidden}; exporting ONNX (opset {OPSET})")
    whole, stream = build_torch_modules(ckpt, dims)
    _export_graphs(whole, stream, dims, out_dir)
    files = {rt.ROLE_WHOLE["fp32"]: rt.FILE_WHOLE, rt.ROLE_STREAM["fp32"]: rt.FILE_STREAM,
             rt.ROLE_WEIGHTS["fp32"]: rt.FILE_WEIGHTS}
    if int8:
        say("int8 dynamic quantisation")
        for src, dst, role in ((rt.FILE_WHOLE, rt.FILE_WHOLE_INT8, rt.ROLE_WHOLE["int8"]),
                               (rt.FILE_STREAM, rt.FILE_STREAM_INT8, rt.ROLE_STREAM["int8"])):
            quantize_int8(out_dir / src, out_dir / dst)
            files[role] = dst
        share_weights([out_dir / rt.FILE_WHOLE_INT8, out_dir / rt.FILE_STREAM_INT8], rt.FILE_WEIGHTS_INT8)
        files[rt.ROLE_WEIGHTS["int8"]] = rt.FILE_WEIGHTS_INT8
    share_weights([out_dir / rt.FILE_WHOLE, out_dir / rt.FILE_STREAM], rt.FILE_WEIGHTS)
    meta = {**asdict(dims), "head_dim": dims.head_dim, "opset": OPSET,
            "variants": ["fp32"] + (["int8"] if int8 else [])}
    say("done")
    return BundlePart(files={role: BundleFile.describe(out_dir, rel) for role, rel in files.items()}, meta=meta)
