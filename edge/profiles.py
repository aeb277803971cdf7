"""Device profiles: one named set of runtime choices per class of device, each choice with its reason.

`resolve_profile("auto")` detects the hardware (OS, CPU, cores, memory, board) and picks a profile; any field
can be overridden from the CLI or the Python API. `estimate_memory` predicts the peak resident memory of a bundle
under a profile from the manifest alone, so that loading can be refused up front with a message that says what
to change, instead of the OS killing the process halfway through.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType

from edge.errors import EdgeError

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    cores: int
    memory_bytes: int
    available_bytes: int
    board: str = ""  # "raspberry-pi-5", "jetson-orin", ... from the device tree / tegra release file
    cuda: bool = False

    @classmethod
    def detect(cls) -> "Hardware":
        total, avail = _memory()
        board = ""
        model = Path("/proc/device-tree/model")
        if model.is_file():
            text = model.read_bytes().decode(errors="ignore").lower()
            if "raspberry pi 5" in text:
                board = "raspberry-pi-5"
            elif "raspberry pi" in text:
                board = "raspberry-pi"
            elif "orin" in text:
                board = "jetson-orin"
        if not board and Path("/etc/nv_tegra_release").is_file():
            board = "jetson"
        cuda = False
        try:
            import onnxruntime as ort

            cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        except Exception:
            pass
        return cls(platform.system(), platform.machine().lower(), os.cpu_count() or 1, total, avail, board, cuda)


def _memory() -> tuple[int, int]:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = lambda k: int(info[k].strip().split()[0]) * 1024  # noqa: E731
        return kib("MemTotal"), kib("MemAvailable")
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return total, total // 2
        except (ValueError, OSError, AttributeError):
            return 8 * GIB, 4 * GIB


@dataclass(frozen=True)
class Profile:
    """Attributes (every one a runtime choice; `reasons` says why each profile sets it):
    llm_threads / ort_threads: llama.cpp decode threads and onnxruntime intra-op threads.
    llm_quant: the bundle quantisation to convert for this device (`--llm-quant`).
    vision_variant / audio_variant / tts_variant: "int8" or "fp32" ONNX graphs.
    n_ctx: LLM context; kv_type: KV cache element type.
    use_mmap / repack: llama.cpp weight loading (see bench/memory.py for the resident-memory trade-off).
    n_gpu_layers: layers offloaded to Metal/CUDA (999 = all).
    max_slice_nums: image slices per picture in chat.
    live_fps / live_frame_max_side: camera frames per second and frame size in live mode.
    """

    name: str
    llm_threads: int
    ort_threads: int
    llm_quant: str = "q4_k_m"
    vision_variant: str = "int8"
    audio_variant: str = "int8"
    tts_variant: str = "int8"
    n_ctx: int = 4096
    kv_type: str = "f16"
    use_mmap: bool = False  # see LLMOptions.use_mmap: read + repack = lowest peak at full decode speed
    repack: bool = True
    n_gpu_layers: int = 0
    max_slice_nums: int = 9
    live_fps: float = 1.0
    live_frame_max_side: int = 448
    reasons: MappingProxyType = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def with_overrides(self, **overrides) -> "Profile":
        known = {f.name for f in fields(self)} - {"reasons", "name"}
        bad = set(overrides) - known
        if bad:
            raise ValueError(f"unknown profile field(s) {sorted(bad)}; known: {sorted(known)}")
        return replace(self, name=self.name if not overrides else f"{self.name}+custom", **overrides)

    def llm_options(self, **kw):
        from edge.llm import LLMOptions

        return LLMOptions(n_ctx=self.n_ctx, n_threads=self.llm_threads, n_threads_batch=self.llm_threads,
                          kv_type=self.kv_type, use_mmap=self.use_mmap, repack=self.repack,
                          n_gpu_layers=self.n_gpu_layers, **kw)

    def ort_options(self):
        from edge.onnx_session import OrtOptions

        return OrtOptions(intra_op_threads=self.ort_threads)


def _profile(name: str, reasons: dict, **kw) -> Profile:
    return Profile(name=name, reasons=MappingProxyType(reasons), **kw)


def builtin_profiles(hw: Hardware) -> dict[str, Profile]:
    cores = max(hw.cores, 1)
    return {
        "laptop": _profile("laptop", {
            "llm_threads": "all cores: decode is memory-bound and stages mostly alternate",
            "llm_quant": "Q4_K_M: 4.7 GB, decode near the bandwidth ceiling",
            "variants": "int8 ONNX: 2-5x faster than fp32 on AVX2/AVX-512 at cosine >= 0.99",
            "use_mmap": "read + repack: 4.60 GiB peak vs 7.47 GiB for mmap + repack, same decode speed (measured)",
        }, llm_threads=cores, ort_threads=cores),
        "apple-silicon": _profile("apple-silicon", {
            "n_gpu_layers": "the Metal build of llama-cpp-python runs every layer on the GPU",
            "llm_threads": "performance cores only; Metal does the heavy work",
            "ort_threads": "CPU for the encoders (CoreML provider used when present)",
        }, llm_threads=max(1, min(cores // 2, 8)), ort_threads=max(1, min(cores // 2, 8)), n_gpu_layers=999),
        "pi5": _profile("pi5", {
            "llm_threads": "4 Cortex-A76 cores; all of them for the LLM",
            "n_ctx": "2048: the KV cache must fit 8 GB beside the weights",
            "kv_type": "f16 KV halves its memory against f32",
            "use_mmap": "read into llama.cpp buffers: no second, mapped copy of the weights stays resident "
                        "(-2.9 GiB measured for the 7B Q4_K_M)",
            "max_slice_nums": "4 slices: each SigLIP slice costs seconds on a Pi",
            "live": "0.5 fps, 448 px frames keep live mode within real time",
        }, llm_threads=cores, ort_threads=cores, n_ctx=2048, use_mmap=False, max_slice_nums=4, live_fps=0.5),
        "jetson-orin": _profile("jetson-orin", {
            "n_gpu_layers": "the CUDA build of llama-cpp-python offloads all layers",
            "ort": "onnxruntime-gpu's CUDA provider for the encoders when installed",
            "n_ctx": "4096 fits the shared 8-16 GB memory",
        }, llm_threads=max(1, cores // 2), ort_threads=max(1, cores // 2), n_gpu_layers=999, use_mmap=False),
    }


def detect_profile_name(hw: Hardware) -> str:
    if hw.system == "Darwin" and hw.machine in ("arm64", "aarch64"):
        return "apple-silicon"
    if hw.board.startswith("raspberry-pi"):
        return "pi5"
    if hw.board.startswith("jetson"):
        return "jetson-orin"
    return "laptop"


def resolve_profile(name: str = "auto", hw: Hardware | None = None, **overrides) -> Profile:
    hw = hw or Hardware.detect()
    profiles = builtin_profiles(hw)
    key = detect_profile_name(hw) if name in ("auto", None) else name
    if key == "custom":
        key = detect_profile_name(hw)
    if key not in profiles:
        raise ValueError(f"unknown profile {name!r}; choose auto, custom or one of {', '.join(profiles)}")
    return profiles[key].with_overrides(**overrides) if overrides else profiles[key]


# --- memory estimate -----------------------------------------------------------------------------------------
KV_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32}
# llama.cpp's CPU repack copies the repackable (Q4_0/Q4_K/IQ4) weight tensors into new buffers; with mmap the
# mapped pages of the same tensors have been read during load and stay resident too (measured: Qwen2.5-7B
# Q4_K_M, 4.7 GB file, 7.5 GiB RSS).
REPACK_FRACTION = 0.6
ORT_OVERHEAD = 1.3  # onnxruntime keeps initializers plus arena/working buffers (measured on the tiny and full parts)
PROCESS_BASE_BYTES = 150 * 2**20  # Python + numpy + onnxruntime + llama.cpp: 58 MiB measured after loading the tiny bundle, plus allocator slack


class InsufficientMemoryError(EdgeError, MemoryError):
    def __init__(self, need: int, have: int, advice: str):
        self.need, self.have = need, have
        super().__init__(f"the bundle needs about {need / GIB:.1f} GiB but {have / GIB:.1f} GiB is available. "
                         f"{advice}")


@dataclass(frozen=True)
class MemoryEstimate:
    llm_weights: int
    repack_extra: int
    kv_cache: int
    compute: int
    onnx: int
    base: int

    @property
    def total(self) -> int:
        return self.llm_weights + self.repack_extra + self.kv_cache + self.compute + self.onnx + self.base


def estimate_memory(bundle, profile: Profile, *, parts: tuple[str, ...] = ("vision", "audio", "tts")) -> MemoryEstimate:
    """Peak resident bytes for loading `bundle` under `profile` and running chunked (streamed) speech.
    Not covered: one-shot `synthesize` of a long reply decodes all its frames at once, which adds working memory
    proportional to the reply (measured on the tiny bundle: ~+300 MB for the 2048-frame maximum)."""
    from edge import keys

    llm_file = bundle.part(keys.PART_LLM).files["model"].bytes
    dims = bundle.dims.get("llm") or bundle.part(keys.PART_LLM).meta.get("dims", {})
    n_layers = int(dims.get("num_hidden_layers", 0))
    n_kv = int(dims.get("num_key_value_heads", 0))
    head_dim = int(dims.get("hidden_size", 0)) // max(int(dims.get("num_attention_heads", 1)), 1)
    vocab = int(dims.get("vocab_size", 0))
    quant = bundle.part(keys.PART_LLM).meta.get("quant", "f32")
    kv = int(2 * n_layers * profile.n_ctx * n_kv * head_dim * KV_BYTES.get(profile.kv_type, 2))
    repack = int(llm_file * REPACK_FRACTION) if (profile.repack and profile.use_mmap and quant == "q4_k_m") else 0
    batch = min(512, profile.n_ctx)
    compute = int(batch * vocab * 4 + batch * int(dims.get("intermediate_size", 0)) * 4 * 4)
    variant = {"vision": profile.vision_variant, "audio": profile.audio_variant, "tts": profile.tts_variant}
    onnx = 0
    for name in parts:
        if not bundle.has_part(name):
            continue
        want = variant.get(name, "fp32")
        onnx += int(sum(f.bytes for role, f in bundle.part(name).files.items()
                        if _role_variant(role) in (None, want)) * ORT_OVERHEAD)
    return MemoryEstimate(llm_file, repack, kv, compute, onnx, PROCESS_BASE_BYTES)


def _role_variant(role: str) -> str | None:
    """'fp32' / 'int8' for variant files ('int8', 'whole_int8', 'dvae.int8', 'fp32_data'), None for shared files."""
    words = set(re.split(r"[._/]", role))
    return next((v for v in ("fp32", "int8") if v in words), None)


def check_fits(estimate: MemoryEstimate, hw: Hardware, profile: Profile) -> None:
    if estimate.total <= hw.available_bytes:
        return
    advice = []
    if estimate.repack_extra:
        advice.append("load without mmap (--no-mmap) or without repacking (--no-repack)")
    if profile.n_ctx > 2048:
        advice.append(f"a smaller context (--n-ctx 2048 saves {estimate.kv_cache * (1 - 2048 / profile.n_ctx) / GIB:.1f} GiB)")
    advice.append("a smaller LLM quantisation (--llm-quant q4_k_m)")
    advice.append("int8 ONNX parts")
    raise InsufficientMemoryError(estimate.total, hw.available_bytes, "Try " + "; ".join(advice) + ".")
