"""The built-in default bundle: a tiny synthetic checkpoint (random weights) converted on first use.

Why: the main job must run offline on a fresh machine, where the real 8B weights may be absent. The bundle is
built once into the user cache (seconds) and reused; everything that shows it says its weights are random.
Building needs the converter's dependencies (`pip install -e .[convert]`, which `setup.sh` does).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from edge import constants, keys
from edge.bundle import Bundle

DEFAULT_LLM_QUANT = "f32"  # the tiny LLM is 6 MB; f32 keeps it exact


def installed_bundles() -> list[Bundle]:
    out = []
    root = constants.bundles_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if (d / keys.BUNDLE_MANIFEST).is_file():
                try:
                    out.append(Bundle.load(d))
                except Exception:  # noqa: BLE001 - a stale bundle of an older schema is skipped, not fatal
                    continue
    return out


def find_real_bundle() -> Bundle | None:
    """A converted official bundle in the cache (from `minicpmo-edge pull`), if any."""
    real = [b for b in installed_bundles() if not b.random_weights]
    return real[0] if real else None


def ensure_default_bundle(*, progress: bool = True) -> Bundle:
    dst = constants.bundles_dir() / constants.DEFAULT_BUNDLE_NAME
    if (dst / keys.BUNDLE_MANIFEST).is_file():
        try:
            return Bundle.load(dst)
        except Exception:  # noqa: BLE001 - built by an older version (or broken): rebuild it
            shutil.rmtree(dst)
    try:
        from converters.convert import SYNTHETIC_MARKER, convert
        from models.synth import build_synthetic_checkpoint
    except ImportError as e:
        raise RuntimeError(
            f"building the default bundle needs the converter dependencies ({e.name} is missing): run "
            "`pip install -e .[convert]` (setup.sh does), or pass --bundle with a converted bundle.") from e
    import json

    src = constants.cache_dir() / "synth" / f"tiny-seed{constants.DEFAULT_SYNTH_SEED}"
    if progress:
        print(f"building the built-in default bundle (tiny, random weights) in {dst} ...", flush=True)
    if not (src / SYNTHETIC_MARKER).is_file():
        shutil.rmtree(src, ignore_errors=True)
        build_synthetic_checkpoint(src, scale="tiny", seed=constants.DEFAULT_SYNTH_SEED, progress=progress)
        (src / SYNTHETIC_MARKER).write_text(json.dumps({"scale": "tiny", "seed": constants.DEFAULT_SYNTH_SEED}))
    bundle = convert(src, dst, llm_quant=DEFAULT_LLM_QUANT, int8=True, progress=progress,
                     name="built-in default (synthetic tiny, random weights)", overwrite=True)
    shutil.rmtree(src, ignore_errors=True)  # the intermediate checkpoint is not needed any more
    return bundle


def resolve_bundle(path: str | Path | None, *, progress: bool = True) -> Bundle:
    if path:
        return Bundle.load(path)
    return find_real_bundle() or ensure_default_bundle(progress=progress)
