"""Device profiles: selection from (mocked) hardware, overrides, and the memory estimate against measured RSS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edge.profiles import (GIB, Hardware, InsufficientMemoryError, check_fits, detect_profile_name, estimate_memory,
                           resolve_profile)
from tests.conftest import REPO

LAPTOP = Hardware("Linux", "x86_64", 8, 16 * GIB, 12 * GIB)
MAC = Hardware("Darwin", "arm64", 10, 32 * GIB, 24 * GIB)
PI5 = Hardware("Linux", "aarch64", 4, 8 * GIB, 7 * GIB, board="raspberry-pi-5")
ORIN = Hardware("Linux", "aarch64", 6, 8 * GIB, 6 * GIB, board="jetson-orin", cuda=True)


@pytest.mark.parametrize("hw,name", [(LAPTOP, "laptop"), (MAC, "apple-silicon"), (PI5, "pi5"), (ORIN, "jetson-orin")])
def test_auto_detection(hw, name):
    assert detect_profile_name(hw) == name
    p = resolve_profile("auto", hw)
    assert p.name == name
    assert p.reasons, "every profile explains its choices"


def test_profile_choices_follow_the_device():
    assert resolve_profile("apple-silicon", MAC).n_gpu_layers > 0
    pi = resolve_profile("pi5", PI5)
    assert pi.n_ctx < resolve_profile("laptop", LAPTOP).n_ctx and not pi.use_mmap and pi.llm_threads == 4
    assert resolve_profile("laptop", LAPTOP).llm_threads == 8


def test_overrides_and_unknown_fields():
    p = resolve_profile("pi5", PI5, n_ctx=1024, tts_variant="fp32")
    assert p.n_ctx == 1024 and p.tts_variant == "fp32" and p.name == "pi5+custom"
    assert p.llm_options().n_ctx == 1024 and p.ort_options().intra_op_threads == 4
    with pytest.raises(ValueError, match="unknown profile field"):
        resolve_profile("pi5", PI5, n_cxt=1)
    with pytest.raises(ValueError, match="unknown profile"):
        resolve_profile("toaster", PI5)


def test_estimate_refuses_what_does_not_fit(golden_bundle):
    p = resolve_profile("laptop", LAPTOP)
    est = estimate_memory(golden_bundle, p)
    tiny_box = Hardware("Linux", "x86_64", 2, GIB // 4, GIB // 8)
    with pytest.raises(InsufficientMemoryError, match="GiB is available"):
        check_fits(est, tiny_box, p)
    check_fits(est, LAPTOP, p)  # fits: no error


MEASURE = textwrap.dedent("""
    import sys, resource
    import numpy as np
    from edge.omni import Omni, OmniOptions
    from edge.profiles import Hardware, resolve_profile
    hw = Hardware("Linux", "x86_64", 2, 8 << 30, 8 << 30)
    p = resolve_profile("laptop", hw, n_ctx=1024, llm_threads=2, ort_threads=2)
    omni = Omni.load(sys.argv[1], OmniOptions(llm=p.llm_options(), ort=p.ort_options(), vision_variant="int8",
                                              audio_variant="int8", tts_variant="int8"))
    from PIL import Image
    r = omni.chat([{"role": "user", "content": [Image.new("RGB", (448, 448)), np.zeros(16000, np.float32), "hi"]}],
                  max_new_tokens=4, seed=0)
    # A fixed amount of speech: one-shot TTS of an unbounded random reply decodes all its frames at once, and its
    # working set grows with the reply (up to 2048 frames); the estimate covers the streamed (chunked) decode.
    omni.decode_codes(np.zeros((4 * 25, 4), np.int64))
    # VmHWM, not ru_maxrss: the latter survives fork+exec and would include the pytest parent's size
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


def test_estimate_against_measured_rss(golden_bundle):
    """The estimate is an upper-side guide: within [0.5x, 2x] of the peak RSS measured in a fresh process."""
    p = resolve_profile("laptop", LAPTOP, n_ctx=1024, llm_threads=2, ort_threads=2)
    est = estimate_memory(golden_bundle, p).total
    out = subprocess.run([sys.executable, "-c", MEASURE, str(golden_bundle.root)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rss = int(out.stdout.strip().splitlines()[-1])
    print(f"tiny bundle: estimated {est / 2**20:.0f} MiB, measured peak RSS {rss / 2**20:.0f} MiB")
    assert 0.5 * rss <= est <= 2.0 * rss
