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
