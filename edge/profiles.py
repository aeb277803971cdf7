"""Device profiles: one named set of runtime choices per class of device, each choice with its reason.

`resolve_profile("auto")` detects the hardware (OS, CPU, cores, memory, board) and picks a profile; any field
can be overridden from the CLI or the Python API. `estimate_memory` predicts the peak resident memory of a bundle
under a profile from the manifest alone, so that loading can be refused up front with a message that says what
to change, instead of the OS killing the process halfway through.
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import get_type_hints

from edge import keys
from edge.errors import InsufficientMemoryError
from edge.onnx_session import OrtOptions
from edge.options import LLMOptions, OmniOptions, ThreadSplit

log = logging.getLogger("edge.profiles")

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
        except Exception:  # noqa: BLE001 - a broken onnxruntime build: no CUDA, detection goes on
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


PROFILE_NAMES = ("laptop", "apple-silicon", "pi5", "jetson-orin")
PROFILE_CHOICES = ("auto", *PROFILE_NAMES, "custom")  # auto = detected; custom = detected + --set overrides
VARIANTS = ("fp32", "int8")
LLM_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")  # what `convert --llm-quant` writes
# Live mode sends at most one camera frame per 1-s unit (the official TDM); the governor's lowest rate is one
# frame per 8 units (GovernorOptions.max_stride), so a profile's live frame rate lies between the two.
LIVE_FPS_RANGE = (1 / 8, 1.0)
# VGA: the usual webcam mode, and larger than the 1-slice encoder input of a 4:3 frame (~518x388, from
# find_best_resize at 448^2 area), so capping frames there loses nothing the model sees.
LIVE_FRAME_MAX_SIDE = 640
LIVE_N_CTX = 8192  # a live session grows ~100 tokens per second of video+audio; the web demo resets at 8192


@dataclass(frozen=True)
class Profile:
    """Attributes (every one a runtime choice; `reasons` says why each profile sets it):
    llm_threads / ort_threads: llama.cpp decode threads and onnxruntime intra-op threads (demo, chat, serve).
    llm_quant: the bundle quantisation to convert for this device (`--llm-quant`).
    vision_variant / audio_variant / tts_variant: "int8" or "fp32" ONNX graphs.
    n_ctx: LLM context; kv_type: KV cache element type.
    use_mmap / repack: llama.cpp weight loading (see bench/memory.py for the resident-memory trade-off).
    n_gpu_layers: layers offloaded to Metal/CUDA (999 = all).
    ort_providers: onnxruntime execution providers in order (empty = best available: CUDA, CoreML, CPU).
    max_slice_nums: image slices per picture in chat, demo and serve.
    live_fps / live_frame_max_side: highest camera frame rate and frame size (longer side) in live mode.
    live_llm_threads / live_ort_threads / live_n_ctx: what live mode uses instead of llm_threads, ort_threads
        and n_ctx (0 threads = the same as outside live mode): decode and TTS overlap there, and a session grows.
    llm_batch_threads: llama.cpp threads for prompt prefill (batches of more than one token; 0 = llm_threads).
        Live mode sets it to live_llm_threads + live_ort_threads: prefill of a 1-s unit runs while no TTS does,
        so it may use the whole machine (2 cores: a camera unit's 94-token prefill 11.0 s -> 5.8 s, an audio-only
        unit 4.1 s -> 2.7 s, full-shape Q4_K_M), while single-token decode keeps its share beside the TTS. The
        vision and audio encoders get the same count (they run in the same phase as the prefill).
    reasons: why the profile sets its fields; overridden: fields set by the user (CLI `--set`, flags, keywords).
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
    ort_providers: tuple[str, ...] = ()
    max_slice_nums: int = 9  # the official default (spec: MiniCPM-V slicing)
    live_fps: float = 1.0
    live_frame_max_side: int = LIVE_FRAME_MAX_SIDE
    live_llm_threads: int = 0
    live_ort_threads: int = 0
    live_n_ctx: int = LIVE_N_CTX
    llm_batch_threads: int = 0
    reasons: MappingProxyType = field(default_factory=lambda: MappingProxyType({}), compare=False)
    overridden: frozenset = field(default=frozenset(), compare=False)

    def __post_init__(self):
        for name in _CHOICES:
            _check_choice(name, getattr(self, name))
        for name in ("llm_threads", "ort_threads", "n_gpu_layers", "live_llm_threads", "live_ort_threads",
                     "llm_batch_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"profile field {name} must be >= 0 (0 = all cores / none), "
                                 f"got {getattr(self, name)}.")
        for name in ("n_ctx", "live_n_ctx", "max_slice_nums", "live_frame_max_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"profile field {name} must be >= 1, got {getattr(self, name)}.")
        lo, hi = LIVE_FPS_RANGE
        if not lo <= self.live_fps <= hi:
            raise ValueError(f"profile field live_fps must be between {lo:g} and {hi:g} (one frame per 1-s unit at "
                             f"most), got {self.live_fps}.")

    @classmethod
    def field_names(cls) -> list[str]:
        """Fields a user may set (everything but the name and the bookkeeping)."""
        return [f.name for f in fields(cls) if f.name not in ("name", "reasons", "overridden")]

    def with_overrides(self, **overrides) -> "Profile":
        known = self.field_names()
        bad = set(overrides) - set(known)
        if bad:
            raise ValueError(f"unknown profile field(s) {sorted(bad)}; known: {', '.join(known)}")
        if not overrides:
            return self
        name = self.name if self.name.endswith("+custom") else f"{self.name}+custom"
        return replace(self, name=name, overridden=self.overridden | set(overrides), **overrides)

    def for_live(self) -> "Profile":
        """The live-mode values of this profile (threads split for overlapping decode + TTS, the live context);
        fields the user set explicitly are kept."""
        live = {"llm_threads": self.live_llm_threads, "ort_threads": self.live_ort_threads, "n_ctx": self.live_n_ctx}
        out = replace(self, **{k: v for k, v in live.items() if v and k not in self.overridden})
        if "llm_batch_threads" not in self.overridden and out.llm_threads and out.ort_threads:
            out = replace(out, llm_batch_threads=out.llm_threads + out.ort_threads)
        return out

    @property
    def live_frame_stride(self) -> int:
        """Camera frame every this many 1-s units: the `live_fps` cap as the governor's `min_stride`."""
        return max(1, round(1 / self.live_fps))

    def for_bundle(self, bundle) -> "Profile":
        """Fall back to fp32 for a part whose int8 graphs the bundle does not have (converted with --no-int8)."""
        changes = {}
        for part, name in ((keys.PART_VISION, "vision_variant"), (keys.PART_AUDIO, "audio_variant"),
                           (keys.PART_TTS, "tts_variant")):
            want = getattr(self, name)
            if (bundle.has_part(part) and want != "fp32"
                    and not any(_role_variant(r) == want for r in bundle.part(part).files)):
                log.info("bundle %s has no %s %s graphs: using fp32", bundle.root, part, want)
                changes[name] = "fp32"
        return replace(self, **changes) if changes else self

    def llm_options(self, **kw):
        return LLMOptions(n_ctx=self.n_ctx, n_threads=self.llm_threads,
                          n_threads_batch=self.llm_batch_threads or self.llm_threads,
                          kv_type=self.kv_type, use_mmap=self.use_mmap, repack=self.repack,
                          n_gpu_layers=self.n_gpu_layers, **kw)

    def ort_options(self, **kw):
        return OrtOptions(intra_op_threads=self.ort_threads, providers=self.ort_providers or None, **kw)

    def omni_options(self, *, ort=None):
        """`OmniOptions` for `Omni`: LLM, onnxruntime, ONNX variants and image slices of this profile."""
        ort = ort or self.ort_options()
        encoders = None
        if self.llm_batch_threads > ort.intra_op_threads > 0:
            encoders = replace(ort, intra_op_threads=self.llm_batch_threads)
        return OmniOptions(llm=self.llm_options(), ort=ort, encoder_ort=encoders,
                           vision_variant=self.vision_variant,
                           audio_variant=self.audio_variant, tts_variant=self.tts_variant,
                           max_slice_nums=self.max_slice_nums)

    def matching(self, options) -> "Profile":
        """This profile with the values of explicit `OmniOptions` (what will really be loaded), for the estimate."""
        o = options.llm
        return replace(self, n_ctx=o.n_ctx, kv_type=o.kv_type, use_mmap=o.use_mmap, repack=o.repack,
                       n_gpu_layers=o.n_gpu_layers, vision_variant=options.vision_variant,
                       audio_variant=options.audio_variant, tts_variant=options.tts_variant)

    def describe(self, hw: Hardware | None = None, bundle=None) -> str:
        """Two lines for the start of a run: the profile and the device, then its key fields."""
        line = f"profile {self.name}"
        if hw is not None:
            board = f" ({hw.board})" if hw.board else ""
            line += (f" | device: {hw.system} {hw.machine}{board}, {hw.cores} cores, {hw.memory_bytes / GIB:.1f} GiB "
                     f"RAM, {hw.available_bytes / GIB:.1f} GiB available{', CUDA' if hw.cuda else ''}")
        quant = self.llm_quant
        if bundle is not None:
            have = bundle.part(keys.PART_LLM).meta.get("quant")
            if have and have != self.llm_quant:
                quant = f"{have} (profile suggests {self.llm_quant})"
        providers = f", providers {'/'.join(self.ort_providers)}" if self.ort_providers else ""
        return (f"{line}\n  threads llm {self.llm_threads or 'all'} / ort {self.ort_threads or 'all'} | llm {quant}, "
                f"n_ctx {self.n_ctx}, kv {self.kv_type}, {'mmap' if self.use_mmap else 'read'}"
                f"{'+repack' if self.repack else ''}, gpu layers {self.n_gpu_layers} | onnx vision "
                f"{self.vision_variant}, audio {self.audio_variant}, tts {self.tts_variant}{providers} | max slices "
                f"{self.max_slice_nums} | live {self.live_fps:g} fps, {self.live_frame_max_side} px")


def _check_choice(name: str, value) -> None:
    choices = _CHOICES[name]
    if value not in choices:
        raise ValueError(f"profile field {name} must be one of {', '.join(choices)}, got {value!r}.")


def _profile(name: str, reasons: dict, **kw) -> Profile:
    return Profile(name=name, reasons=MappingProxyType(reasons), **kw)


def _live_split(cores: int) -> dict:
    """Live mode overlaps LLM decode with the TTS, so their threads must not add up beyond the cores
    (measured on 2 cores: see `edge.options.ThreadSplit`)."""
    s = ThreadSplit.for_cores(cores)
    return {"live_llm_threads": s.llm_threads, "live_ort_threads": s.ort_threads}


def builtin_profiles(hw: Hardware) -> dict[str, Profile]:
    cores = max(hw.cores, 1)
    return {
        "laptop": _profile("laptop", {
            "llm_threads": "all cores: decode is memory-bound and stages mostly alternate",
            "live_threads": "live mode splits the cores (ThreadSplit): decode and TTS run at the same time",
            "llm_quant": "Q4_K_M: 4.7 GB, decode near the bandwidth ceiling",
            "variants": "int8 ONNX: 2-5x faster than fp32 on AVX2/AVX-512 at cosine >= 0.99",
            "use_mmap": "read + repack: 4.60 GiB peak vs 7.47 GiB for mmap + repack, same decode speed (measured)",
            "live_frame_max_side": "640 px: covers the 1-slice encoder input (~518x388), no 1080p frames to convert",
        }, llm_threads=cores, ort_threads=cores, **_live_split(cores)),
        "apple-silicon": _profile("apple-silicon", {
            "n_gpu_layers": "the Metal build of llama-cpp-python runs every layer on the GPU",
            "llm_threads": "performance cores only; Metal does the heavy work",
            "ort_threads": "CPU for the encoders (CoreML provider used when present)",
        }, llm_threads=max(1, min(cores // 2, 8)), ort_threads=max(1, min(cores // 2, 8)), n_gpu_layers=999),
        "pi5": _profile("pi5", {
            "llm_threads": "4 Cortex-A76 cores; all of them for the LLM",
            "live_threads": "2 + 2 in live mode (ThreadSplit): decode and TTS run at the same time",
            "n_ctx": "2048: the KV cache must fit 8 GB beside the weights",
            "live_n_ctx": "4096 (~40 s of video+audio at 0.5 fps): half the KV memory of the laptop's 8192",
            "kv_type": "f16 KV halves its memory against f32",
            "use_mmap": "read into llama.cpp buffers: no second, mapped copy of the weights stays resident "
                        "(-2.9 GiB measured for the 7B Q4_K_M)",
            "max_slice_nums": "4 slices: each SigLIP slice costs seconds on a Pi",
            "live": "at most 0.5 fps (the governor lowers it further when units overrun) and 448-px frames: less "
                    "capture and conversion work on the Pi's CPU (not measured on a Pi yet)",
        }, llm_threads=cores, ort_threads=cores, n_ctx=2048, use_mmap=False, max_slice_nums=4, live_fps=0.5,
            live_frame_max_side=448, live_n_ctx=4096, **_live_split(cores)),
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
    key = detect_profile_name(hw) if name in ("auto", "custom", None) else name
    if key not in profiles:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILE_CHOICES)}")
    return profiles[key].with_overrides(**overrides)


# --- command line --------------------------------------------------------------------------------------------
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_override(text: str) -> tuple[str, object]:
    """`FIELD=VALUE` from `--set` -> (field, value converted to the field's type)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip().replace("-", "_"), raw.strip()
    known = Profile.field_names()
    if not sep or not key:
        raise ValueError(f"--set takes FIELD=VALUE (e.g. --set llm_threads=2), got {text!r}; "
                         f"fields: {', '.join(known)}")
    if key not in known:
        raise ValueError(f"unknown profile field {key!r} in --set; known fields: {', '.join(known)}")
    kind = get_type_hints(Profile)[key]
    try:
        if kind is bool:
            if raw.lower() not in _TRUE + _FALSE:
                raise ValueError
            return key, raw.lower() in _TRUE
        if kind in (int, float):
            return key, kind(raw)
        if kind == tuple[str, ...]:
            return key, tuple(p.strip() for p in raw.split(",") if p.strip())
    except ValueError:
        want = "true/false" if kind is bool else getattr(kind, "__name__", str(kind))
        raise ValueError(f"--set {key}={raw!r}: expected {want}") from None
    if key in _CHOICES and raw not in _CHOICES[key]:
        raise ValueError(f"--set {key}={raw!r}: choose one of {', '.join(_CHOICES[key])}")
    return key, raw


def add_profile_arguments(parser) -> None:
    """`--profile` and `--set` (repeatable) on a subcommand; read back with `profile_for_run`."""
    import argparse

    def override(text: str):
        try:
            return parse_override(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument("--profile", choices=PROFILE_CHOICES, default="auto",
                        help="device profile (default auto = detected; custom = detected + --set overrides); "
                             "printed at start")
    parser.add_argument("--set", dest="overrides", metavar="FIELD=VALUE", type=override, action="append",
                        default=[], help="override one profile field, e.g. --set llm_threads=2 --set "
                                         f"tts_variant=fp32 (repeatable; fields: {', '.join(Profile.field_names())})")


def profile_for_run(name: str | Profile | None = "auto", overrides=(), *, hw: Hardware | None = None,
                    threads: int = 0, **flags) -> Profile:
    """The profile of one run: `name` (a Profile, or auto/custom = detected), then the command's own flags
    (`threads` sets both thread counts; others are profile fields, e.g. n_ctx; 0/None = not given), then the
    `--set` overrides ("FIELD=VALUE" strings or (field, value) pairs), which win."""
    base = name if isinstance(name, Profile) else resolve_profile(name or "auto", hw)
    given = {k: v for k, v in flags.items() if v not in (None, 0)}
    if threads:
        given = {"llm_threads": threads, "ort_threads": threads, **given}
    for item in overrides or ():
        key, value = parse_override(item) if isinstance(item, str) else item
        given[key] = value
    return base.with_overrides(**given)


def start_profile(bundle, name: str | Profile | None = "auto", overrides=(), *, hw: Hardware | None = None,
                  live: bool = False, echo=print, **flags) -> tuple[Profile, Hardware]:
    """What a command does before loading: detect the device, build the run's profile (`profile_for_run`; live
    mode's values with live=True), fit it to the bundle's graphs, and print it. Loading with
    `Omni.load(bundle, profile=..., hardware=...)` then checks that it fits in memory."""
    hw = hw or Hardware.detect()
    prof = profile_for_run(name, overrides, hw=hw, **flags)
    prof = (prof.for_live() if live else prof).for_bundle(bundle)
    if echo is not None:
        echo(prof.describe(hw, bundle))
    return prof, hw


# --- memory estimate -----------------------------------------------------------------------------------------
KV_BYTES = {"f32": 4, "f16": 2, "q8_0": 34 / 32}
# llama.cpp's CPU repack copies the repackable (Q4_0/Q4_K/IQ4) weight tensors into new buffers; with mmap the
# mapped pages of the same tensors have been read during load and stay resident too (measured: Qwen2.5-7B
# Q4_K_M, 4.7 GB file, 7.5 GiB RSS).
REPACK_FRACTION = 0.6
ORT_OVERHEAD = 1.3  # onnxruntime keeps initializers plus arena/working buffers (measured on the tiny and full parts)
SMALL_N_CTX = 2048  # the context suggested when memory is short (the pi5 profile's)
# Python + numpy + onnxruntime + llama.cpp: 58 MiB measured after loading the tiny bundle, plus allocator slack
PROCESS_BASE_BYTES = 150 * 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    llm_weights: int
    repack_extra: int
    kv_cache: int
    compute: int
    onnx: int
    base: int
    llm_quant: str = ""

    @property
    def total(self) -> int:
        return self.llm_weights + self.repack_extra + self.kv_cache + self.compute + self.onnx + self.base


def estimate_memory(bundle, profile: Profile, *, parts: tuple[str, ...] = ("vision", "audio", "tts")) -> MemoryEstimate:
    """Peak resident bytes for loading `bundle` under `profile` and running chunked (streamed) speech.
    Not covered: one-shot `synthesize` of a long reply decodes all its frames at once, which adds working memory
    proportional to the reply (measured on the tiny bundle: ~+300 MB for the 2048-frame maximum)."""
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
    return MemoryEstimate(llm_file, repack, kv, compute, onnx, PROCESS_BASE_BYTES, quant)


def _role_variant(role: str) -> str | None:
    """'fp32' / 'int8' for variant files ('int8', 'whole_int8', 'dvae.int8', 'fp32_data'), None for shared files."""
    words = set(re.split(r"[._/]", role))
    return next((v for v in ("fp32", "int8") if v in words), None)


def check_fits(estimate: MemoryEstimate, hw: Hardware, profile: Profile) -> None:
    """Refuse (InsufficientMemoryError) a load whose estimate exceeds the available memory, naming the `--set`
    overrides (the same names are keyword arguments of `Omni.load`) that would shrink it."""
    if estimate.total <= hw.available_bytes:
        return
    advice = []
    if estimate.repack_extra:
        advice.append(f"--set use_mmap=false (read the weights instead of mapping them: saves "
                      f"{estimate.repack_extra / GIB:.1f} GiB at the same decode speed)")
    if profile.kv_type == "f32":
        advice.append(f"--set kv_type=f16 (saves {estimate.kv_cache / 2 / GIB:.1f} GiB)")
    if profile.n_ctx > SMALL_N_CTX:
        saves = estimate.kv_cache * (1 - SMALL_N_CTX / profile.n_ctx) / GIB
        advice.append(f"--set n_ctx={SMALL_N_CTX} (saves {saves:.1f} GiB)")
    fp32 = [n for n in ("vision_variant", "audio_variant", "tts_variant") if getattr(profile, n) == "fp32"]
    if fp32:
        advice.append(" ".join(f"--set {n}=int8" for n in fp32) + " (int8 ONNX graphs are ~4x smaller; the bundle "
                      "must be converted without --no-int8)")
    if estimate.llm_quant in ("f32", "f16", "q8_0"):
        advice.append(f"a bundle converted with --llm-quant q4_k_m (this one is {estimate.llm_quant})")
    advice.append("closing other programs")
    raise InsufficientMemoryError(estimate.total, hw.available_bytes,
                                  "Try " + "; ".join(advice) + ". (Python: the same fields as keyword arguments of "
                                  "Omni.load, e.g. Omni.load(bundle, profile='auto', n_ctx=2048).)")


def check_memory(bundle, profile: Profile, hw: Hardware) -> MemoryEstimate:
    """Estimate the peak memory of `bundle` under `profile` and refuse it when it does not fit `hw`."""
    est = estimate_memory(bundle, profile)
    check_fits(est, hw, profile)
    return est


_CHOICES = {"vision_variant": VARIANTS, "audio_variant": VARIANTS, "tts_variant": VARIANTS,
            "kv_type": tuple(KV_BYTES), "llm_quant": LLM_QUANTS}
