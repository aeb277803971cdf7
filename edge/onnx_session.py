"""One place that creates onnxruntime sessions, so thread counts, providers and memory options are uniform.

Why a helper: every part (vision, audio, TTS) must honour the same thread split and provider choice, and
issue-level tuning (arena, memory pattern, providers) should change in one spot.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.errors import CorruptModelFileError
from edge.options import OrtOptions

__all__ = ["OrtOptions", "make_session"]

log = logging.getLogger("edge.onnx")

# Provider preference, best first; CPU is always the fallback (onnxruntime documents these names).
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")


def make_session(path: str | Path, options: OrtOptions | None = None):
    import onnxruntime as ort

    options = options or OrtOptions()
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = 1
    so.enable_cpu_mem_arena = options.enable_cpu_mem_arena
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = set(ort.get_available_providers())
    wanted = options.providers or PREFERRED_PROVIDERS
    providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    if options.providers and providers != list(options.providers):
        log.warning("requested providers %s, available %s: using %s", options.providers, sorted(available), providers)
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind classes (InvalidProtobuf, Fail, ...), all Exception
        if not Path(path).is_file():
            raise
        raise CorruptModelFileError(
            f"onnxruntime cannot load {path} ({type(e).__name__}: {str(e)[:200]}); the file is corrupt or was "
            "written by an incompatible exporter. Convert the bundle again; `minicpmo-edge info BUNDLE --verify` "
            "checks every file.", str(path)) from None
    log.info("onnxruntime %s: providers %s", Path(path).name, sess.get_providers())
    return sess
