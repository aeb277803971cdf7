"""`minicpmo-edge bench --cpus/--mem-cap-gib`: the limits really apply (checked in a child process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import os, resource
    import numpy as np
    from edge.cli import apply_device_limits
    apply_device_limits(cpus=1, mem_cap_gib=1.5)
    assert len(os.sched_getaffinity(0)) == 1
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == int(1.5 * 2**30)
    try:
        np.ones(2 * 2**30 // 8)  # 2 GiB: must not fit under the 1.5 GiB cap
        print("NOT CAPPED")
    except MemoryError:
        print("CAPPED")
""")


def test_cpu_pinning_and_memory_cap():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CAPPED" in out.stdout and "NOT CAPPED" not in out.stdout
