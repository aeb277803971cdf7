"""Device profiles: selection from (mocked) hardware, overrides, and the memory estimate against measured RSS."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edge.profiles import (
    GIB,
    Hardware,
    InsufficientMemoryError,
    check_fits,
    detect_profile_name,
    estimate_memory,
    resolve_profile,
)
from tests.helpers import REPO

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


# --- command line: --profile / --set on demo, live, serve, chat ----------------------------------------------------
SETS = ["--set", "llm_threads=1", "--set", "tts_variant=fp32", "--set", "use_mmap=true", "--set", "live_fps=0.25"]
PARSED = [("llm_threads", 1), ("tts_variant", "fp32"), ("use_mmap", True), ("live_fps", 0.25)]


@pytest.mark.parametrize("cmd", ["demo", "live", "serve", "chat"])
def test_cli_parses_profile_and_typed_overrides(cmd):
    from edge.cli import build_parser

    a = build_parser().parse_args([cmd, "--profile", "pi5", *SETS])
    assert a.profile == "pi5" and a.overrides == PARSED
    default = build_parser().parse_args([cmd])
    assert default.profile == "auto" and default.overrides == []


@pytest.mark.parametrize("arg,says", [("n_cxt=1", "known fields: llm_threads"), ("n_ctx=abc", "expected int"),
                                      ("use_mmap=maybe", "expected true/false"),
                                      ("tts_variant=int4", "choose one of fp32, int8"), ("n_ctx", "FIELD=VALUE")])
def test_cli_rejects_bad_overrides_clearly(arg, says, capsys):
    from edge.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["chat", "--set", arg])
    assert e.value.code == 2 and says in capsys.readouterr().err


def _capture(monkeypatch, module, name):
    seen = {}
    monkeypatch.setattr(module, name, lambda *a, **kw: seen.update(args=a, kwargs=kw))
    return seen


def test_cli_hands_profile_to_each_command(monkeypatch):
    """What each command's entry point receives: the profile, the typed overrides, and the old thread flags."""
    import edge.chat_repl
    import edge.demo
    import edge.live
    from edge.cli import main

    demo = _capture(monkeypatch, edge.demo, "run_demo")
    assert main(["demo", "--profile", "pi5", "--threads", "3", *SETS]) == 0
    assert demo["kwargs"]["profile"] == "pi5" and demo["kwargs"]["overrides"] == PARSED
    assert demo["kwargs"]["threads"] == 3

    live = _capture(monkeypatch, edge.live, "run_live")
    assert main(["live", "--profile", "custom", "--llm-threads", "2", "--n-ctx", "1024", *SETS]) == 0
    la = live["args"][0]
    assert (la.profile, la.overrides, la.llm_threads, la.n_ctx) == ("custom", PARSED, 2, 1024)

    chat = _capture(monkeypatch, edge.chat_repl, "run_chat")
    assert main(["chat", "--profile", "laptop", "--threads", "1", *SETS]) == 0
    co = chat["args"][0]
    assert (co.profile, co.overrides, co.threads) == ("laptop", tuple(PARSED), 1)

    pytest.importorskip("fastapi")
    import edge.server.app

    serve = _capture(monkeypatch, edge.server.app, "serve")
    assert main(["serve", "--profile", "jetson-orin", "--n-ctx", "1024", *SETS]) == 0
    st = serve["args"][0]
    assert (st.profile, st.overrides, st.n_ctx) == ("jetson-orin", tuple(PARSED), 1024)


def test_flags_and_sets_build_the_run_profile():
    from edge.profiles import profile_for_run

    base = profile_for_run("pi5", hw=PI5)
    assert base == resolve_profile("pi5", PI5) and base.name == "pi5"
    assert profile_for_run("custom", hw=PI5).name == "pi5"  # custom without overrides = the detected profile
    p = profile_for_run("pi5", [("tts_variant", "fp32"), "n_ctx=1024"], hw=PI5, threads=2, n_ctx=0)
    assert (p.llm_threads, p.ort_threads, p.n_ctx, p.tts_variant, p.name) == (2, 2, 1024, "fp32", "pi5+custom")
    assert profile_for_run("pi5", ["llm_threads=1"], hw=PI5, threads=3).llm_threads == 1  # --set wins over flags
    assert profile_for_run("laptop", ["ort_providers=CUDAExecutionProvider,CPUExecutionProvider"],
                           hw=LAPTOP).ort_options().providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_live_mode_splits_threads_and_keeps_what_the_user_set():
    laptop = resolve_profile("laptop", LAPTOP)
    live = laptop.for_live()  # 8 cores: decode and TTS overlap in live mode -> 5 + 3 (ThreadSplit.for_cores)
    assert (live.llm_threads, live.ort_threads, live.n_ctx) == (5, 3, 8192)
    mine = laptop.with_overrides(llm_threads=1, n_ctx=1024).for_live()
    assert (mine.llm_threads, mine.ort_threads, mine.n_ctx) == (1, 3, 1024)
    pi = resolve_profile("pi5", PI5).for_live()
    assert (pi.llm_threads, pi.ort_threads, pi.n_ctx, pi.live_frame_stride) == (2, 2, 4096, 2)
    # prefill never overlaps the TTS: it gets the whole machine, decode keeps its share
    assert (live.llm_batch_threads, mine.llm_batch_threads, pi.llm_batch_threads) == (8, 4, 4)
    opts = live.llm_options()
    assert (opts.n_threads, opts.n_threads_batch) == (5, 8)
    assert laptop.llm_options().n_threads_batch == laptop.llm_threads  # outside live mode: one count
    # the encoders run in the prefill's phase too: every core in live mode, the shared ONNX count outside it
    oo = live.omni_options()
    assert (oo.ort.intra_op_threads, oo.encoder_ort.intra_op_threads) == (3, 8)
    assert laptop.omni_options().encoder_ort is None
    spin_off = live.omni_options(ort=live.ort_options(allow_spinning=False))  # what `live` passes
    assert (spin_off.encoder_ort.intra_op_threads, spin_off.encoder_ort.allow_spinning) == (8, False)
    assert laptop.with_overrides(llm_batch_threads=2).for_live().llm_batch_threads == 2


def test_describe_names_the_profile_device_and_key_fields():
    p = resolve_profile("pi5", PI5, llm_threads=1)
    text = p.describe(PI5)
    assert len(text.splitlines()) == 2
    for part in ("profile pi5+custom", "raspberry-pi-5", "4 cores", "threads llm 1 / ort 4", "llm q4_k_m",
                 "n_ctx 2048", "kv f16", "read+repack", "vision int8, audio int8, tts int8", "max slices 4",
                 "live 0.5 fps, 448 px"):
        assert part in text, (part, text)


# --- the profile reaches what is loaded -------------------------------------------------------------------------
PI5_ROOMY = Hardware("Linux", "aarch64", 4, 8 * GIB, 7 * GIB, board="raspberry-pi-5")


def _loaded(omni) -> dict:
    """The settings the loaded objects really run with (llama.cpp context, onnxruntime sessions)."""
    import llama_cpp

    vision, tts = omni.vision.session, omni.tts.backbone.session
    return {"llm_threads": llama_cpp.llama_n_threads(omni.llm._ctx), "n_ctx": omni.llm.n_ctx,
            "ort_threads": vision.get_session_options().intra_op_num_threads,
            "vision_file": vision._model_path, "tts_file": tts._model_path}


def test_overrides_reach_the_loaded_objects(golden_bundle):
    from PIL import Image

    from edge.omni import Omni

    omni = Omni.load(golden_bundle, profile="pi5", hardware=PI5_ROOMY, llm_threads=1, tts_variant="fp32", n_ctx=512,
                     max_slice_nums=2)
    try:
        got = _loaded(omni)
        assert got["llm_threads"] == 1 and got["n_ctx"] == 512 and got["ort_threads"] == 4  # pi5: 4 ORT threads
        assert got["vision_file"] == str(golden_bundle.file("vision", "int8"))  # the profile's int8 ...
        assert got["tts_file"] == str(golden_bundle.file("tts", "backbone.fp32"))  # ... and the override
        big = Image.new("RGB", (1344, 1344))
        assert len(omni.preprocess_image(big).tgt_sizes) == 1 + 2  # source + max_slice_nums=2 slices
        assert len(omni.preprocess_image(big, 9).tgt_sizes) == 1 + 9  # a call's own value still wins
        assert omni.profile.name == "pi5+custom"
    finally:
        omni.close()


def test_explicit_options_take_precedence_over_the_profile(golden_bundle):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions

    omni = Omni.load(golden_bundle, OmniOptions(llm=LLMOptions(n_ctx=256, n_threads=2)), profile="pi5",
                     hardware=PI5_ROOMY)
    try:
        got = _loaded(omni)
        assert got["llm_threads"] == 2 and got["n_ctx"] == 256
        assert got["vision_file"] == str(golden_bundle.file("vision", "fp32"))  # OmniOptions' default variant
    finally:
        omni.close()


def test_server_and_chat_load_under_the_profile(golden_bundle, monkeypatch, capsys):
    """serve (Engine.load) and chat (chat_repl.load_model) load under the profile: the profile (with the --threads
    flag and --set) is printed and applied; without a profile the engine loads as before (fp32 graphs, n_ctx 4096)."""
    from edge.chat_repl import ChatOptions, ChatSession
    from edge.server.engine import Engine
    from edge.server.settings import ServerSettings

    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: PI5_ROOMY))
    engine = Engine.load(ServerSettings(bundle=str(golden_bundle.root), profile="auto", threads=1,
                                        overrides=(("tts_variant", "fp32"), ("max_slice_nums", 3))))
    try:
        got = _loaded(engine.omni)
        assert got["llm_threads"] == 1 and got["ort_threads"] == 1 and got["n_ctx"] == 2048  # pi5 context
        assert got["tts_file"] == str(golden_bundle.file("tts", "backbone.fp32"))
        assert engine.omni.options.max_slice_nums == 3
    finally:
        engine.close()
    out = capsys.readouterr().out
    assert "profile pi5+custom" in out and "threads llm 1 / ort 1" in out and "tts fp32" in out

    chat = ChatSession(ChatOptions(bundle=str(golden_bundle.root), profile="laptop", overrides=(("n_ctx", 1024),)))
    try:
        got = _loaded(chat.omni)
        assert got["n_ctx"] == 1024 and got["llm_threads"] == 4 and got["vision_file"].endswith("int8.onnx")
    finally:
        chat.close()

    plain = Engine.load(ServerSettings(bundle=str(golden_bundle.root)), progress=False)
    try:
        got = _loaded(plain.omni)
        assert got["n_ctx"] == 4096 and got["vision_file"] == str(golden_bundle.file("vision", "fp32"))
        assert plain.omni.profile is None
    finally:
        plain.close()


def test_demo_runs_under_the_profile(golden_bundle, tmp_path, monkeypatch, capsys):
    """The main job end to end on the tiny bundle: the printed profile and what its loaded objects ran with."""
    from edge.demo import run_demo
    from edge.omni import Omni

    seen = {}
    close = Omni.close
    monkeypatch.setattr(Omni, "close", lambda self: (seen.update(_loaded(self)), close(self)))
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: PI5_ROOMY))
    r = run_demo(golden_bundle.root, output_audio=tmp_path / "reply.wav", threads=1,
                 overrides=[("tts_variant", "fp32"), ("n_ctx", 1024)])
    out = capsys.readouterr().out
    assert "profile pi5+custom | device: Linux aarch64 (raspberry-pi-5), 4 cores" in out
    assert "threads llm 1 / ort 1 | llm f32 (profile suggests q4_k_m), n_ctx 1024" in out
    assert seen["llm_threads"] == 1 and seen["n_ctx"] == 1024 and seen["ort_threads"] == 1
    assert seen["tts_file"] == str(golden_bundle.file("tts", "backbone.fp32"))
    assert r["profile"].tts_variant == "fp32" and (tmp_path / "reply.wav").is_file()


def test_live_loads_with_its_profile_values(golden_bundle, monkeypatch):
    """live: the live thread split and context, no ORT spinning, the profile's variants (stopped after loading)."""
    from edge.live import LiveArgs, run_live
    from edge.omni import Omni

    class Loaded(Exception):
        pass

    def fake_load(bundle, options=None, **kw):
        raise Loaded(options, kw)

    monkeypatch.setattr(Omni, "load", fake_load)
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: PI5_ROOMY))
    with pytest.raises(Loaded) as e:
        run_live(LiveArgs(bundle=str(golden_bundle.root), ort_threads=1, overrides=(("audio_variant", "fp32"),)))
    options, kw = e.value.args
    assert (options.llm.n_threads, options.llm.n_ctx, options.ort.intra_op_threads) == (2, 4096, 1)
    assert options.ort.allow_spinning is False and options.audio_variant == "fp32" and options.vision_variant == "int8"
    assert kw["profile"].live_frame_max_side == 448 and kw["profile"].live_frame_stride == 2


def test_live_camera_frames_are_capped_to_the_profile_size():
    from PIL import Image

    from edge.live import _SizedCamera

    class Cam:
        lost = None

        def latest(self):
            return Image.new("RGB", (1920, 1080))

    cam = _SizedCamera(Cam(), 448)
    assert cam.latest().size == (448, 252) and cam.lost is None


def test_governor_never_exceeds_the_profile_frame_rate():
    from edge.governor import GovernorOptions, RealtimeGovernor

    gov = RealtimeGovernor(GovernorOptions(min_stride=resolve_profile("pi5", PI5).live_frame_stride))
    frames = 0
    for _ in range(20):  # fast units: the governor would raise the rate, but not above the profile's 0.5 fps
        f = gov.take_frame()
        frames += f
        gov.observe(0.05, f)
    assert frames == 10 and gov.fps == 0.5
    for _ in range(8):  # slow units: it still lowers the rate below the cap
        gov.observe(2.0, gov.take_frame())
    assert gov.fps < 0.5


# --- refusal before loading ----------------------------------------------------------------------------------
SMALL_BOX = Hardware("Linux", "x86_64", 2, GIB // 4, GIB // 8)


def test_refusal_names_overrides_that_exist(golden_bundle):
    """A bundle that does not fit is refused before loading, and every `--set` the message suggests parses."""
    import re

    from edge.omni import Omni
    from edge.profiles import MemoryEstimate, parse_override

    with pytest.raises(InsufficientMemoryError) as e:
        Omni.load(golden_bundle, profile="laptop", hardware=SMALL_BOX, kv_type="f32", tts_variant="fp32")
    msg = str(e.value)
    for want in ("GiB is available", "--set kv_type=f16", "--set n_ctx=2048", "--set tts_variant=int8",
                 "--llm-quant q4_k_m"):
        assert want in msg, (want, msg)
    mmap = MemoryEstimate(4 * GIB, 3 * GIB, GIB, 0, 0, 0, "q4_k_m")
    with pytest.raises(InsufficientMemoryError, match=r"--set use_mmap=false \(.*saves 3.0 GiB"):
        check_fits(mmap, SMALL_BOX, resolve_profile("laptop", LAPTOP, use_mmap=True))
    for item in re.findall(r"--set (\S+)", msg + " --set use_mmap=false"):
        parse_override(item)  # raises on a field or value that does not exist
    from edge.cli import build_parser

    build_parser().parse_args(["convert", "src", "dst", "--llm-quant", "q4_k_m"])  # the quant advice's flag exists


def test_cli_refuses_with_one_line(golden_bundle, monkeypatch, capsys):
    from edge.cli import main

    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: SMALL_BOX))
    assert main(["chat", "--bundle", str(golden_bundle.root)]) == 1
    captured = capsys.readouterr()
    assert "profile laptop" in captured.out
    assert captured.err.startswith("error: the bundle needs about") and captured.err.count("\n") == 1
    assert "--set n_ctx=2048" in captured.err
