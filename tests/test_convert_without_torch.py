"""Conversion needs no torch: convert the golden checkpoint and check the runtime's golden comparisons in a
process where `import torch` (and transformers) fails (tests/no_torch/sitecustomize.py on PYTHONPATH).

The tolerances are the golden README's (the in-process tests hold the same bundles to them too)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import numpy as np
    try:
        import torch  # noqa: F401
        raise SystemExit("the torch blocker is not active")
    except ImportError:
        pass
    from PIL import Image
    from converters.convert import convert
    from edge.audio_encoder import AudioEncoder
    from edge.image_preprocess import preprocess_image
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.tts import TTS
    from edge.vision import VisionEncoder
    from tests.helpers import golden_messages, rel_err
    from tests.test_tts import GREEDY, _greedy_codes, _teacher_forced

    golden = Path(sys.argv[1])
    ref = np.load(golden / "reference.npz")
    out = Path(tempfile.mkdtemp()) / "bundle"
    bundle = convert(golden / "ckpt", out, llm_quant="f32", int8=True, progress=False)
    errs = {}
    vis = VisionEncoder(bundle)
    for k in range(3):
        pre = preprocess_image(Image.open(golden / "inputs" / f"img{k}.png").convert("RGB"))
        errs[f"img{k}_vision_embeds"] = rel_err(vis(pre), ref[f"img{k}_vision_embeds"])
    aud = AudioEncoder(bundle)
    for k in range(2):
        mel = ref[f"wav{k}_mel"]
        errs[f"wav{k}_audio_embeds_chunked"] = rel_err(aud.encode(mel, chunked=True),
                                                       ref[f"wav{k}_audio_embeds_chunked"])
        errs[f"wav{k}_audio_embeds_full"] = rel_err(aud.encode(mel, chunked=False), ref[f"wav{k}_audio_embeds_full"])
    tts = TTS(bundle, variant="fp32", options=GREEDY)
    errs["tts_step_logits"] = rel_err(_teacher_forced(tts, ref), ref["tts_step_logits"])
    assert np.array_equal(_greedy_codes(tts, ref), ref["tts_codes"]), "greedy TTS codes differ from golden"
    d = tts.decoder
    errs["tts_mel"] = rel_err(d.codes_to_mel(ref["tts_codes"]), ref["tts_mel"])
    errs["dvae_fixed_mel"] = rel_err(d.codes_to_mel(ref["dvae_fixed_codes"]), ref["dvae_fixed_mel"])
    errs["vocos_fixed_wav"] = rel_err(d.mel_to_wav(ref["dvae_fixed_mel"]), ref["vocos_fixed_wav"])
    omni = Omni.load(bundle, OmniOptions(llm=LLMOptions.exact(n_ctx=1024)))
    for name in ("text", "image", "audio"):
        got = omni.prefill_logits(golden_messages(golden, name), all_positions=True)
        errs[f"chat_{name}_logits"] = rel_err(got, ref[f"chat_{name}_logits"])
        assert int(np.argmax(got[-1])) == int(np.argmax(ref[f"chat_{name}_last_logits"])), name
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    bad = {k: v for k, v in errs.items() if not v <= 1e-4}
    print("\\n".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert not bad, f"over the golden tolerance 1e-4: {bad}"
    print("OK", len(errs))
""")


def test_convert_and_golden_without_torch(golden_dir):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "no_torch"), str(REPO)]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(golden_dir)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 14" in out.stdout


DEFAULT_BUNDLE_SCRIPT = textwrap.dedent("""
    import sys
    from edge.default_bundle import ensure_default_bundle
    from edge.vision import VisionEncoder
    b = ensure_default_bundle(progress=False)
    assert "torch" not in sys.modules and "transformers" not in sys.modules
    print("OK", sorted(b.parts), VisionEncoder(b, variant="int8").llm_hidden)
""")


def test_default_bundle_builds_without_torch(tmp_path):
    """The built-in default bundle (models/synth.py + the converter) with torch blocked, in a fresh cache."""
    env = dict(os.environ, MINICPMO_EDGE_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "no_torch"), str(REPO)])
    out = subprocess.run([sys.executable, "-c", DEFAULT_BUNDLE_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK ['audio', 'llm', 'tts', 'vision']" in out.stdout
