"""Plain configuration data of a loaded bundle (the bottom of the package: no models, no I/O).

Device profiles (`edge.profiles`) produce these; the runtime and everything above it read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LLMOptions:
    """Attributes:
    n_ctx: context length in tokens (KV cache size). 4096 fits a multi-image chat; live sessions want more.
    n_batch: tokens per llama_decode call during prefill.
    n_threads / n_threads_batch: decode / prefill threads (0 = all cores).
    kv_type: KV cache element type; "f32" for exact parity tests, "f16" halves KV memory.
    flash_attn: "auto" | "on" | "off" (off for exact parity).
    use_mmap: map the GGUF (True) or read it into llama.cpp's buffers (False).
    repack: let llama.cpp's CPU backend repack weights into its faster layouts (`use_extra_bufts`); with mmap
        this keeps both the mapped file and the repacked copy resident (see bench/memory.py).
    n_gpu_layers: layers offloaded to Metal/CUDA when the wheel has them.
    text_as_embeddings: an appended prompt (`prefill(reuse=False)`, the streaming path) that holds media rows
        goes in as one embedding batch, its text tokens as their rows of the token table (`edge.token_rows`):
        llama.cpp batches are tokens or embeddings, and each extra call reads every weight once (a live audio
        unit: 3 calls -> 1). Not with prefix reuse: the batch would start wherever the cached prefix ends, and
        batch composition changes float rounding, so a seeded reply would depend on the request before it.
    verbose: let llama.cpp print its load/decode log (errors are always shown).
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int = 0
    n_threads_batch: int = 0
    kv_type: str = "f16"
    flash_attn: str = "auto"
    # Measured on the Qwen2.5-7B-shaped Q4_K_M (bench/results/memory-20261128T071956Z.json): mmap + repack peaks
    # at 7.47 GiB (mapped pages and the repacked copy both resident); reading into buffers + repack peaks at 4.60 GiB
    # at the same decode speed (4.5 vs 4.4 tok/s) for ~5 s more load time; mmap without repack is 4.60 GiB but
    # ~12% slower to decode. Hence: read, repack.
    use_mmap: bool = False
    repack: bool = True
    n_gpu_layers: int = 0
    text_as_embeddings: bool = True
    verbose: bool = False

    @classmethod
    def exact(cls, **kw) -> "LLMOptions":
        """Settings for numeric parity with transformers (f32 KV, no flash attention)."""
        return cls(kv_type="f32", flash_attn="off", **kw)


@dataclass(frozen=True)
class OrtOptions:
    """Attributes:
    intra_op_threads: threads inside one operator (0 = onnxruntime's default, all cores).
    providers: execution providers to try in order; None = `PREFERRED_PROVIDERS` filtered by availability.
    enable_cpu_mem_arena: onnxruntime's CPU arena trades resident memory for fewer allocations.
    allow_spinning: idle intra-op threads busy-wait after a run (onnxruntime's default). Turn it off for loops
        that interleave many small runs with numpy work (TTS steps): on 2 cores the spinning threads starve numpy
        (measured 3.5-4.7x slower TTS streaming with spinning on).
    """

    intra_op_threads: int = 0
    providers: tuple[str, ...] | None = None
    enable_cpu_mem_arena: bool = True
    allow_spinning: bool = True


@dataclass(frozen=True)
class OmniOptions:
    """Attributes:
    llm: llama.cpp settings (context, threads, KV type, flash attention).
    ort: onnxruntime settings shared by the vision, audio and TTS sessions.
    encoder_ort: settings of the vision and audio encoders when they differ from `ort` (live mode: a unit is
        encoded while no TTS runs, so the encoders may use every core, as the prefill does).
    vision_variant, audio_variant, tts_variant: "fp32" or "int8" ONNX graphs.
    max_slice_nums: image slices when a call does not pass its own (None = the official default, 9).
    """

    llm: LLMOptions = field(default_factory=LLMOptions)
    ort: OrtOptions = field(default_factory=OrtOptions)
    encoder_ort: OrtOptions | None = None
    vision_variant: str = "fp32"
    audio_variant: str = "fp32"
    tts_variant: str = "fp32"
    max_slice_nums: int | None = None


@dataclass(frozen=True)
class ThreadSplit:
    """CPU threads for llama.cpp and for onnxruntime (encoders, TTS, VAD) when both run at once (live mode).

    During a reply, LLM decode and TTS run at the same time, so their sum should not exceed the cores.
    2 cores -> 1 + 1: on a busy 2-core box llama.cpp with 2 (spinning) threads beside the TTS starved it
    (README, "Live mode"). 4 cores -> 2 + 2 and 8 cores -> 5 + 3 follow the rule of thumb that decode is
    memory-bound and stops scaling near 4-6 threads while the TTS step is small (not measured yet).
    Prefill never overlaps the TTS, so live mode gives it llm + ort threads (`Profile.llm_batch_threads`)."""

    llm_threads: int
    ort_threads: int

    @classmethod
    def for_cores(cls, cores: int | None = None) -> "ThreadSplit":
        n = cores or os.cpu_count() or 1
        if n <= 2:
            return cls(1, 1)
        if n <= 4:
            return cls(2, 2)
        return cls(max(1, n - 3), 3)
