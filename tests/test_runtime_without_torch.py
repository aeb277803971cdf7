"""The runtime never needs torch: load the golden bundle and chat with image, audio and speech out while
`import torch` is made to fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    from PIL import Image
    from edge.omni import Omni
    from edge.llm import LLMOptions
    from edge.omni import OmniOptions
    omni = Omni.load(sys.argv[1], OmniOptions(llm=LLMOptions(n_ctx=1024)))
    img = Image.new("RGB", (640, 400), (120, 200, 30))
    wav = (0.3 * np.sin(np.arange(24000) * 0.05)).astype(np.float32)
    r = omni.chat([{"role": "user", "content": [img, wav, "hi"]}], max_new_tokens=4, generate_audio=True, seed=0)
    assert r.audio is not None and r.sampling_rate == 24000
    print("OK", len(r.tokens), len(r.audio))
""")


def test_chat_with_image_audio_and_speech_without_torch(golden_bundle):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(golden_bundle.root)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
