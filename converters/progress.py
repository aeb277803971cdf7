"""Converter progress lines (`[part] message` on stderr), shared by every part's exporter."""

from __future__ import annotations

import sys
from typing import Callable


def reporter(tag: str, enabled: bool) -> Callable[[str], None]:
    """A `say(msg)` that prints `[tag] msg` to stderr when `enabled` (the exporters' `progress` flag)."""

    def say(msg: str) -> None:
        if enabled:
            print(f"[{tag}] {msg}", file=sys.stderr, flush=True)

    return say
