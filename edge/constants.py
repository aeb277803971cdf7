"""Environment variables and default locations, read in one place (huggingface_hub's constants.py pattern)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MINICPMO_EDGE_CACHE"
OFFICIAL_REPO = "openbmb/MiniCPM-o-2_6"
DEFAULT_BUNDLE_NAME = "default-tiny"  # the built-in random-weights bundle, built on first use
DEFAULT_SYNTH_SEED = 0


def cache_dir() -> Path:
    """$MINICPMO_EDGE_CACHE, else $XDG_CACHE_HOME/minicpmo-edge, else ~/.cache/minicpmo-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "minicpmo-edge"


def bundles_dir() -> Path:
    return cache_dir() / "bundles"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")

# --- rates and units of the model's I/O (one definition for the whole package) ------------------------------------
AUDIO_SAMPLE_RATE = 16_000  # what the Whisper encoder takes (spec §2.3)
TTS_SAMPLE_RATE = 24_000  # what Vocos produces (spec §3.4)
UNIT_SECONDS = 1.0  # one time-division unit of the official streaming demo (5 x 200-ms packets, spec §4.2)
UNIT_SAMPLES = int(AUDIO_SAMPLE_RATE * UNIT_SECONDS)

RANDOM_WEIGHTS_NOTICE = ("NOTE: this bundle has RANDOM weights (synthetic checkpoint). Its words and speech are "
                         "noise; what it shows is the pipeline and its speed. Real weights: `minicpmo-edge pull`.")
