"""Checkpoint directory -> runtime bundle: every part, then `bundle.json` last.

The bundle is written into `<dst>.incomplete/` and renamed when complete, so an interrupted conversion never
leaves something that looks like a bundle.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from converters.checkpoint import Checkpoint
from edge import keys
from edge.bundle import Bundle

SYNTHETIC_MARKER = "synthetic.json"  # written by `minicpmo-edge synth`: the weights are random


def source_info(ckpt: Checkpoint, name: str | None) -> dict:
    marker = ckpt.root / SYNTHETIC_MARKER
    synthetic = json.loads(marker.read_text()) if marker.is_file() else None
    return {
        "name": name or (f"synthetic-{synthetic.get('scale')}-seed{synthetic.get('seed')}" if synthetic
                         else ckpt.config.get("_name_or_path", ckpt.root.name)),
        "config_sha256": ckpt.config_digest(),
        "random_weights": synthetic is not None,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def convert(src: str | Path, dst: str | Path, *, llm_quant: str = "q4_k_m", int8: bool = True,
            progress: bool = True, name: str | None = None, parts: tuple[str, ...] | None = None,
            overwrite: bool = False) -> Bundle:
    """Convert `src` (official or synthetic checkpoint) into the bundle directory `dst`."""
    from converters import audio_encoder, llm_gguf, tts, vision

    ckpt = Checkpoint.open(src)
    dst = Path(dst)
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    tmp = dst.with_name(dst.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    wanted = parts or (keys.PART_LLM, keys.PART_VISION, keys.PART_AUDIO, keys.PART_TTS)
    exporters = {
        keys.PART_LLM: lambda: llm_gguf.export(ckpt, tmp, quant=llm_quant, progress=progress),
        keys.PART_VISION: lambda: vision.export(ckpt, tmp, int8=int8, progress=progress),
        keys.PART_AUDIO: lambda: audio_encoder.export(ckpt, tmp, int8=int8, progress=progress),
        keys.PART_TTS: lambda: tts.export(ckpt, tmp, int8=int8, progress=progress),
    }
    bundle_parts = {}
    for part in wanted:
        t0 = time.perf_counter()
        if progress:
            print(f"[convert] {part} ...", flush=True)
        bundle_parts[part] = exporters[part]()
        if progress:
            print(f"[convert] {part} done in {time.perf_counter() - t0:.1f} s", flush=True)
    llm_meta = bundle_parts[keys.PART_LLM].meta if keys.PART_LLM in bundle_parts else {}
    all_special = llm_gguf.read_tokenizer(ckpt.root, llm_gguf.LLMDims.from_config(ckpt.config).vocab_size).special_ids
    bundle = Bundle(
        root=tmp, schema_version=keys.BUNDLE_SCHEMA_VERSION, arch=keys.BUNDLE_ARCH,
        source=source_info(ckpt, name),
        dims={"llm": llm_meta.get("dims", {}), "query_num": ckpt.config.get("query_num", 64)},
        special_tokens=all_special, parts=bundle_parts,
    )
    bundle.save()
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return Bundle.load(dst)
