"""Build the full-shape random-weight bundle that the benchmarks run on, timing each step.

    python -m bench.build_full_bundle [--parts llm,vision,audio,tts] [--llm-quant q4_k_m]

Steps: the full synthetic checkpoint (`models.synth`, real dims, random values) into the user cache, then each
part's exporter into `<cache>/bundles/full-<quant>/`, then `bundle.json`. Parts already exported are kept
(a rerun resumes). Wall time, peak RSS and disk use per step go to bench/results/build_full_bundle-*.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from bench.common import peak_rss_gib, write_result
from edge import constants, keys

PART_STATE = "parts.json"  # per-part BundleParts written so far (resume)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="llm,vision,audio,tts")
    ap.add_argument("--llm-quant", default="q4_k_m")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from converters import audio_encoder, llm_gguf, tts, vision
    from converters.checkpoint import Checkpoint
    from converters.convert import SYNTHETIC_MARKER, source_info
    from edge.bundle import Bundle, BundlePart
    from models.synth import build_synthetic_checkpoint

    steps: dict[str, dict] = {}
    src = constants.cache_dir() / "synth-full"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        build_synthetic_checkpoint(src, scale="full", seed=a.seed)
        steps["synth"] = {"seconds": time.perf_counter() - t, "bytes": dir_bytes(src)}
    (src / SYNTHETIC_MARKER).write_text(json.dumps({"scale": "full", "seed": a.seed}))
    ckpt = Checkpoint.open(src)
    out = constants.bundles_dir() / f"full-{a.llm_quant}"
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / PART_STATE
    done = json.loads(state_path.read_text()) if state_path.is_file() else {}
    exporters = {
        keys.PART_LLM: lambda: llm_gguf.export(ckpt, out, quant=a.llm_quant),
        keys.PART_VISION: lambda: vision.export(ckpt, out, int8=True),
        keys.PART_AUDIO: lambda: audio_encoder.export(ckpt, out, int8=True),
        keys.PART_TTS: lambda: tts.export(ckpt, out, int8=True),
    }
    for part in a.parts.split(","):
        if part in done:
            print(f"{part}: already exported")
            continue
        before = dir_bytes(out)
        t = time.perf_counter()
        bp = exporters[part]()
        steps[part] = {"seconds": time.perf_counter() - t, "bytes": dir_bytes(out) - before,
                       "peak_rss_gib_so_far": peak_rss_gib()}
        done[part] = bp.to_json()
        state_path.write_text(json.dumps(done, indent=1))
        print(f"{part}: {steps[part]['seconds']:.0f} s, {steps[part]['bytes'] / 1e9:.2f} GB")
    special = llm_gguf.read_tokenizer(ckpt.root, llm_gguf.LLMDims.from_config(ckpt.config).vocab_size).special_ids
    parts = {k: BundlePart.from_json(v) for k, v in done.items()}
    b = Bundle(out, keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, source_info(ckpt, "synthetic-full (random weights)"),
               {"llm": parts[keys.PART_LLM].meta.get("dims", {}) if keys.PART_LLM in parts else {},
                "query_num": ckpt.config.get("query_num", 64)}, special, parts)
    b.save()
    write_result("build_full_bundle", {"bundle": str(out), "llm_quant": a.llm_quant, "steps": steps,
                                       "bundle_bytes": dir_bytes(out), "checkpoint_bytes": dir_bytes(src),
                                       "free_disk_bytes": shutil.disk_usage(out).free})


if __name__ == "__main__":
    main()
