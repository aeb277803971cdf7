"""Peak resident memory and decode speed of the LLM alone and of the whole omni pipeline, per load setting.

    python -m bench.memory BUNDLE [--threads 2] [--decode 32] [--mem-cap-gib 8]

Each configuration runs in its own process (peak RSS is per process): llama-cpp-python's defaults (mmap +
repack) against the alternatives (read without mmap, mmap without repack), for the LLM alone and for the whole
pipeline (LLM + int8 vision, audio and TTS sessions, one image + audio turn with speech). `--mem-cap-gib`
sets RLIMIT_AS in the children to approximate a smaller device. The manifest-based estimate
(`edge.profiles.estimate_memory`) is reported next to each measurement. JSON to bench/results/memory-*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import peak_rss_gib, versions, write_result

CONFIGS = {
    "defaults (mmap+repack)": {"use_mmap": True, "repack": True},
    "read, repack": {"use_mmap": False, "repack": True},
    "mmap, no repack": {"use_mmap": True, "repack": False},
}


def child(bundle: str, cfg: dict, threads: int, decode: int, whole: bool) -> dict:
    import numpy as np

    from edge.bundle import Bundle
    from edge.llm import LLM
    from edge.profiles import Hardware, estimate_memory, resolve_profile
    from edge.sampling import SamplingOptions

    b = Bundle.load(bundle)
    prof = resolve_profile("laptop", Hardware.detect(), llm_threads=threads, ort_threads=threads, n_ctx=2048, **cfg)
    opts = prof.llm_options()
    t = time.perf_counter()
    out: dict = {"estimate_gib": estimate_memory(b, prof, parts=("vision", "audio", "tts") if whole else ()).total
                 / 2**30}
    if whole:
        from PIL import Image

        from edge.omni import Omni, OmniOptions

        omni = Omni.load(b, OmniOptions(llm=opts, ort=prof.ort_options(), vision_variant="int8",
                                        audio_variant="int8", tts_variant="int8"))
        llm = omni.llm
        r = omni.chat([{"role": "user", "content": [Image.new("RGB", (448, 448), (90, 140, 200)),
                                                    np.zeros(16000, np.float32), "Describe."]}],
                      max_new_tokens=8, generate_audio=True, seed=0)
        out["reply_tokens"] = len(r.tokens)
    else:
        llm = LLM(b.file("llm", "model"), opts)
    out["load_s"] = time.perf_counter() - t
    llm.reset()
    last, _ = llm.prefill([list(range(100, 164))])
    t = time.perf_counter()
    n = sum(1 for _ in llm.generate(last, SamplingOptions(seed=0), max_new_tokens=decode))
    out["decode_tok_s"] = n / (time.perf_counter() - t)
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--mem-cap-gib", type=float, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llm-only", action="store_true", help="skip the whole-pipeline runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        if a.mem_cap_gib:
            import resource

            cap = int(a.mem_cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(child(a.bundle, spec["cfg"], a.threads, a.decode, spec["whole"])))
        return
    results: dict = {}
    for rep in range(a.repeats):  # interleave configurations across repeats (noisy host)
        for whole in ((False,) if a.llm_only else (False, True)):
            for name, cfg in CONFIGS.items():
                key = f"{'pipeline' if whole else 'llm'} / {name}"
                cmd = [sys.executable, "-m", "bench.memory", a.bundle, "--threads", str(a.threads), "--decode",
                       str(a.decode), "--mem-cap-gib", str(a.mem_cap_gib),
                       "--child", json.dumps({"cfg": cfg, "whole": whole})]
                p = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                if p.returncode != 0:
                    err = p.stderr.strip().splitlines()[-1:]
                    results.setdefault(key, []).append({"error": err})
                    print(f"[{rep}] {key:40s} FAILED: {err}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.setdefault(key, []).append(r)
                print(f"[{rep}] {key:40s} peak {r['peak_rss_gib']:.2f} GiB (est {r['estimate_gib']:.2f})  "
                      f"decode {r['decode_tok_s']:.2f} tok/s", flush=True)
    write_result("memory", {"bundle": a.bundle, "threads": a.threads, "mem_cap_gib": a.mem_cap_gib,
                            "versions": versions("llama_cpp_python", "onnxruntime", "numpy"), "runs": results})


if __name__ == "__main__":
    main()
