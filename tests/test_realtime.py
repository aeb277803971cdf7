"""WS /v1/realtime on the golden tiny bundle: a socket is a streaming session (units prefilled as they arrive).

Ground truths: the official streaming prompt rules (`edge.streaming.expected_prompt_text`, checked against the
literal strings in tests/test_streaming.py) rendered with placeholder lengths from the spec formulas and tokenized
here, which the LLM's KV cache must hold token for token; the encoder call counts (each unit encoded once, never
again); plain StreamingSession runs on the same model (replies, speech samples) that the socket must reproduce, also
when an HTTP request or another socket used the model in between or the first message was rewritten.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from edge.streaming_rules import expected_prompt_text  # noqa: E402

SERVER_MAX_TOKENS = 4000  # long enough that a reply is still running when the test interrupts it
N_CTX = 4096
LONG = 3000  # max_tokens of a reply that the test interrupts
QUERY_NUM = 64  # golden config.json query_num: image tokens of one unsliced frame
RATE = 16000
CLIP_SAMPLES = 24000  # a 1.5-s reference voice
REPLY = "\x00{}\x00"  # marks reply k in the expected prompt text (the reply's token ids go there)


# --- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(golden_bundle):
    from edge.llm import LLMOptions
    from edge.omni import Omni, OmniOptions
    from edge.onnx_session import OrtOptions
    from edge.server.engine import Engine
    from edge.server.settings import ServerSettings

    settings = ServerSettings(bundle=str(golden_bundle.root), max_tokens=SERVER_MAX_TOKENS, n_ctx=N_CTX)
    # one thread each: on a busy 2-core box spinning thread pools slow the tiny model down 10-100x
    omni = Omni.load(golden_bundle, OmniOptions(llm=LLMOptions.exact(n_ctx=N_CTX, n_threads=1),
                                                ort=OrtOptions(intra_op_threads=1)))
    eng = Engine(omni, settings)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from edge.server.app import create_app

    with TestClient(create_app(engine.settings, engine)) as c:
        yield c


@pytest.fixture
def sessions(monkeypatch):
    """The LiveSession of every socket opened in the test (to read its log and counters)."""
    from edge.server import realtime
    from edge.server.live_session import LiveSession

    made = []

    class Recorded(LiveSession):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(realtime, "LiveSession", Recorded)
    return made


@pytest.fixture(scope="module")
def frame(golden_dir, engine):
    """A camera frame as sent (PNG bytes) and as the server decodes it."""
    from edge.server.media import MediaDecoder

    raw = (golden_dir / "inputs" / "img0.png").read_bytes()
    return raw, MediaDecoder(engine.settings).image(raw, "image")


def _waves(n: int) -> list[np.ndarray]:
    """1-s units as the server receives them (16-bit PCM): tones with a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(RATE) / RATE
    out = []
    for k in range(n):
        w = 0.3 * np.sin(2 * np.pi * (200 + 90 * k) * t) + 0.05 * rng.standard_normal(RATE)
        out.append((np.round(np.clip(w, -1, 1) * 32767) / 32768.0).astype(np.float32))
    return out


# --- expected tokens ----------------------------------------------------------------------------------------------
def _audio_tokens(n_samples: int) -> int:
    """Spec §2.3: placeholder tokens of up to 1 s of audio, ((ceil(n/160) - 1)//2 + 1 - 2)//2 + 1."""
    frames = -(-n_samples // 160)
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


AUD = "<|audio_start|>" + "<unk>" * _audio_tokens(RATE) + "<|audio_end|>"
IMG = "<image>" + "<unk>" * QUERY_NUM + "</image>"
UNIT_IMG_AUD = "<unit>" + IMG + AUD  # a unit with its frame (web demo layout); without a frame: AUD only


def _expected_ids(omni, events: list, replies: list) -> list[int]:
    """Token ids of the rule-built prompt text, tokenized as the official processor does one prompt string (special
    tokens parsed, plain runs merged; `<unit>` is plain text in the golden vocab), reply k's ids spliced in."""
    sp = omni.special
    split = re.compile("(" + "|".join(re.escape(n) for n in sorted(sp, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for i, part in enumerate(expected_prompt_text(events).split("\x00")):
        if i % 2:
            ids += list(replies[int(part)])
            continue
        plain = ""
        for c in split.split(part):
            if c in sp:
                ids += omni.llm.tokenize(plain) if plain else []
                ids.append(sp[c])
                plain = ""
            else:
                plain += c
        ids += omni.llm.tokenize(plain) if plain else []
    return ids


def _wav_data_url(wave: np.ndarray) -> str:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def _cache_ids(omni) -> list[int]:
    unk = omni.special["<unk>"]
    return [unk if k is None else k for k in omni.llm.cached_tokens()]


# --- socket helpers -----------------------------------------------------------------------------------------------
class Socket:
    def __init__(self, ws):
        self.ws = ws
        assert self.recv()["type"] == "session.created"

    def recv(self) -> dict:
        return json.loads(self.ws.receive_text())

    def send(self, **msg) -> None:
        self.ws.send_text(json.dumps(msg))

    def update(self, **session) -> dict:
        self.send(type="session.update", session=session)
        return self.until("session.updated")[-1]  # (a reply in progress may stream in between)

    def unit(self, wave: np.ndarray, frame: bytes | None = None) -> dict:
        pcm = (np.round(wave * 32768.0)).astype("<i2").tobytes()
        self.send(type="input.audio", audio=base64.b64encode(pcm).decode(),
                  **({"image": base64.b64encode(frame).decode()} if frame else {}))
        return self.until("input.received")[-1]

    def until(self, kind: str, rid: str | None = None) -> list[dict]:
        out = [self.recv()]
        while not (out[-1]["type"] == kind and (rid is None or out[-1].get("response_id") == rid)):
            assert out[-1]["type"] != "error", out[-1]
            out.append(self.recv())
        return out

    def commit(self) -> tuple[dict, str, bytes]:
        """A whole reply: (response.done, text of the deltas, pcm16 of the audio deltas). `self.before` keeps what
        came before its response.created (e.g. the end of the reply it interrupted)."""
        self.send(type="input.commit")
        self.before = self.until("response.created")
        rid = self.before.pop()["response_id"]
        msgs = [m for m in self.until("response.done", rid) if m.get("response_id") == rid]
        done = msgs[-1]
        text = "".join(m["delta"] for m in msgs if m["type"] == "response.text.delta")
        audio = [m for m in msgs if m["type"] == "response.audio.delta"]
        assert [m["seq"] for m in audio] == list(range(len(audio)))
        assert done["text"] == text
        return done, text, b"".join(base64.b64decode(m["audio"]) for m in audio)


def _wait(pred, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _replies(live) -> list[tuple]:
    return [e.tokens for e in live.entries if e.kind == "reply"]


class _Other:
    """Another user of the model."""


# --- tests --------------------------------------------------------------------------------------------------------
def test_scripted_session_barge_in_and_official_rules(client, engine, sessions, frame):
    """Turns of units (with and without frames), a spoken reply, a barge-in (response.cancel mid-reply), a reply
    that completes, a unit sent during a reply and a commit that interrupts it: the KV cache equals the official
    rules token for token, every unit was encoded exactly once, and the spoken first reply equals a plain
    StreamingSession run (text and speech samples)."""
    from edge.events import AudioChunk, TextDelta
    from edge.sampling import SamplingOptions
    from edge.server.chat import pcm16
    from edge.session import SpeechOptions
    from edge.streaming import StreamingSession
    from edge.voice import OMNI_INSTRUCTIONS as DEFAULT_SYSTEM_PROMPT

    png, image = frame
    w = _waves(5)
    ev = [("prefill", "s", "user", DEFAULT_SYSTEM_PROMPT)]
    with client.websocket_connect("/v1/realtime") as raw:
        ws = Socket(raw)
        ws.update(seed=5, max_tokens=6)  # speech on: the bundle has a TTS
        assert ws.unit(w[0], png)["frames"] == 1 and ws.unit(w[1])["units"] == 2
        ev += [("prefill", "s", "user", UNIT_IMG_AUD), ("prefill", "s", "user", AUD)]
        done1, text1, speech1 = ws.commit()
        assert done1["status"] == "completed" and done1["usage"]["completion_tokens"] == 6 and speech1
        assert (done1["usage"]["image_tokens"], done1["usage"]["audio_tokens"]) == (QUERY_NUM, 2 * _audio_tokens(RATE))
        ev += [("generate", REPLY.format(0), False)]  # cut by max_tokens: officially not completed
        (live,) = sessions
        terminators = live.stream.terminator_ids
        live.stream.terminator_ids = []  # random weights may sample `<|im_end|>`: the replies below must run on

        # barge-in: cancel a long reply as soon as it speaks
        ws.update(output_audio=False, max_tokens=LONG)
        ws.unit(w[2], png)
        ev += [("prefill", "s", "user", UNIT_IMG_AUD)]
        ws.send(type="input.commit")
        rid = ws.until("response.text.delta")[-1]["response_id"]
        ws.send(type="response.cancel")
        assert ws.until("response.done", rid)[-1]["status"] == "interrupted"
        ev += [("generate", REPLY.format(1), False)]

        # a completed reply: every token declared a terminator, so the first sampled one ends it (empty reply)
        ws.send(type="input.text", text="and now?")
        assert ws.recv()["texts"] == 1
        ev += [("prefill", "s", "user", "and now?")]
        _wait(lambda: len(_replies(live)) == 2)  # the cancelled reply's thread has stopped
        live.stream.terminator_ids = list(range(engine.omni.llm.n_vocab))
        done3, text3, _ = ws.commit()
        live.stream.terminator_ids = []
        assert done3["status"] == "completed" and text3 == "" and done3["usage"]["completion_tokens"] == 0
        ev += [("generate", REPLY.format(2), True)]

        # a unit sent during a reply waits for it; the next commit interrupts the reply
        ws.unit(w[3])
        ev += [("prefill", "s", "user", AUD)]
        ws.send(type="input.commit")
        rid = ws.until("response.text.delta")[-1]["response_id"]
        ws.unit(w[4])
        ws.update(max_tokens=6)
        done5, _, _ = ws.commit()
        assert [m["status"] for m in ws.before if m["type"] == "response.done"] == ["interrupted"]
        assert ws.before[-1]["response_id"] == rid and done5["status"] == "completed"
        ev += [("generate", REPLY.format(3), False), ("prefill", "s", "user", AUD),
               ("generate", REPLY.format(4), False)]

        live.stream.terminator_ids = terminators
        replies = _replies(live)
        assert len(replies[1]) < LONG and len(replies[3]) < LONG
        assert [e.completed for e in live.entries if e.kind == "reply"] == [False, False, True, False, False]
        assert len(replies[0]) == 6 and len(replies[2]) == 0 and len(replies[4]) == 6
        assert _cache_ids(engine.omni) == _expected_ids(engine.omni, ev, replies)
        assert live.stream.encoder_calls == {"image": 2, "audio_step": 5, "audio_whole": 0}
        assert live.rebuilds == 0
        u = done5["usage"]
        assert (u["image_tokens"], u["audio_tokens"]) == (2 * QUERY_NUM, 5 * _audio_tokens(RATE))
        assert u["prompt_tokens"] + u["completion_tokens"] == engine.omni.llm.n_past

    _wait(lambda: not [t for t in threading.enumerate() if t.name.startswith("edge-live")])  # none left behind

    # the first reply, replayed on a plain streaming session with the same inputs and seeds
    sess = StreamingSession(engine.omni)
    for content in ([DEFAULT_SYSTEM_PROMPT], ["<unit>", image, w[0]], [w[1]]):
        sess.streaming_prefill("ref", [{"role": "user", "content": content}])
    events = list(sess.reply(SamplingOptions(seed=5), max_new_tokens=6, speech=SpeechOptions(seed=5)))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
    assert events[-1].tokens == replies[0] and text == text1
    assert pcm16(np.concatenate(chunks)) == speech1


def test_http_request_and_second_socket_in_between(client, engine, sessions, frame):
    """Another socket's turn and an HTTP request use the model between two units of a session: the session rebuilds
    its KV cache once, from kept embeddings (no unit encoded again), and replies exactly as without them."""
    png, _ = frame
    w = _waves(4)

    def first_units(ws, live_index):
        ws.update(temperature=0, max_tokens=8, output_audio=False)
        ws.unit(w[0], png)
        ws.unit(w[1])
        _wait(lambda: len(sessions) > live_index and len(sessions[live_index].entries) == 3)  # open + 2 units

    with client.websocket_connect("/v1/realtime") as raw:  # the reference: nothing in between
        ws = Socket(raw)
        first_units(ws, 0)
        ws.unit(w[2])
        solo, solo_text, _ = ws.commit()
    with client.websocket_connect("/v1/realtime") as raw_a, client.websocket_connect("/v1/realtime") as raw_b:
        a, b = Socket(raw_a), Socket(raw_b)
        first_units(a, 1)
        b.update(max_tokens=5, output_audio=False)
        b.unit(w[3])
        assert b.commit()[0]["status"] == "completed"
        r = client.post("/v1/chat/completions", json={"model": engine.settings.model_name, "max_tokens": 4,
                                                      "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        a.unit(w[2])
        done, text, _ = a.commit()
        live = sessions[1]
        assert live.rebuilds == 1
        assert live.stream.encoder_calls == {"image": 1, "audio_step": 3, "audio_whole": 0}
        assert text == solo_text and _replies(live) == _replies(sessions[0])
        assert done["usage"] == solo["usage"]
        from edge.voice import OMNI_INSTRUCTIONS as DEFAULT_SYSTEM_PROMPT

        ev = [("prefill", "s", "user", DEFAULT_SYSTEM_PROMPT), ("prefill", "s", "user", UNIT_IMG_AUD),
              ("prefill", "s", "user", AUD), ("prefill", "s", "user", AUD), ("generate", REPLY.format(0), False)]
        assert _cache_ids(engine.omni) == _expected_ids(engine.omni, ev, _replies(live))


def test_clear_instructions_reset_and_cancel_before_start(client, engine, sessions, frame):
    """input.clear rewinds the open turn; new instructions rewrite the first message with the conversation
    re-prefilled behind it (the reply equals a fresh session's); a reply cancelled while the model is busy ends at
    once and leaves the turn open; session.reset starts over, with a cloned voice in the official cloning prompt."""
    from edge.sampling import SamplingOptions
    from edge.streaming import StreamingSession
    from edge.streaming_rules import finish_generate, plan_generate

    png, _ = frame
    w = _waves(5)
    brief = "Answer briefly."
    with client.websocket_connect("/v1/realtime") as raw:
        ws = Socket(raw)
        ws.update(temperature=0, max_tokens=4, output_audio=False)
        ws.unit(w[0])
        ws.commit()
        (live,) = sessions
        ws.unit(w[1], png)
        ws.unit(w[2])
        _wait(lambda: len(live.entries) == 5)
        ws.send(type="input.clear")
        assert ws.recv()["type"] == "input.cleared"
        ws.update(instructions=brief)
        ws.unit(w[3])
        done, _, _ = ws.commit()
        assert (done["usage"]["image_tokens"], done["usage"]["audio_tokens"]) == (0, 2 * _audio_tokens(RATE))
        r0, r1 = _replies(live)
        ev = [("prefill", "s", "user", brief), ("prefill", "s", "user", AUD), ("generate", REPLY.format(0), False),
              ("prefill", "s", "user", AUD), ("generate", REPLY.format(1), False)]
        assert _cache_ids(engine.omni) == _expected_ids(engine.omni, ev, [r0, r1])
        assert live.stream.encoder_calls == {"image": 1, "audio_step": 4, "audio_whole": 0}

        # the model is busy (held here): a commit waits, its cancel ends it at once, the turn stays open
        with engine.runtime.llm_lock:
            engine.runtime.kv_owner = _Other()
            ws.send(type="input.text", text="wait")
            ws.recv()
            ws.send(type="input.commit")
            rid = ws.recv()["response_id"]
            ws.send(type="response.cancel")
            done = ws.recv()
            assert (done["type"], done["response_id"], done["status"]) == ("response.done", rid, "interrupted")
        ws.send(type="input.text", text="lorem ipsum dolor " * 2000)  # more than the context: an error, no change
        assert ws.recv()["type"] == "input.received"
        err = ws.recv()["error"]
        assert err["code"] == "context_length_exceeded" and "session.reset" in err["message"], err
        ws.unit(w[4])
        ws.commit()
        r2 = _replies(live)[2]
        ev += [("prefill", "s", "user", "wait"), ("prefill", "s", "user", AUD), ("generate", REPLY.format(2), False)]
        assert _cache_ids(engine.omni) == _expected_ids(engine.omni, ev, [r0, r1, r2])
        assert live.rebuilds == 1  # after the model was held by someone else

        # a new session, with a cloned voice: the official cloning prompt opens it, the clip encoded once, whole
        ws.send(type="session.reset")
        assert ws.recv()["type"] == "session.reset"
        ws.update(voice=_wav_data_url(np.concatenate(w[:2])[:CLIP_SAMPLES]))
        ws.send(type="input.text", text="fresh start")
        ws.recv()
        done, _, _ = ws.commit()
        clip = _audio_tokens(CLIP_SAMPLES)
        assert (done["usage"]["audio_tokens"], done["usage"]["image_tokens"]) == (clip, 0)
        per_second = _audio_tokens(RATE)  # the clip's placeholder: one start/end pair per second (spec §2.3)
        clip_ph = "".join("<|audio_start|>" + "<unk>" * k + "<|audio_end|>"
                          for k in [per_second] * (clip // per_second) + [clip % per_second] if k)
        opening = (f"{brief} Clone the voice in the provided audio prompt.{clip_ph}As an assistant, you will speak "
                   "using this voice style.")
        ev = [("prefill", "t", "user", opening), ("prefill", "t", "user", "fresh start"),
              ("generate", REPLY.format(0), False)]
        assert _cache_ids(engine.omni) == _expected_ids(engine.omni, ev, _replies(live)[-1:])
        assert live.stream.encoder_calls == {"image": 1, "audio_step": 5, "audio_whole": 1}

    # the rewritten session's second reply equals a fresh session's with the same first reply
    sess = StreamingSession(engine.omni)
    for content in ([brief], [w[0]]):
        sess.streaming_prefill("ref", [{"role": "user", "content": content}])
    sess.session.extend([sess.generation_prompt().ids, list(r0)])  # the first reply, as the socket had it
    sess.rules = finish_generate(plan_generate(sess.rules)[0], False)
    sess.audio_stream.reset()  # as generating the reply does (official Whisper cache rule)
    sess.streaming_prefill("ref", [{"role": "user", "content": [w[3]]}])
    greedy = SamplingOptions(temperature=0.0, greedy=True)
    assert list(sess.reply(greedy, max_new_tokens=4))[-1].tokens == r1


def test_spoken_request_whose_speech_ends_early_keeps_its_text(engine, monkeypatch):
    """An HTTP-style spoken job (streamed speech) whose TTS ends after 3 frames: the text deltas are the same
    whole reply as with speech that runs to the end, and text still arrives after the last audio."""
    from edge.sampling import SamplingOptions
    from edge.server.engine import AudioChunk, Job, TextDelta
    from tests.helpers import end_speech_after, never_stop

    never_stop(monkeypatch)

    def run() -> tuple[list, object]:
        events: list = []
        job = Job(messages=[{"role": "user", "content": "Tell me more."}], sampling=SamplingOptions(seed=7),
                  max_new_tokens=40, speak=True, stream_audio=True, tts_seed=3)
        return events, engine.run_sync(job, events.append)

    full_events, full = run()
    sampled = end_speech_after(monkeypatch, engine.omni.tts, frames=3)
    events, short = run()
    assert len(sampled) == 4 and short.completion_tokens == full.completion_tokens == 40
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == short.text == full.text == "".join(e.text for e in full_events if isinstance(e, TextDelta))
    last_audio = max(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert any(isinstance(e, TextDelta) and e.text for e in events[last_audio + 1:])
