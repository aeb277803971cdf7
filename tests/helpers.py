"""Helpers shared by the tests (plain functions and fakes; the fixtures live in conftest.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GATE_POLL_SECONDS = 0.01


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out - ref| / max|ref|: the golden README's tolerance measure."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.max(np.abs(out - ref)) / max(np.max(np.abs(ref)), 1e-30))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def golden_messages(golden_dir, name: str) -> list[dict]:
    """A chat case of cases.json as runtime messages (files resolved to PIL images / float32 waves)."""
    import json

    import soundfile as sf
    from PIL import Image

    case = json.loads((golden_dir / "inputs" / "cases.json").read_text())["chat"][name]
    msgs = []
    for m in case["msgs"]:
        content = []
        for part in m["content"]:
            t = part["type"]
            if t == "text":
                content.append(part["text"])
            elif t == "image":
                content.append(Image.open(golden_dir / "inputs" / part["file"]).convert("RGB"))
            elif t == "audio":
                wav, _ = sf.read(golden_dir / "inputs" / part["file"], dtype="float32")
                content.append(wav)
        msgs.append({"role": m["role"], "content": content})
    return msgs


def end_speech_after(monkeypatch, tts, frames: int) -> list[int]:
    """Make `tts` sample EOS once `frames` code frames exist (random weights rarely say EOS, a real voice ends its
    speech wherever it likes). Returns a list that counts the frames sampled, to show that the speech ended."""
    real = tts.new_sampler
    sampled: list[int] = []

    def new_sampler(sampling=None):
        inner = real(sampling)

        class EosAfter:
            options = inner.options

            def __call__(self, logits, hist, i, audio_bos):
                frame = inner(logits, hist, i, audio_bos)
                sampled.append(1)
                return np.full_like(frame, tts.dims.eos_id) if len(sampled) > frames else frame

        return EosAfter()

    monkeypatch.setattr(tts, "new_sampler", new_sampler)
    return sampled


def never_stop(monkeypatch, ids=(100, 200, 300, 400, 500)) -> None:
    """Make every LLM reply run to max_new_tokens: the sampler returns these ordinary ids in turn. A test about
    long replies must not depend on when a random model, on this CPU's rounding, happens to sample a terminator."""

    class Cycle:
        def __init__(self, options):
            self.i = 0

        def __call__(self, logits, context_ids=None) -> int:
            self.i += 1
            return ids[(self.i - 1) % len(ids)]

    monkeypatch.setattr("edge.llm.Sampler", Cycle)


class ScriptedMicrophone:
    """A microphone script delivered as fast as it is read, except at gates: before the packet that starts at a
    gate's sample offset, it waits until the gate's predicate holds (e.g. "reply 1 has played audio"). Live tests
    so depend on the order of events, not on how fast a loaded machine decodes."""

    def __init__(self, wave: np.ndarray, gates=()):
        from edge.io.microphone import PACKET_SAMPLES

        self.packet = PACKET_SAMPLES
        n = -(-wave.size // self.packet) * self.packet
        self._wave = np.pad(np.asarray(wave, np.float32), (0, n - wave.size))
        self._gates = sorted(gates, key=lambda g: g[0])  # (sample offset, predicate)
        self._pos = 0
        self._closed = threading.Event()
        self.ended = False

    def read(self, timeout: float) -> np.ndarray | None:
        if self._pos >= self._wave.size or self._closed.is_set():
            self.ended = True
            return None
        if self._gates and self._pos + self.packet > self._gates[0][0]:
            if not self._gates[0][1]():
                self._closed.wait(min(timeout, GATE_POLL_SECONDS))
                return None
            self._gates.pop(0)
        out = self._wave[self._pos:self._pos + self.packet]
        self._pos += self.packet
        return out

    def close(self) -> None:
        self._closed.set()


class ScriptedCamera:
    """Frames for the first `n_frames` reads, then lost (like a video file that ended)."""

    def __init__(self, frames: list, n_frames: int):
        self.frames, self.n_frames, self.reads, self.lost = list(frames), n_frames, 0, None

    def latest(self):
        if self.reads >= self.n_frames:
            self.lost = "video file scripted.avi ended"
            return None
        frame = self.frames[self.reads % len(self.frames)]
        self.reads += 1
        return frame

    def close(self) -> None:
        pass


def wait_until(pred, timeout: float = 120.0) -> None:
    """Poll `pred` (a generous deadline: it guards against hangs, it is not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(GATE_POLL_SECONDS)


def bundle_with_llm(src: Path, gguf: Path, quant: str, dst: Path) -> Path:
    """A bundle dir whose ONNX parts are links to `src`'s and whose LLM is `gguf` (a quantised variant without a
    second conversion of the ONNX parts)."""
    import hashlib
    import json

    from edge import keys

    man = json.loads((src / keys.BUNDLE_MANIFEST).read_text())
    llm = man["parts"][keys.PART_LLM]
    model = llm["files"]["model"]
    for p in src.rglob("*"):
        rel = p.relative_to(src)
        if p.is_file() and str(rel) not in (keys.BUNDLE_MANIFEST, model["path"]):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(p)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / model["path"]).symlink_to(gguf)
    model.update(bytes=gguf.stat().st_size, sha256=hashlib.sha256(gguf.read_bytes()).hexdigest())
    llm["meta"]["quant"] = quant
    (dst / keys.BUNDLE_MANIFEST).write_text(json.dumps(man, indent=1))
    return dst
