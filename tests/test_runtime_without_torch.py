"""The runtime needs no converter extra: load the golden bundle and chat with image, audio and speech out while
`import torch`, `transformers`, `gguf`, `onnx` and `onnxscript` are made to fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys
    for name in ("torch", "transformers", "gguf", "onnx", "onnxscript", "safetensors"):
        sys.modules[name] = None  # any import of them now raises ImportError
    import numpy as np
    from PIL import Image
    from edge import Omni
    from edge.options import LLMOptions, OmniOptions
    omni = Omni.load(sys.argv[1], OmniOptions(llm=LLMOptions(n_ctx=1024)))  # the load checks the GGUF header
    img = Image.new("RGB", (640, 400), (120, 200, 30))
    wav = (0.3 * np.sin(np.arange(24000) * 0.05)).astype(np.float32)
    r = omni.chat([{"role": "user", "content": [img, wav, "hi"]}], max_new_tokens=4, generate_audio=True, seed=0)
    assert r.audio is not None and r.sampling_rate == 24000
    chunks = list(omni.chat([{"role": "user", "content": "more"}], max_new_tokens=4, stream=True, generate_audio=True))
    assert any(c.audio is not None for c in chunks)
    print("OK", len(r.tokens), len(r.audio))
""")


def test_chat_with_image_audio_and_speech_without_torch(golden_bundle):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(golden_bundle.root)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
