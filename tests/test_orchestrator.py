"""Live pipeline: turn-taking rules, VAD rule and unit cutter, silero-vad ONNX vs the package's TorchScript model,
a scripted live session on the golden bundle (video file camera + audio file microphone, barge-in, camera lost
mid-session) whose KV cache must equal the official prompt rules, and faults without leaked threads."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest

from edge import turns as tt
from edge.io import microphone as mic

SR = 16000
GEN = "<|im_end|>\n<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
AFTER_CUT = "<|tts_eos|><|im_end|>\n<|im_start|>user\n"
AFTER_DONE = "<|im_end|>\n<|im_start|>user\n"


# --- pure parts --------------------------------------------------------------------------------------------------
def _run(events, **opts):
    s = tt.TurnState(options=tt.TurnOptions(**opts))
    out = []
    for ev in events:
        s, acts = tt.step(s, ev)
        out.append((s.phase, acts))
    return s, out


def test_turns_barge_in_and_stale_events():
    s, out = _run([tt.SpeechStart(0), tt.UnitReady("u1"), tt.SpeechEnd(1), tt.ReplyProgress(1, "first_token"),
                   tt.SpeechStart(2), tt.ReplyDone(1, False), tt.UnitReady("u2"), tt.SpeechEnd(3),
                   tt.ReplyDone(2, True), tt.UnitReady("late")])
    phases = [p for p, _ in out]
    assert phases == [tt.Phase.HEARING, tt.Phase.HEARING, tt.Phase.THINKING, tt.Phase.SPEAKING, tt.Phase.HEARING,
                      tt.Phase.HEARING, tt.Phase.HEARING, tt.Phase.THINKING, tt.Phase.LISTENING, tt.Phase.LISTENING]
    acts = [a for _, a in out]
    assert acts[0] == (tt.BeginUtterance(),) and acts[1] == (tt.PrefillUnit("u1"),)
    assert acts[2] == (tt.EndUtterance(), tt.StartReply(1))
    assert acts[4] == (tt.InterruptReply(1), tt.BeginUtterance())  # barge-in
    assert acts[5] == ()  # the interrupted reply's late "done" is ignored
    assert acts[8] == (tt.FinishReply(2),) and acts[9] == ()
    assert (s.turn, s.reply, s.interruptions) == (2, 2, 1)


def test_turns_without_barge_in_and_stop():
    s, out = _run([tt.SpeechStart(0), tt.SpeechEnd(1), tt.SpeechStart(2), tt.Stop("bye"), tt.SpeechStart(3)],
                  barge_in=False)
    assert out[2] == (tt.Phase.THINKING, ())  # speech during the reply is ignored (official web demo)
    assert out[3] == (tt.Phase.STOPPED, (tt.InterruptReply(1), tt.Shutdown("bye")))
    assert out[4] == (tt.Phase.STOPPED, ())


def test_vad_segmenter_thresholds():
    """Start once more than 0.4 s of the last 1 s is speech; end after 0.6 s of continuous silence."""
    pkt = mic.PACKET_SAMPLES / SR
    need = math.floor(0.4 / pkt) + 1  # packets of speech to exceed 0.4 s
    seg = mic.VadSegmenter()
    flags = [False] * 10 + [True] * 30 + [False] * 5 + [True] * 3 + [False] * 40
    events = [(i, e) for i, f in enumerate(flags) for e in seg.push(f)]
    (i0, start), (i1, end) = events
    assert start[0] == "start" and i0 == 10 + need - 1
    assert start[2] == pytest.approx(10 * pkt)  # onset: the first speech packet
    silent = math.ceil(0.6 / pkt - 1e-9)
    assert end[0] == "end" and i1 == 10 + 30 + 5 + 3 + silent - 1  # the 5-packet gap did not end the turn


def test_unit_assembler_cuts_one_second_units_from_the_onset():
    rng = np.random.default_rng(0)
    stream = rng.standard_normal(80 * mic.PACKET_SAMPLES).astype(np.float32)
    asm = mic.UnitAssembler()
    units = []
    for k in range(80):
        units += asm.push(stream[k * 512:(k + 1) * 512])
        if k == 19:
            asm.begin(preroll_seconds=5 * 512 / SR)  # the utterance began 5 packets ago (packet 15)
    rest = asm.flush()
    assert [u.size for u in units] == [SR, SR] and rest.size == 65 * 512 - 2 * SR
    np.testing.assert_array_equal(np.concatenate(units + [rest]), stream[15 * 512:])


def test_silero_onnx_matches_package_torchscript(golden_dir):
    torch = pytest.importorskip("torch")
    silero_vad = pytest.importorskip("silero_vad")
    import soundfile as sf

    from edge.demo import demo_question

    wav0, _ = sf.read(golden_dir / "inputs" / "wav0.wav", dtype="float32")
    x = np.concatenate([demo_question(), wav0, np.zeros(4096, np.float32)])
    ours = mic.SileroVad()
    ref = silero_vad.load_silero_vad(onnx=False)
    a = np.array([ours.probability(x[i:i + 512]) for i in range(0, x.size - 511, 512)])
    with torch.no_grad():
        b = np.array([float(ref(torch.from_numpy(x[i:i + 512].copy()), SR)) for i in range(0, x.size - 511, 512)])
    assert np.abs(a - b).max() <= 1e-5
    assert a[-4:].max() < mic.SILERO_THRESHOLD  # digital silence is not speech


# --- live sessions on the golden bundle ---------------------------------------------------------------------------
def _voice(seconds: float) -> np.ndarray:
    from edge.demo import demo_question

    return np.resize(demo_question(), int(seconds * SR)).astype(np.float32)


def _script(parts) -> np.ndarray:
    return np.concatenate([_voice(s) if kind == "speech" else np.zeros(int(s * SR), np.float32) for kind, s in parts])


def _video(path, seconds: float, fps: int = 10):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(int(seconds * fps)):
        f = np.zeros((48, 64, 3), np.uint8)
        f[:, :, i % 3] = 40 + (i * 13) % 200
        w.write(f)
    w.release()
    return path


@pytest.fixture(scope="module")
def live(golden_bundle):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.onnx_session import OrtOptions
    from edge.tts.generate import TTS, TTSOptions
    from edge.tts.sampling import SamplingOptions as TtsSampling

    ort = OrtOptions(intra_op_threads=1, allow_spinning=False)
    omni = Omni.load(golden_bundle, OmniOptions(llm=LLMOptions.exact(n_ctx=4096, n_threads=1), ort=ort))
    # random weights rarely say EOS: cap a reply's speech at 100 code frames (~2 s)
    tts = TTS(golden_bundle, ort=ort, options=TTSOptions(max_codes=100, sampling=TtsSampling(seed=0)))
    yield omni, tts
    omni.close()


def _orchestrator(omni, tts, audio, *, camera=None, sink="paced", **opts):
    from edge.io.speaker import WavSink
    from edge.orchestrator import LiveOptions, Orchestrator, PacedSink
    from edge.streaming import StreamingSession

    if sink == "paced":
        sink = PacedSink(WavSink(), tts.sample_rate)
    sess = StreamingSession(omni, tts=tts)
    source = audio if hasattr(audio, "read") else mic.FileMicrophone(audio)
    return Orchestrator(sess, source, camera=camera, sink=sink, vad=mic.EnergyVad(),
                        options=LiveOptions(**{"max_new_tokens": 24, "seed": 0, **opts}))


def _audio_tokens(n_samples: int) -> int:
    """Official output_lens for one audio (spec §2.3), written out independently."""
    frames = -(-n_samples // 160)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def _tokenize_parts(omni, parts) -> list[int]:
    """(text, trusted) parts and raw id lists -> ids as the official processor tokenizes one prompt string:
    special tokens parsed in template text only, adjacent plain text merged."""
    import re

    sp = omni.special
    split = re.compile("(" + "|".join(re.escape(n) for n in sorted(sp, key=len, reverse=True)) + ")")
    ids, plain = [], []

    def flush():
        if plain:
            ids.extend(omni.llm.tokenize("".join(plain)))
            plain.clear()

    for part in parts:
        if isinstance(part, list):
            flush()
            ids.extend(part)
            continue
        text, trusted = part
        for c in (split.split(text) if trusted else [text]):
            if trusted and c in sp:
                flush()
                ids.append(sp[c])
            elif c:
                plain.append(c)
    flush()
    return ids


def _expected_ids(omni, log, system_prompt) -> list[int]:
    """The official streaming prompt rules applied to the orchestrator's log of what it sent, written
    independently of edge/streaming.py: ids with media rows as `<unk>`."""
    parts = [("<|im_start|>user\n", True), (system_prompt, False), ("<|im_end|>\n", True)]
    opened, last_completed, replied = False, None, False
    for item in log.items[1:]:
        if item[0] == "prefill":
            kinds, n = item[1], item[2]
            if not opened:
                parts.append((("<|im_start|>user\n" if not replied else AFTER_DONE if last_completed else AFTER_CUT),
                              True))
                opened = True
            if "unit" in kinds:
                parts.append(("<unit>", "<unit>" in omni.special))  # golden vocab: plain characters, as officially
            if "image" in kinds:
                parts.append(("<image>" + "<unk>" * 64 + "</image>", True))
            if _audio_tokens(n) > 0:  # a sliver of audio (< 3 mel frames) gets no placeholder at all, officially
                parts.append(("<|audio_start|>" + "<unk>" * _audio_tokens(n) + "<|audio_end|>", True))
        else:
            parts += [(GEN, True), list(item[1])]
            last_completed, replied, opened = item[2], True, False
    return _tokenize_parts(omni, parts)


def _cache_ids(omni):
    unk = omni.special["<unk>"]
    return [unk if k is None else k for k in omni.llm.cached_tokens()]


def test_scripted_live_session_with_barge_in(live, tmp_path):
    """3 spoken turns, the 2nd and 3rd starting while the assistant still talks (barge-in), a camera that ends
    mid-session. The microphone script waits at each barge-in until the reply in progress has played audio, so
    the test follows events, not the speed of the machine. Checks: KV cache == official rules for the logged event
    sequence, trace order, trace JSONL, played audio, and no thread left behind."""
    from PIL import Image

    from edge.session import JOIN_SECONDS
    from tests.helpers import ScriptedCamera, ScriptedMicrophone

    omni, tts = live
    baseline = set(threading.enumerate())
    parts = [("silence", 0.5), ("speech", 1.6), ("silence", 1.2), ("speech", 1.3), ("silence", 1.0),
             ("speech", 1.2), ("silence", 2.0)]
    audio = _script(parts)
    starts = np.cumsum([0] + [int(sec * SR) for _, sec in parts])
    holder: list = []

    def spoken(turn: int):
        return lambda: len(holder[0].traces) >= turn and holder[0].traces[turn - 1].first_audio is not None

    source = ScriptedMicrophone(audio, gates=[(starts[3], spoken(1)), (starts[5], spoken(2))])
    frames = [np.full((48, 64, 3), 40 + 60 * k, np.uint8) for k in range(3)]
    cam = ScriptedCamera([Image.fromarray(f) for f in frames], n_frames=2)
    trace_path = tmp_path / "trace.jsonl"
    orch = _orchestrator(omni, tts, source, camera=cam, trace_path=str(trace_path), mic_timeout_seconds=600.0)
    holder.append(orch)
    res = orch.run()

    assert res.end_reason == "microphone ended", res.errors
    assert len(res.turns) == 3
    assert [t.interrupted for t in res.turns] == [True, True, False], res.turns
    assert any("ended; continuing audio-only" in e for e in res.errors)
    kinds = [it[1] for it in res.log.items if it[0] == "prefill"][1:]
    assert ["unit", "image", "audio"] in kinds and ["audio"] in kinds  # frames, then audio-only units
    assert kinds.index(["audio"]) > kinds.index(["unit", "image", "audio"])
    for t in res.turns:
        assert t.speech_end <= t.prefill_done <= t.first_token <= t.first_audio <= t.end, t
        assert t.units >= 1 and t.tokens >= 1
    for t in res.turns[:2]:
        assert t.stop_ms is not None and t.stop_ms < JOIN_SECONDS * 1000, t.stop_ms  # every worker stopped
    assert not any("did not stop" in e for e in res.errors), res.errors
    got, want = _cache_ids(omni), _expected_ids(omni, res.log, orch.options.system_prompt)
    assert got == want, _debug_diff(omni, got, want)
    lines = [json.loads(x) for x in trace_path.read_text().splitlines()]
    assert [x["turn"] for x in lines] == [1, 2, 3] and [x["interrupted"] for x in lines] == [True, True, False]
    assert lines[2]["first_audio"] == pytest.approx(res.turns[2].first_audio, abs=1e-4)
    # the last reply played completely; the interrupted ones only partly
    played = orch.sink.played_seconds
    assert res.turns[2].audio_seconds <= played < sum(t.audio_seconds for t in res.turns) + 1e-6
    assert orch.sink.inner.audio.size == pytest.approx(played * tts.sample_rate, abs=2)
    _no_leak(baseline)


def _no_leak(baseline, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        extra = set(threading.enumerate()) - baseline
        if not extra:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left running: {sorted(t.name for t in extra)}")


class _DeadMic:
    """A microphone that opened fine and then delivers nothing (muted / unplugged)."""

    ended = False

    def read(self, timeout):
        time.sleep(timeout)
        return None

    def close(self):
        pass


class _BrokenSink:
    def push(self, chunk):
        raise OSError("PortAudio: device unavailable")

    def flush(self):
        pass

    def interrupt(self):
        pass

    def close(self):
        pass


def test_fault_microphone_returns_no_data(live):
    omni, tts = live
    baseline = set(threading.enumerate())
    t0 = time.monotonic()
    res = _orchestrator(omni, tts, _DeadMic(), mic_timeout_seconds=0.5).run()
    assert "no audio for 0.5 s" in res.end_reason and time.monotonic() - t0 < 10
    _no_leak(baseline)


def test_fault_speaker_fails_degrades_to_text(live):
    omni, tts = live
    baseline = set(threading.enumerate())
    audio = _script([("silence", 0.3), ("speech", 1.0), ("silence", 1.0), ("speech", 1.0), ("silence", 1.5)])
    orch = _orchestrator(omni, tts, audio, sink=_BrokenSink(), barge_in=False)
    res = orch.run()
    assert res.end_reason == "microphone ended"
    assert sum("speaker failed" in e for e in res.errors) == 1 and not orch.speech_on
    assert len(res.turns) >= 1 and all(t.tokens >= 1 for t in res.turns)  # text replies go on
    _no_leak(baseline)


def _linked_bundle(src, dst):
    for p in src.rglob("*"):
        if p.is_file():
            q = dst / p.relative_to(src)
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p)
    return dst


def test_fault_model_files_vanish(golden_bundle, tmp_path):
    """Bundle files disappear after loading: without the audio encoder the session ends with a message naming
    the missing file; without the TTS, replies degrade to text. No thread is left behind either way."""
    from edge.bundle import Bundle
    from edge.io.speaker import WavSink
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.onnx_session import OrtOptions
    from edge.orchestrator import LiveOptions, Orchestrator, PacedSink
    from edge.streaming import StreamingSession

    audio = _script([("silence", 0.3), ("speech", 1.0), ("silence", 1.0)])
    opts = OmniOptions(llm=LLMOptions.exact(n_ctx=2048, n_threads=1), ort=OrtOptions(intra_op_threads=1))
    for name, gone, fatal in (("no-audio", "audio_encoder*", True), ("no-tts", "tts/*.onnx", False)):
        root = _linked_bundle(golden_bundle.root, tmp_path / name)
        omni = Omni.load(Bundle.load(root), opts)
        baseline = set(threading.enumerate())
        for p in root.glob(gone):
            p.unlink()
        orch = Orchestrator(StreamingSession(omni), mic.FileMicrophone(audio), vad=mic.EnergyVad(),
                            sink=PacedSink(WavSink(), 24000), options=LiveOptions(max_new_tokens=6, seed=0))
        res = orch.run()
        if fatal:
            assert res.end_reason.startswith("error:") and "audio_encoder" in res.end_reason, res.end_reason
        else:
            assert res.end_reason == "microphone ended", res.errors
            assert any("speech synthesis failed" in e for e in res.errors) and not orch.speech_on
            (t,) = res.turns
            assert t.first_audio is None and t.audio_seconds == 0 and t.end is not None
            assert t.tokens == 6 or (1 <= t.tokens < 6 and t.completed)  # text went on (or the model finished)
        _no_leak(baseline)
        omni.close()


def _debug_diff(omni, a, b):  # pragma: no cover - used when the transcript test fails
    inv = {v: k for k, v in omni.special.items()}
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    show = lambda s: [inv.get(t, t) for t in s]  # noqa: E731
    return f"first difference at {i}: cache {show(a[i - 8:i + 8])} vs rules {show(b[i - 8:i + 8])}"


def test_decode_borrows_the_idle_cores_until_the_tts_computes(live, monkeypatch):
    """With lend_cores, a reply decodes on the prefill thread count until the overlapped TTS starts its first step,
    then on its share; the share is restored however the decode ends; a text-only reply is lent throughout."""
    import threading as th

    from edge.events import AudioChunk, TextDelta
    from edge.sampling import SamplingOptions
    from edge.session import SpeechOptions
    from edge.streaming import StreamingSession
    from tests.helpers import never_stop

    omni, tts = live
    never_stop(monkeypatch)
    llm = omni.llm
    calls: list = []
    monkeypatch.setattr(llm, "n_threads_batch", 2)
    monkeypatch.setattr(llm, "set_threads", lambda n, n_batch=None: calls.append(n))
    sess = StreamingSession(omni, tts=tts)
    sess.streaming_prefill("lend", [{"role": "user", "content": ["Hello there."]}])

    def run(speech, cancel_after=None):
        calls.clear()
        cancel = th.Event()
        kinds = []
        for ev in sess.reply(SamplingOptions(seed=0), max_new_tokens=30, speech=speech, lend_cores=True,
                             cancel=cancel):
            kinds.append(type(ev).__name__)
            if cancel_after is not None and isinstance(ev, TextDelta) and kinds.count("TextDelta") >= cancel_after:
                cancel.set()
        sess.streaming_prefill("lend", [{"role": "user", "content": ["And?"]}])
        return kinds

    kinds = run(SpeechOptions(mode="overlap"))
    assert calls == [2, 1] and AudioChunk.__name__ in kinds  # lent, then given back when the TTS computed
    run(SpeechOptions(mode="overlap"), cancel_after=2)  # interrupted before the TTS starts: still given back
    assert calls == [2, 1]
    run(None)
    assert calls == [2, 1]  # text only: lent for the whole reply
    monkeypatch.setattr(llm, "n_threads_batch", 1)
    run(None)
    assert calls == []  # nothing to lend


def test_speech_that_ends_early_does_not_stall_the_reply(live, monkeypatch):
    """The TTS ends its speech (EOS) after 3 frames while the LLM goes on: the decode thread must not block on
    the full piece queue; the reply's whole text is decoded and the session ends on its own."""
    from edge.session import LLM_PIECE_TOKENS as LLM_CHUNK_TOKENS
    from edge.session import PIECE_QUEUE
    from tests.helpers import end_speech_after, never_stop

    omni, tts = live
    baseline = set(threading.enumerate())
    sampled = end_speech_after(monkeypatch, tts, frames=3)
    never_stop(monkeypatch)
    audio = _script([("silence", 0.3), ("speech", 1.0), ("silence", 2.0)])
    orch = _orchestrator(omni, tts, audio, barge_in=False, max_new_tokens=60, seed=6)
    done: list = []
    runner = threading.Thread(target=lambda: done.append(orch.run()), daemon=True)
    runner.start()
    runner.join(120)
    if runner.is_alive():
        orch.stop()
        runner.join(10)
        raise AssertionError("the session stalled after the speech ended early")
    res = done[0]
    assert len(sampled) == 4 and res.end_reason == "microphone ended"
    assert len(res.turns) == 1 and not res.turns[0].interrupted
    turn = res.turns[0]
    # all 60 tokens: more than the piece queue between decode and TTS holds
    assert turn.tokens == 60 > PIECE_QUEUE * LLM_CHUNK_TOKENS, turn
    replies = [it for it in res.log.items if it[0] == "reply"]
    assert turn.text == omni.llm.detokenize(list(replies[-1][1])) and turn.tokens == len(replies[-1][1])
    _no_leak(baseline)


def test_slow_camera_units_start_at_a_lower_frame_rate(live, tmp_path, monkeypatch):
    """When the warm-up says a camera unit costs far more than its second (a 2-core box), the session starts
    with one frame every few units instead of learning that from units that already made it late."""
    import dataclasses

    import soundfile as sf

    from edge.io.camera import Camera, CameraOptions
    from edge.streaming import StreamingSession

    real = StreamingSession.warm_up_encoders
    timings: list = []

    def slow_vision(self, *, vision):
        t = real(self, vision=vision)
        timings.append(t)
        return dataclasses.replace(t, image_seconds=3.0)  # + 64 rows at the measured prefill rate

    monkeypatch.setattr(StreamingSession, "warm_up_encoders", slow_vision)
    omni, tts = live
    wav = tmp_path / "mic.wav"
    sf.write(wav, _script([("silence", 0.3), ("speech", 2.2), ("silence", 1.5)]), SR, subtype="FLOAT")
    orch = _orchestrator(omni, tts, wav, camera=Camera(CameraOptions(str(_video(tmp_path / "cam.avi", 6.0)))),
                         speech=False)
    res = orch.run()
    assert timings[0].image_tokens == 64 and timings[0].audio_tokens == 25  # golden query_num; 1 s of audio
    assert res.end_reason == "microphone ended" and len(res.turns) == 1
    assert orch.governor.changes[0].startswith("a camera unit needs ~3.")
    assert "starts at 0.25 fps" in orch.governor.changes[0]
    kinds = [it[1] for it in res.log.items if it[0] == "prefill"][1:]
    assert kinds[0] == ["unit", "image", "audio"] and kinds[1] == ["audio"], kinds  # stride 4 from the first unit
    # the real (tiny-model) units are fast: the governor's measurements raise the rate again
    assert any("raised" in c for c in orch.governor.changes[1:])


def test_paced_sink_counts_stalls_inside_a_reply_only():
    from edge.io.speaker import WavSink
    from edge.orchestrator import PacedSink

    rate = 1000
    sink = PacedSink(WavSink(), rate, speed=1.0)
    sink.push(np.zeros(50, np.float32))  # 50 ms
    time.sleep(0.15)  # the next chunk comes ~100 ms after the first finished playing: a stall
    sink.push(np.zeros(50, np.float32))
    assert sink.gaps == 1 and 0.08 < sink.gap_seconds < 2.0  # (loose above: a busy host oversleeps)
    sink.flush()  # reply complete
    time.sleep(0.1)
    sink.push(np.zeros(50, np.float32))  # the next reply's first chunk: not a stall
    sink.push(np.zeros(50, np.float32))  # queued behind it: not a stall either
    assert sink.gaps == 1
    sink.close()
