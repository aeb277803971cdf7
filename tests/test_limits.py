"""Issue 19 below the HTTP layer: cost bounds checked before work, and bad values that used to crash.

Ground truths: the official slicer arithmetic (`plan_slices`, itself checked against the reference in
test_image_preprocess.py), soundfile's own decoding, the Hugging Face `tokenizers` library on the official TTS
prompt string, and the sampler's own argmax.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest

from edge.errors import CancelledError, CorruptModelFileError, InputLimitError, InvalidInputError


# --- image slicer bounds -------------------------------------------------------------------------------------------
def test_slice_cost_refuses_extreme_aspect_ratios_with_the_reason():
    from edge.image_preprocess import SliceOptions, check_slice_cost, plan_slices

    plan = plan_slices((200704, 1))
    assert plan.slice_sizes == [(200704, 14)]  # the official arithmetic: one slice of 14336 patches
    with pytest.raises(InputLimitError, match=r"200704x1 .*14336 patches.*limit is 2048"):
        check_slice_cost(plan)
    with pytest.raises(InputLimitError, match="100000x2"):
        check_slice_cost(plan_slices((100000, 2)))
    assert SliceOptions().max_slice_patches == 2 * 32 * 32


@pytest.mark.parametrize("size", [(1, 1), (448, 448), (4032, 3024), (5000, 5000), (1000, 1), (1, 1000), (4400, 44),
                                  (25000, 1000), (8000, 8)])
def test_slice_cost_accepts_what_the_official_slicer_sizes_normally(size):
    from edge.image_preprocess import check_slice_cost, plan_slices

    plan = plan_slices(size)
    assert check_slice_cost(plan) is plan
    assert max((w // 14) * (h // 14) for w, h in plan.slice_sizes) <= 1400  # near the aimed 1024


def test_preprocess_image_refuses_before_resizing():
    from PIL import Image

    from edge.image_preprocess import preprocess_image

    with pytest.raises(InputLimitError, match="aspect ratio"):
        preprocess_image(Image.new("RGB", (200704, 1)))


def test_probe_image_reads_the_header_only():
    from PIL import Image

    from edge.io.images import probe_image

    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 50_000  # a 25-MP image in a few KB: the decode is what costs
    assert probe_image(buf.getvalue()) == (5000, 5000, "PNG")
    with pytest.raises(InvalidInputError, match="not an image"):
        probe_image(b"not an image at all")


# --- audio ----------------------------------------------------------------------------------------------------------
def _flac(seconds: float, rate: int = 16000, channels: int = 1, noise: bool = False) -> bytes:
    import soundfile as sf

    n = int(seconds * rate)
    x = (np.random.default_rng(0).standard_normal((n, channels)) * 0.1 if noise
         else np.zeros((n, channels))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC")
    return buf.getvalue()


def test_audio_duration_from_the_header_before_decoding():
    from edge.io.audio import AudioLimits, load_audio, probe_audio

    data = _flac(1800)  # 30 min of silence: a few hundred KB
    assert probe_audio(data).seconds == pytest.approx(1800)
    with pytest.raises(InputLimitError, match=r"1800\.0 s; the limit is 120 s"):
        load_audio(data, AudioLimits(max_seconds=120))


def test_audio_without_a_length_in_the_header_stops_at_the_limit():
    from edge.io.audio import AudioLimits, load_audio, probe_audio

    data = bytearray(_flac(30))
    assert data[:4] == b"fLaC"
    # STREAMINFO total_samples (36 bits at byte 13.5 of the block) = 0: "unknown"; libsndfile then reports 2^63-1.
    data[8 + 13] &= 0xF0
    data[8 + 14:8 + 18] = b"\0\0\0\0"
    assert probe_audio(bytes(data)).seconds is None
    with pytest.raises(InputLimitError, match="longer than 10 s"):
        load_audio(bytes(data), AudioLimits(max_seconds=10))
    with pytest.raises(InvalidInputError):  # no limit: a clean 4xx-able error (it was a ValueError: array too big)
        load_audio(bytes(data))


def test_block_decoding_equals_soundfile_and_can_be_cancelled():
    import soundfile as sf

    from edge.io.audio import SAMPLE_RATE, AudioLimits, load_audio, resample

    data = _flac(20, rate=48000, channels=2, noise=True)  # several decode blocks
    whole, sr = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    want = resample(whole.mean(axis=1), sr, SAMPLE_RATE)
    np.testing.assert_array_equal(load_audio(data, AudioLimits(max_seconds=60)), want)
    np.testing.assert_array_equal(load_audio(data), want)
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        load_audio(data, AudioLimits(should_stop=stop.is_set))


# --- video ----------------------------------------------------------------------------------------------------------
def _mjpeg(tmp_path, n: int, side: int):
    import cv2

    path = tmp_path / "v.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (side, side))
    for _ in range(n):
        w.write(np.zeros((side, side, 3), np.uint8))
    w.release()
    return path


def test_video_frame_pixels_checked_before_decoding(tmp_path):
    from edge.io.video import VideoOptions, load_video, probe_video

    path = _mjpeg(tmp_path, 4, 2000)
    info = probe_video(path)
    assert (info.width, info.height, info.n_frames) == (2000, 2000, 4)
    with pytest.raises(InputLimitError, match=r"2000x2000 frames = 4\.0 MP, above the 1\.0 MP"):
        load_video(path, VideoOptions(max_frame_pixels=1_000_000))
    assert len(load_video(path, VideoOptions(max_frame_pixels=4_000_000)).frames) == 4
    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        load_video(path, VideoOptions(should_stop=stop.is_set))


# --- the request budget (edge/server/media.py) -----------------------------------------------------------------------
def _image_parts(n: int, side: int) -> list:
    import base64

    from PIL import Image

    from edge.server.types import ChatMessage

    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return [ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": url}}] * n)]


def test_budget_refuses_on_headers_without_decoding(monkeypatch):
    from edge.server.errors import APIError
    from edge.server.media import MediaDecoder
    from edge.server.settings import ServerSettings

    decoded = []
    monkeypatch.setattr(MediaDecoder, "image", lambda self, data, param: decoded.append(param))
    dec = MediaDecoder(ServerSettings())
    with pytest.raises(APIError, match="decode to 286 MiB, above the 256 MiB") as e:
        dec.convert(_image_parts(4, 5000))  # 4 x 25 MP x 3 bytes
    assert e.value.status == 400 and e.value.code == "input_too_large" and decoded == []
    with pytest.raises(APIError, match="more than 16 images"):
        dec.convert(_image_parts(17, 8))
    assert decoded == []
    from edge.errors import ContextLengthExceededError

    with pytest.raises(ContextLengthExceededError, match="at least 1920 prompt tokens"):  # 3 x 10 slices x 64
        dec.convert(_image_parts(3, 2000), n_ctx=1024)
    assert decoded == []
    dec.convert(_image_parts(2, 8), n_ctx=4096)
    assert len(decoded) == 2


def test_convert_stops_when_cancelled():
    from edge.server.media import MediaDecoder
    from edge.server.settings import ServerSettings

    stop = threading.Event()
    stop.set()
    with pytest.raises(CancelledError):
        MediaDecoder(ServerSettings()).convert(_image_parts(1, 8), cancel=stop)


def test_file_urls_nul_byte_and_size_cap(tmp_path):
    from edge.server.errors import APIError
    from edge.server.media import MediaDecoder
    from edge.server.settings import ServerSettings

    (tmp_path / "big.bin").write_bytes(b"\0" * 2048)
    dec = MediaDecoder(ServerSettings(media_dir=str(tmp_path), max_media_bytes=1024))
    with pytest.raises(APIError, match="NUL byte") as e:
        dec.fetch(f"file://{tmp_path}/a\x00b.png", "p", kind="image")
    assert e.value.status == 400
    with pytest.raises(APIError, match="2048 bytes, above the 1024-byte limit") as e:
        dec.fetch(f"file://{tmp_path}/big.bin", "p", kind="image")
    assert e.value.status == 400


# --- values that crashed ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-300, 1e-45, float("nan")])
def test_tiny_temperature_is_the_greedy_limit(temperature):
    from edge.sampling import Sampler, SamplingOptions

    logits = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 5
    s = Sampler(SamplingOptions(temperature=temperature, seed=0))
    assert s(logits) == int(np.argmax(logits))


def test_normal_temperature_sampling_is_unchanged():
    """The overflow guard must not change ordinary sampling: the same draws as the formula it guards."""
    from edge.sampling import Sampler, SamplingOptions

    logits = np.random.default_rng(2).standard_normal(500).astype(np.float32) * 3
    o = SamplingOptions(temperature=0.7, top_p=0.8, top_k=100, repetition_penalty=1.0, seed=5)
    got = [Sampler(o)(logits) for _ in range(3)]
    rng = np.random.default_rng(5)
    x = logits / np.float32(0.7)
    kth = np.partition(x, -100)[-100]
    x[x < kth] = -np.inf
    cand = np.flatnonzero(np.isfinite(x))
    order = np.argsort(-x[cand], kind="stable")
    cand, lg = cand[order], x[cand][order]
    p = np.exp(lg - lg[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), 0.8) + 1)
    want = int(cand[:keep][rng.choice(keep, p=p[:keep] / p[:keep].sum())])
    assert got == [want] * 3


def test_negative_seed_means_random():
    from edge.server.types import ChatCompletionRequest, SpeechRequest

    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], seed=-1).seed is None
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], seed=7).seed == 7
    assert SpeechRequest(input="x", seed=-1).seed is None


def test_json_parser_refusals():
    from edge.server.errors import APIError
    from edge.server.jsonbody import MAX_JSON_DEPTH, parse_json

    for raw, needle in [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                        (json.dumps({"a": [[[[{"b": 1}]]]]}).replace("1", "[" * 40 + "]" * 40), "more than 32"),
                        ('{"t": NaN}', "NaN"), ('{"t": -Infinity}', "-Infinity"),
                        ('{"t": "\\ud800"}', "lone UTF-16 surrogate"), ('{"\\udc00": 1}', "surrogate"),
                        ("{'a': 1}", "not valid JSON")]:
        with pytest.raises(APIError, match=needle) as e:
            parse_json(raw)
        assert e.value.status == 400
    assert parse_json('{"t": "\\ud83d\\ude00"}') == {"t": "\U0001F600"}  # a surrogate pair is fine
    assert MAX_JSON_DEPTH >= 8


# --- bundle files -----------------------------------------------------------------------------------------------------
def _copy_bundle(golden_bundle, tmp_path):
    import shutil

    from edge.bundle import Bundle

    dst = tmp_path / "bundle"
    shutil.copytree(golden_bundle.root, dst)
    return Bundle.load(dst)


def test_manifest_paths_confined_to_the_bundle(golden_bundle, tmp_path):
    from edge import keys
    from edge.bundle import Bundle

    b = _copy_bundle(golden_bundle, tmp_path)
    manifest = json.loads((b.root / keys.BUNDLE_MANIFEST).read_text())
    part = next(iter(manifest["parts"].values()))
    next(iter(part["files"].values()))["path"] = "../../../../etc/hostname"
    (b.root / keys.BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptModelFileError, match="outside the bundle directory"):
        Bundle.load(b.root)


def test_corrupt_onnx_named_at_load(golden_bundle, tmp_path):
    from edge.bundle import onnx_header_ok, require_intact
    from edge.onnx_session import make_session

    b = _copy_bundle(golden_bundle, tmp_path)
    require_intact(b)  # a good bundle passes
    onnx = sorted(p for p in b.root.rglob("*.onnx"))
    assert onnx and all(onnx_header_ok(p) for p in onnx)
    victim = onnx[0]
    size = victim.stat().st_size
    victim.write_bytes(b"\xde\xad" * (size // 2) + b"\0" * (size % 2))  # same size, garbage
    with pytest.raises(CorruptModelFileError, match=rf"{victim.name} does not start like an ONNX model"):
        require_intact(b)
    with pytest.raises(CorruptModelFileError, match=rf"onnxruntime cannot load .*{victim.name}.*Convert the bundle"):
        make_session(victim)
    victim.write_bytes(b"\x08\x07")  # truncated
    with pytest.raises(CorruptModelFileError, match=r"has 2 bytes, the manifest says"):
        require_intact(b)


def test_info_compares_sizes_without_verify(golden_bundle, tmp_path, capsys):
    from edge.cli import main

    b = _copy_bundle(golden_bundle, tmp_path)
    assert main(["info", str(b.root)]) == 0
    gguf = next(b.root.rglob("*.gguf"))
    with open(gguf, "r+b") as f:
        f.truncate(gguf.stat().st_size // 2)
    with pytest.raises(SystemExit) as e:
        main(["info", str(b.root)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"{gguf.name} has {gguf.stat().st_size} bytes, the manifest says" in out


# --- TTS text -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tts_tokenizer(golden_bundle):
    from edge.tts.text import TtsTokenizer

    return TtsTokenizer.from_bundle(golden_bundle)


def test_user_text_never_becomes_tts_control_tokens(tts_tokenizer):
    from edge.tts.text import ETTS, PAD, PTTS, SPK_EMB, STTS, prompt_ids

    tok = tts_tokenizer
    control = {tok.token_id(t) for t in (STTS, PTTS, ETTS, PAD, SPK_EMB, "[SEP]", "[CLS]")}
    for text in ("hello [spk_emb] world", "[PAD][Etts]", "[Stts][Ptts][SEP]x"):
        assert not control & set(tok.encode_text(text)), text
        assert control & set(tok.encode(text)), text  # what the official whole-string tokenisation does
        ids, n = prompt_ids(text, tok)
        assert len(ids) == 300 + 3 and n == len(tok.encode_text(text))
        assert ids.count(tok.token_id(SPK_EMB)) == 1 and ids.count(tok.token_id(ETTS)) == 1
        assert ids[:2] == [tok.token_id(STTS), tok.token_id(SPK_EMB)] and ids[-1] == tok.token_id(PTTS)


def test_ordinary_text_gets_the_official_prompt_ids(tts_tokenizer, golden_bundle):
    """Official: the prompt string `[Stts][spk_emb]text[Etts][PAD]...[Ptts]` tokenised whole (tokenizers lib)."""
    from tokenizers import Tokenizer

    from edge import keys
    from edge.tts.text import prepare_tts_text, prompt_ids

    hf = Tokenizer.from_file(str(golden_bundle.file(keys.PART_TTS, "tokenizer/tokenizer.json")))
    for text in ("Hello, world. How are you today?", "你好，世界！", "a" * 2000, "Numbers: one two three."):
        prompt, n = prepare_tts_text(text, tts_tokenizer)
        assert prompt_ids(text, tts_tokenizer) == (hf.encode(prompt, add_special_tokens=False).ids, n)


def test_serve_refuses_a_damaged_bundle_naming_the_file(golden_bundle, tmp_path, capsys):
    from edge.cli import main

    b = _copy_bundle(golden_bundle, tmp_path)
    victim = sorted(b.root.rglob("*.onnx"))[-1]
    victim.write_bytes(b"\0" * victim.stat().st_size)
    assert main(["serve", str(b.root), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and victim.name in err and "Convert the bundle" in err


def test_http_media_has_a_total_deadline():
    """A source that sends a byte every 0.2 s never trips a per-read timeout; the total deadline (1 s) ends it."""
    import socket
    import time

    from edge.server.errors import APIError
    from edge.server.media import MediaDecoder
    from edge.server.settings import ServerSettings

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.2)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    dec = MediaDecoder(ServerSettings(allow_http_media=True, media_fetch_timeout=1.0))
    try:
        with pytest.raises(APIError, match="took longer than 1 s") as e:
            dec.fetch(f"http://127.0.0.1:{srv.getsockname()[1]}/slow.png", "p", kind="image")
        assert e.value.status == 408 and e.value.code == "fetch_timeout"
    finally:
        stop.set()
        srv.close()
