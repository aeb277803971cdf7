"""Cost of one live 1-s unit (camera frame + audio, or audio only) through a streaming session, two setups
interleaved in one process.

"split": what live mode did before: encoders on the ONNX thread count of the TTS split (1 of 2 cores) and one
llama_decode per token run / media block. "merged": encoders on every core (`OmniOptions.encoder_ort`) and the unit
in one embedding batch (`LLMOptions.text_as_embeddings`). Each round prefills the same system prompt and the same
units (frame, audio, audio, frame) into a fresh session of each side.

    python -m bench.live_units --bundle ~/.cache/minicpmo-edge/bundles/full-q4_k_m --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

from bench.common import versions, write_result

UNITS = ("frame", "audio", "audio", "frame")
SYSTEM = "You are a helpful assistant. Answer briefly."


def _session(bundle, *, merged: bool, llm_threads: int, ort_threads: int, variant: str):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.onnx_session import OrtOptions
    from edge.streaming import StreamingSession

    ort = OrtOptions(intra_op_threads=ort_threads, allow_spinning=False)
    every = llm_threads + ort_threads
    omni = Omni.load(bundle, OmniOptions(
        llm=LLMOptions(n_ctx=4096, n_threads=llm_threads, n_threads_batch=every, text_as_embeddings=merged),
        ort=ort, encoder_ort=dataclasses.replace(ort, intra_op_threads=every if merged else ort_threads),
        vision_variant=variant, audio_variant=variant, tts_variant=variant))
    s = StreamingSession(omni)
    s.load_encoders(vision=True, speech=False)
    s.warm_up_encoders(vision=True)
    return s


def main(argv=None) -> dict:
    from PIL import Image

    from edge.bundle import Bundle

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,1", help="LLM decode, ONNX threads of the live split (2 cores: 1,1)")
    p.add_argument("--variant", default="int8")
    a = p.parse_args(argv)
    llm_t, ort_t = map(int, a.threads.split(","))
    bundle = Bundle.load(a.bundle)
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    waves = [(0.1 * rng.standard_normal(16000)).astype(np.float32) for _ in UNITS]
    sides = {name: _session(bundle, merged=name == "merged", llm_threads=llm_t, ort_threads=ort_t, variant=a.variant)
             for name in ("split", "merged")}
    times = {name: {"frame": [], "audio": []} for name in sides}
    for r in range(a.repeats):
        for name, s in sides.items():  # interleaved: both sides see the same host noise
            s.reset_session()
            s.streaming_prefill("bench", [{"role": "user", "content": [SYSTEM]}])
            for kind, wave in zip(UNITS, waves):
                content = ["<unit>", frame, wave] if kind == "frame" else [wave]
                t = time.perf_counter()
                s.streaming_prefill("bench", [{"role": "user", "content": content}])
                times[name][kind].append(round(time.perf_counter() - t, 3))
        print(f"round {r + 1}: {times}", flush=True)
    summary = {name: {kind: {"min": min(v), "median": statistics.median(v)} for kind, v in kinds.items()}
               for name, kinds in times.items()}
    print(summary)
    write_result("live_units", {"bundle": str(a.bundle), "variant": a.variant,
                                "threads": {"llm": llm_t, "ort": ort_t}, "units": list(UNITS),
                                "versions": versions("onnxruntime", "llama_cpp_python", "numpy"),
                                "runs": times, "summary": summary})
    return summary


if __name__ == "__main__":
    main()
