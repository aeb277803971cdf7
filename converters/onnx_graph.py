"""A small ONNX graph builder over `onnx.helper`: nodes, inputs/outputs and weights, written without torch.

Why not torch.onnx: the runtime never needs torch, so the converter should not either (a CPU torch wheel is
~200 MB, the default Linux one several GB). The part builders (`converters/vision.py`, `audio_encoder.py`,
`tts.py`) describe their graphs with this class directly from the checkpoint's numpy tensors.

Weights stream: with a `WeightStore` every initializer of at least `EXTERNAL_MIN_BYTES` is written to one
external-data file as soon as it is added (page-aligned, so onnxruntime can memory-map it) and the graph proto
holds only its location. Conversion memory is then one tensor at a time, not the whole part. Several graphs
may share one store: a tensor added twice under the same name is stored once (the whole-utterance and
streaming audio graphs hold the same weights).

Linear layers come in three variants (`LinearKind`): fp32 MatMul; int8 = per-output-channel symmetric int8
weights run by onnxruntime's `DynamicQuantizeMatMul` (activations quantised to uint8 at run time, what
`onnxruntime.quantization.quantize_dynamic(per_channel=True)` produces after onnxruntime's own fusion), with
7-bit weight values ([-63, 63], onnxruntime's `reduce_range`): on x86 CPUs without VNNI the u8 x s8 kernel sums
pairs of products in 16 bits, which saturates with full 8-bit weights (measured: cosine 0.982 vs fp32 on one
golden Whisper fc1 with [-127, 127]; uint8 weights avoid it too but run ~4x slower, 17.6 s vs 4.3 s for a
448x448 SigLIP slice). nbits8 =
weight-only 8-bit blocks of 32 in `MatMulNBits` (the block layout of llama.cpp's Q8_0).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators
OPSET = 17  # LayerNormalization is in the default domain from 17 on
MS_OPSET = 1
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inline (scales, norms of the tiny checkpoints)
EXTERNAL_ALIGN = 4096  # page alignment for memory-mapping
INT8_QMAX = 63  # 7-bit symmetric int8 weights (onnxruntime's reduce_range; see the module docstring)
NBITS_QMAX = 127  # MatMulNBits' int8 blocks use the full range (its kernels do not saturate)
NBITS_BITS, NBITS_BLOCK, NBITS_ACCURACY_LEVEL = 8, 32, 4  # accuracy level 4: int8 dot products
NBITS_ZERO = 1 << (NBITS_BITS - 1)  # MatMulNBits' implied zero point when none is given (2^(bits-1))


class LinearKind(enum.Enum):
    FP32 = "fp32"
    INT8 = "int8"  # DynamicQuantizeMatMul, per-channel int8 weights
    NBITS8 = "nbits8"  # MatMulNBits, 8-bit blocks of NBITS_BLOCK


class WeightStore:
    """One external-data file that initializers are appended to as they are created."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close() or the with block)
        self._stored: dict[str, tuple[int, int, tuple[int, ...], int]] = {}

    def tensor(self, name: str, array: np.ndarray):
        from onnx import TensorProto, helper

        a = np.ascontiguousarray(array)
        dtype = helper.np_dtype_to_tensor_dtype(a.dtype)
        if name not in self._stored:
            self._f.write(b"\0" * (-self._f.tell() % EXTERNAL_ALIGN))
            offset = self._f.tell()
            self._f.write(a.tobytes())
            self._stored[name] = (offset, a.nbytes, a.shape, dtype)
        offset, length, shape, dt = self._stored[name]
        if (shape, dt) != (a.shape, dtype):
            raise ValueError(f"weight {name} was stored with shape {shape}, now {a.shape}: names must be unique")
        t = TensorProto(name=name, data_type=dtype, dims=list(a.shape), data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> WeightStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe_run(path: Path, feed: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    """One converter-side check run of a written graph. Weight pre-packing is off: it would hold a second copy
    of every weight for a single run (a full-size part's weights are GBs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(outputs, feed)


def quantize_int8_per_channel(w_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) float -> (int8 (K, N), scale (N,)): symmetric per output column, round to nearest."""
    amax = np.abs(w_t).max(axis=0).astype(np.float32)
    scale = np.where(amax > 0, amax / INT8_QMAX, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w_t / scale), -INT8_QMAX, INT8_QMAX)
    return q.astype(np.int8), scale


def quantize_nbits8(w: np.ndarray, block: int = NBITS_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float (torch Linear layout) -> MatMulNBits B (N, K/block, block) uint8 and scales (N * K/block,).

    Symmetric per block: q = round(w / s) + 2^(bits-1), s = max|w| / 127; K is zero-padded to the block."""
    n, k = w.shape
    pad = -k % block
    wb = np.pad(w.astype(np.float32), ((0, 0), (0, pad))).reshape(n, -1, block)
    amax = np.abs(wb).max(axis=2)
    scale = np.where(amax > 0, amax / NBITS_QMAX, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(wb / scale[..., None]), -NBITS_QMAX, NBITS_QMAX) + NBITS_ZERO
    return q.astype(np.uint8), scale.reshape(-1)


@dataclass
class Graph:
    """Nodes, graph inputs/outputs and initializers of one ONNX graph; `op` returns the output name(s)."""

    name: str
    store: WeightStore | None = None
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    _names: set = field(default_factory=set)
    _count: int = 0

    def input(self, name: str, dtype, shape: list) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                         shape))
        return name

    def output(self, value: str, name: str, dtype, shape: list) -> str:
        """Expose `value` as graph output `name` (an Identity renames it when needed)."""
        from onnx import helper

        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                                          shape))
        return name

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, array, name: str | None = None, dtype=None) -> str:
        """An initializer; big ones go to the weight store when there is one. Returns its name."""
        from onnx import numpy_helper

        a = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        name = name or self._fresh("c")
        if name in self._names:
            return name
        self._names.add(name)
        if self.store is not None and a.nbytes >= EXTERNAL_MIN_BYTES:
            self.initializers.append(self.store.tensor(name, a))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(a), name))
        return name

    def i64(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64))

    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, domain: str = "", name: str | None = None,
           **attrs):
        from onnx import helper

        stem = name or op_type.lower()
        outs = [self._fresh(stem) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                           name=self._fresh("n_" + stem), domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def ms(self, op_type: str, *inputs: str | None, outputs: int = 1, **attrs):
        return self.op(op_type, *inputs, outputs=outputs, domain=MS_DOMAIN, **attrs)

    # --- layers -----------------------------------------------------------------------------------------------
    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str,
               kind: LinearKind = LinearKind.FP32) -> str:
        """y = x @ w.T + b for a torch-layout weight w (out, in)."""
        n_out, k = w.shape
        if kind is LinearKind.INT8:
            q, scale = quantize_int8_per_channel(np.ascontiguousarray(w.T, dtype=np.float32))
            zp = np.zeros(n_out, dtype=np.int8)
            bias = self.const(b.astype(np.float32), name + ".bias") if b is not None else None
            return self.ms("DynamicQuantizeMatMul", x, self.const(q, name + ".weight_q"),
                           self.const(scale, name + ".weight_scale"), self.const(zp, name + ".weight_zp"), bias)
        if kind is LinearKind.NBITS8:
            q, scale = quantize_nbits8(w)
            y = self.ms("MatMulNBits", x, self.const(q, name + ".weight_q"), self.const(scale, name + ".weight_scale"),
                        K=k, N=n_out, bits=NBITS_BITS, block_size=NBITS_BLOCK, accuracy_level=NBITS_ACCURACY_LEVEL)
        else:
            y = self.op("MatMul", x, self.const(np.ascontiguousarray(w.T, dtype=np.float32), name + ".weight"),
                        name="matmul")
        return self.op("Add", y, self.const(b.astype(np.float32), name + ".bias")) if b is not None else y

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, eps: float, name: str) -> str:
        return self.op("LayerNormalization", x, self.const(w, name + ".weight"), self.const(b, name + ".bias"),
                       axis=-1, epsilon=float(eps))

    # --- output -----------------------------------------------------------------------------------------------
    def model(self):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                       helper.make_opsetid(MS_DOMAIN, MS_OPSET)],
                                 producer_name="minicpmo-edge")

    def save(self, path: Path) -> Path:
        """Write the graph; external weights must already be in the store's file next to `path`."""
        import onnx

        path = Path(path)
        if self.store is not None and self.store.path.parent != path.parent:
            raise ValueError(f"external weights {self.store.path} must sit next to the graph {path}")
        onnx.save_model(self.model(), str(path))
        return path
