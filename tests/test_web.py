"""The web demo (`GET /` of `minicpmo-edge serve`) in a real headless Chromium with fake media devices.

Chromium is Debian's (`apt-get install chromium`), driven by Python Playwright with `executable_path` (Playwright's
own browser download is never used). The fake microphone plays a WAV made here: a 440 Hz tone burst, then silence,
looped by Chromium. The fake camera is Chromium's generated 640x480 video.

Ground truths, not shapes: the tone the fake microphone plays (the server must receive 440 Hz for the right
length, which only holds if the page resampled to 16 kHz correctly), the engine's own output recorded inside the
server (the page must show exactly that text and receive/schedule exactly those pcm16 samples), the wire messages
the page sends (seen by Playwright), the Web Audio clock (chunks scheduled back to back, playback that runs and that
a barge-in stops), and each failure's message on the page.

Skips with the reason when Chromium or Playwright is missing; with EDGE_REQUIRE_BROWSER=1 (CI) that is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[1]
REQUIRE_BROWSER_ENV = "EDGE_REQUIRE_BROWSER"
SCREENSHOT_ENV = "EDGE_WEB_SCREENSHOT"  # where to copy the screenshot taken after a live turn
CHROMIUM = os.environ.get("EDGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _browser_or_skip():
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "Python Playwright is not installed (pip install playwright; its driver ships in the wheel)"
    if problem is None and not Path(CHROMIUM).is_file():
        problem = (f"Chromium not found at {CHROMIUM} (Debian/Ubuntu: sudo apt-get install chromium; or set "
                   "EDGE_CHROMIUM to a Chromium/Chrome binary)")
    if problem:
        if os.environ.get(REQUIRE_BROWSER_ENV):
            pytest.fail(f"{problem}; {REQUIRE_BROWSER_ENV} is set, so this is an error")
        pytest.skip(problem)


# The flags that work on this kind of machine (root, no display, closed network), plus fake media devices.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--use-fake-device-for-media-stream"]
MODEL = "minicpm-o-2_6"
MAX_TOKENS = 3000  # the server's limit: the "hog" request below asks for this many tokens
PAGE_MAX_TOKENS = 48  # what the page asks for per reply (Options panel): keeps replies short
HOG_TOKENS = MAX_TOKENS  # a text request that holds the server's only slot for many seconds
TONE_HZ = 440.0
TONE_S = 1.2  # tone burst, then ...
GAP_S = 2.3  # ... silence: one loop of the fake microphone is 3.5 s
WAV_RATE = 48000
FAKE_CAMERA = (640, 480)  # Chromium's fake camera at the page's requested size
UNIT_BYTES = 32000  # one realtime unit: 1 s of 16 kHz pcm16
TTS_RATE = 24000
# Seeds whose reply to STORY (fresh session, PAGE_MAX_TOKENS) speaks for 8-11 s on the golden bundle; the test
# takes the first whose remaining speech outlasts a loop of the microphone, so a barge-in lands in it.
STORY = "Tell me a story."
STORY_SEEDS = (1, 9, 4, 5, 3)
BARGE_IN_WINDOW_S = TONE_S + GAP_S + 1.0  # the next burst starts within one loop; +1 s for detection and polling
WAIT_MS = 30_000


# --- helpers: a server on a given engine, a TCP proxy that can drop connections -----------------------------------
class Recorder:
    """Wraps `engine.run`: keeps each job and what the engine produced (text, pcm16 bytes) for the assertions."""

    def __init__(self, engine):
        from edge.server import chat as chatlib
        from edge.server.engine import AudioChunk, TextDelta

        self.runs: list[dict] = []
        inner = engine.run

        def run(job):
            entry = {"job": job, "text": [], "pcm": []}
            self.runs.append(entry)

            async def events():
                it = inner(job)
                try:
                    async for ev in it:
                        if isinstance(ev, TextDelta):
                            entry["text"].append(ev.text)
                        elif isinstance(ev, AudioChunk):
                            entry["pcm"].append(chatlib.pcm16(ev.pcm))
                        yield ev
                finally:
                    await it.aclose()

            return events()

        engine.run = run


class Server:
    """uvicorn in a thread, serving create_app(settings, engine) on a free port."""

    def __init__(self, settings, engine):
        import uvicorn

        from edge.server.app import create_app

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(settings.replace(port=self.port), engine), host="127.0.0.1",
                                port=self.port, log_level="warning", ws_max_size=2**24)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "the test server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


class Proxy:
    """TCP forwarder in front of the server. drop(): reset every connection (the browser sees an abrupt close);
    pause(): also stop listening (connection refused: the server is gone); resume(): listen again, same port."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener = None
        self.resume()

    def resume(self):
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.port = ls.getsockname()[1]
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls):
        while self.listener is ls:
            if not select.select([ls], [], [], 0.05)[0]:
                continue
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:  # shutdown wakes the pump blocked in recv (close alone would not); linger 0: then RST
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pause(self):
        ls, self.listener = self.listener, None
        ls.close()
        self.drop()


def make_tone_wav(path: Path) -> Path:
    import soundfile as sf

    t = np.arange(int(TONE_S * WAV_RATE)) / WAV_RATE
    tone = 0.5 * np.sin(2 * np.pi * TONE_HZ * t)
    ramp = int(0.02 * WAV_RATE)  # 20-ms fades: no clicks at the edges of the burst
    tone[:ramp] *= np.linspace(0, 1, ramp)
    tone[-ramp:] *= np.linspace(1, 0, ramp)
    sf.write(path, np.concatenate([tone, np.zeros(int(GAP_S * WAV_RATE))]).astype(np.float32), WAV_RATE,
             subtype="PCM_16")
    return path


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium_ok():
    """Session scope, so that pytest checks it before building the (session-scoped) golden bundle."""
    _browser_or_skip()


@pytest.fixture(scope="module")
def browser(chromium_ok, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    wav = make_tone_wav(tmp_path_factory.mktemp("web-media") / "tone.wav")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=CHROMIUM_FLAGS + [f"--use-file-for-fake-audio-capture={wav}"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def stack(golden_bundle):
    """One engine (with a recorder), one server with a single slot, and a proxy in front of it."""
    from edge.server.engine import Engine
    from edge.server.settings import ServerSettings

    settings = ServerSettings(bundle=str(golden_bundle.root), concurrency=1, max_queue=8, max_tokens=MAX_TOKENS)
    engine = Engine.load(settings, progress=False)
    recorder = Recorder(engine)
    server = Server(settings, engine)
    proxy = Proxy(server.port)
    yield {"engine": engine, "recorder": recorder, "server": server, "proxy": proxy,
           "url": f"http://127.0.0.1:{proxy.port}/"}
    proxy.pause()
    server.stop()
    engine.close()


class Page:
    """A page of the demo plus what it sent on its sockets (each message's `type`, and input.audio details)."""

    def __init__(self, browser, url, permissions=("camera", "microphone")):
        self.context = browser.new_context(permissions=list(permissions), viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.sent: list[dict] = []
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.page.on("websocket", self._ws)
        self.page.goto(url)

    def _ws(self, ws):
        def sent(payload):
            msg = json.loads(payload)
            info = {"type": msg.get("type")}
            if msg.get("type") == "input.audio":
                info.update(audio_bytes=len(base64.b64decode(msg["audio"])), image=bool(msg.get("image")))
            self.sent.append(info)

        ws.on("framesent", sent)

    def types(self, start=0) -> list[str]:
        return [m["type"] for m in self.sent[start:]]

    def stats(self) -> dict:
        return self.page.evaluate("() => JSON.parse(JSON.stringify(window.edgeDemo.stats))")

    def wait(self, js: str, timeout=WAIT_MS, what=""):
        try:
            self.page.wait_for_function(js, timeout=timeout, polling=50)
        except Exception as e:
            raise AssertionError(f"timed out waiting for {what or js}; stats={self.stats()}; "
                                 f"alerts={self.alert_codes()}; console={self.console[-10:]}") from e

    def alert(self, code: str) -> str:
        loc = self.page.locator(f'#alerts [data-code="{code}"]')
        return loc.inner_text() if loc.count() else ""

    def alert_codes(self) -> list[str]:
        return self.page.evaluate("() => window.edgeDemo.alerts.map(a => a.code)")

    def set_option(self, sel: str, value: str):
        if not self.page.is_visible(sel):
            self.page.click("#options summary")  # the Options panel starts folded
        self.page.fill(sel, value)
        self.page.dispatch_event(sel, "change")

    def close(self):
        self.context.close()


def connected(page: Page, sessions=1):
    page.wait(f"() => window.edgeDemo && window.edgeDemo.stats.sessions >= {sessions} && "
              "window.edgeDemo.stats.state !== 'offline'", what="the realtime session")


def dominant_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * rate / len(x))


def reply_matches_engine(rec: dict, run: dict):
    """The page shows the engine's text and received exactly the engine's pcm16 samples."""
    text = "".join(run["text"])
    pcm = np.frombuffer(b"".join(run["pcm"]), "<i2").astype(np.int64)
    assert rec["text"] == rec["serverText"] == text
    assert rec["samples"] == len(pcm) and rec["sum"] == int(pcm.sum()) and rec["sumSq"] == int((pcm ** 2).sum())
    return text, pcm


def contiguous(schedule: list[dict], reply: str) -> list[dict]:
    chunks = [c for c in schedule if c["reply"] == reply]
    for a, b in zip(chunks, chunks[1:]):
        assert b["start"] == pytest.approx(a["start"] + a["duration"], abs=1e-9), "a gap between two speech chunks"
    return chunks


def save_screenshot(page: Page, tmp_path: Path) -> Path:
    """Into the test's tmp dir; also to $EDGE_WEB_SCREENSHOT if set (e.g. bench/results/web-demo.png): test runs
    do not write into the checkout by themselves."""
    out = tmp_path / "web-demo.png"
    page.page.screenshot(path=str(out), full_page=True)
    if os.environ.get(SCREENSHOT_ENV):
        dest = Path(os.environ[SCREENSHOT_ENV])
        dest = dest if dest.is_absolute() else REPO / dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dest)
    print(f"screenshot: {out}")
    return out


# --- tests -----------------------------------------------------------------------------------------------------------
def test_static_routes_and_config(stack):
    """The page and its files are served with the right types and a CSP; /web/config tells the page what it needs;
    the API keeps its own 404/405 answers (the demo adds no catch-all route)."""
    base = stack["server"].url
    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script type="module" src="/web/app.js">' in r.text and "http" not in r.text.split("<body>")[0]
    for name in ("app.js", "audio.js", "link.js", "ui.js", "capture-worklet.js"):
        js = httpx.get(f"{base}/web/{name}")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"], name
        assert "https://" not in js.text and "cdn" not in js.text.lower(), f"{name} must not load from the web"
    assert httpx.get(base + "/web/style.css").headers["content-type"].startswith("text/css")
    cfg = httpx.get(base + "/web/config").json()
    assert cfg["model"] == MODEL and cfg["api_key_required"] is False and cfg["random_weights"] is False
    assert cfg["notice"] is None and cfg["speech_output"] is True and cfg["realtime_path"] == "/v1/realtime"
    assert cfg["audio"] == {"input_sample_rate": 16000, "output_sample_rate": TTS_RATE, "unit_seconds": 1.0,
                            "format": "pcm16"}
    assert httpx.get(base + "/web/nope.js").status_code == 404
    assert httpx.get(base + "/v1/chat/completions").status_code == 405
    assert httpx.get(base + "/v1/nope").json()["error"]["code"] == "not_found"


def test_live_turn_then_barge_in(browser, stack, tmp_path):
    """Camera + mic: a spoken turn with frames reaches the server, the reply is shown and played gaplessly; then
    talking over a long spoken reply stops its playback at once."""
    rec_runs = stack["recorder"].runs
    p = Page(browser, stack["url"])
    try:
        connected(p)
        p.set_option("#opt-max-tokens", str(PAGE_MAX_TOKENS))
        n_runs = len(rec_runs)
        p.page.click("#start")
        # -- a live turn: the tone burst is speech; 0.7 s of silence ends it
        p.wait("() => window.edgeDemo.stats.commits >= 1", what="the first spoken turn")
        p.page.click("#mute")  # the next burst must not start another turn yet
        p.wait("() => window.edgeDemo.stats.repliesDone >= 1", what="the reply to the spoken turn")
        s = p.stats()
        audio_msgs = [m for m in p.sent if m["type"] == "input.audio"]
        assert s["unitsSent"] == len(audio_msgs) >= 2 and s["framesSent"] == sum(m["image"] for m in audio_msgs)
        assert all(m["image"] for m in audio_msgs), "every 1-s unit carries its camera frame"
        assert all(m["audio_bytes"] == UNIT_BYTES for m in audio_msgs[:-1])
        assert 0 < audio_msgs[-1]["audio_bytes"] <= UNIT_BYTES
        assert p.types().count("input.commit") == 1
        # the server's acks and the engine's job: the official omni layout, frame then its second of audio
        assert s["audioAcks"] == len(audio_msgs) and s["lastAck"]["units"] == len(audio_msgs)
        assert s["lastAck"]["frames"] == len(audio_msgs)
        run = rec_runs[n_runs]
        assert run["job"].prompt_kwargs.get("omni_input") is True
        content = run["job"].messages[-1]["content"]
        frames, units = content[0::2], content[1::2]
        assert len(frames) == len(units) == len(audio_msgs)
        assert all(f.size == FAKE_CAMERA for f in frames)
        assert np.abs(np.asarray(frames[0], float) - np.asarray(frames[-1], float)).mean() > 1.0, (
            "frames of different seconds must differ (the fake camera animates)")
        heard = np.concatenate(units)
        assert all(len(u) == 16000 for u in units[:-1])
        assert abs(dominant_hz(heard, 16000) - TONE_HZ) < 2.0, "the page must resample the microphone to 16 kHz"
        loud = np.flatnonzero(np.abs(heard) > 0.02)
        # the burst at the right speed (the first few ms may pass while the page connects the microphone)
        assert TONE_S - 0.3 < (loud[-1] - loud[0]) / 16000 < TONE_S + 0.1
        # the reply: text and speech exactly as the engine made them, scheduled back to back, and playing
        rid = s["replyOrder"][0]
        rec = s["replies"][rid]
        text, pcm = reply_matches_engine(rec, run)
        assert rec["status"] == "completed" and len(pcm) > 0 and s["underruns"] == 0
        chunks = contiguous(s["schedule"], rid)
        assert len(chunks) == len(run["pcm"]) == s["audioChunksScheduled"]
        assert sum(c["duration"] for c in chunks) == pytest.approx(len(pcm) / TTS_RATE, abs=1e-6)
        # the DOM may keep edge whitespace of a random reply
        assert p.page.locator(f'li[data-reply="{rid}"] .text').inner_text().strip() == text.strip()
        p.wait("() => window.edgeDemo.stats.audioChunksEnded >= 1", what="the first speech chunk to play out")
        # latency on the page: client-side times include the server's own
        t = rec["timing"]
        assert rec["firstTextMs"] >= t["first_token_ms"] - 1 and rec["firstAudioMs"] >= t["first_audio_ms"] - 1
        meta = p.page.locator(f'li[data-reply="{rid}"] .meta').inner_text()
        assert "first token" in meta and "first audio" in meta and "server:" in meta
        assert p.page.locator("#notice").is_hidden()  # a real (non-random) bundle: no notice

        # -- barge-in: a long spoken reply (seeded, fresh session), then the microphone is unmuted
        p.set_option("#opt-seed", "0")
        chosen = None
        for seed in STORY_SEEDS:
            p.page.click("#reset")
            p.set_option("#opt-seed", str(seed))
            before = p.stats()["repliesDone"]
            p.page.fill("#text", STORY)
            p.page.click("#send")
            p.wait(f"() => window.edgeDemo.stats.repliesDone > {before}", what=f"the story reply (seed {seed})")
            left = p.page.evaluate("() => window.edgeDemo.speechLeft()")
            if left > BARGE_IN_WINDOW_S:
                chosen = seed
                break
        assert chosen is not None, f"no seed in {STORY_SEEDS} gave a reply longer than {BARGE_IN_WINDOW_S} s"
        s = p.stats()
        story = s["replyOrder"][-1]
        assert s["state"] == "speaking"
        reply_matches_engine(s["replies"][story], rec_runs[-1])
        contiguous(s["schedule"], story)
        sent_before = len(p.sent)
        p.page.click("#mute")  # unmute: the next tone burst talks over the assistant
        p.wait("() => window.edgeDemo.stats.bargeIns >= 1", timeout=int(BARGE_IN_WINDOW_S * 1000) + 5000,
               what="the barge-in")
        s2 = p.stats()
        assert s2["sourcesStopped"] > 0 and s2["droppedSpeechSeconds"] > 0.5
        assert s2["state"] in ("hearing", "thinking"), "speech playback must stop at the barge-in"
        # the reply was complete before the barge-in, so there was nothing to cancel on the server
        assert "response.cancel" not in p.types(sent_before)
        assert p.page.locator(f'li[data-reply="{story}"]').get_attribute("data-status") == "interrupted"
        assert "not played" in p.page.locator(f'li[data-reply="{story}"] .meta').inner_text()
        # the speech that barged in is the next turn, answered as usual
        p.wait(f"() => window.edgeDemo.stats.commits >= {s['commits'] + 1}", what="the barge-in turn")
        p.page.click("#mute")
        p.wait(f"() => window.edgeDemo.stats.repliesDone >= {s['repliesDone'] + 1}", what="the barge-in reply")
        assert p.stats()["audioChunksScheduled"] > s["audioChunksScheduled"]
        save_screenshot(p, tmp_path)
        assert not [c for c in p.console if c.startswith("pageerror") or "Content Security Policy" in c], p.console
    finally:
        p.close()



class Hog:
    """Other clients holding the server's only slot: `n` long text requests (the first runs, the rest queue ahead
    of anything the page sends), released by stop()."""

    def __init__(self, url: str, n: int = 3):
        self.url, self.stop_event, self.threads = url, threading.Event(), []
        for _ in range(n):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self.threads.append(t)
            time.sleep(0.1)  # in order: FIFO admission
        deadline = time.time() + 30
        while True:
            h = httpx.get(url + "/health").json()
            if h["running"] == 1 and h["queued"] == n - 1:
                break
            assert time.time() < deadline, f"the hog requests did not all start: {h}"
            time.sleep(0.05)

    def _run(self):
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": HOG_TOKENS,
                "min_tokens": HOG_TOKENS, "stream": True}
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                for _ in r.iter_lines():
                    if self.stop_event.is_set():
                        break
        except httpx.HTTPError:
            pass

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


def test_barge_in_while_thinking_socket_drop_and_server_gone(browser, stack):
    """With the server's slot held by other clients, a typed turn waits ("thinking"): talking over it sends
    response.cancel and the server confirms "interrupted". A connection reset in the middle of a reply says the
    reply was lost and the page reconnects; with the server gone the page says so, and recovers when it is back."""
    p = Page(browser, stack["url"])
    proxy, server = stack["proxy"], stack["server"]
    hog = None
    try:
        connected(p)
        p.set_option("#opt-max-tokens", str(PAGE_MAX_TOKENS))
        p.page.click("#start")
        p.page.click("#mute")
        hog = Hog(server.url)
        p.page.fill("#text", "Are you there?")
        p.page.click("#send")
        p.wait("() => window.edgeDemo.stats.replyOrder.length >= 1 && window.edgeDemo.stats.state === 'thinking'",
               what="the typed turn to wait for the busy server")
        typed = p.stats()["replyOrder"][0]
        sent_before = len(p.sent)
        p.page.click("#mute")  # unmute: the next tone burst talks over the thinking assistant
        p.wait("() => window.edgeDemo.stats.interruptedReplies >= 1", timeout=int(BARGE_IN_WINDOW_S * 1000) + 5000,
               what="the server to confirm the interruption")
        s = p.stats()
        assert s["bargeIns"] == 1 and s["cancelsSent"] == 1 and "response.cancel" in p.types(sent_before)
        assert s["replies"][typed]["status"] == "interrupted" and s["replies"][typed]["text"] == ""
        assert p.page.locator(f'li[data-reply="{typed}"]').get_attribute("data-status") == "interrupted"
        # the speech that barged in is a turn of its own, again waiting for the busy server
        p.wait("() => window.edgeDemo.stats.commits >= 2 && window.edgeDemo.stats.replyOrder.length >= 2",
               what="the barge-in turn")
        p.page.click("#mute")
        waiting = p.stats()["replyOrder"][1]
        assert p.stats()["state"] == "thinking"

        # -- the connection resets in the middle of that reply
        proxy.drop()
        p.wait("() => !!document.querySelector('#alerts [data-code=\"socket-dropped\"]')", what="the drop message")
        assert "dropped in the middle of a reply" in p.alert("socket-dropped")
        assert "1006" in p.alert("socket-dropped")  # an abnormal closure, not a server's close
        assert p.page.locator(f'li[data-reply="{waiting}"]').get_attribute("data-status") == "dropped"
        p.wait("() => window.edgeDemo.stats.reconnects >= 1 && window.edgeDemo.stats.state !== 'offline'",
               what="the reconnection")
        assert "new session" in p.alert("reconnected") and p.stats()["sessions"] == 2
        hog.stop()
        hog = None

        # -- the server goes away
        proxy.pause()
        p.wait("() => !!document.querySelector('#alerts [data-code=\"server-gone\"]')", what="the server-gone message")
        gone = p.alert("server-gone")
        assert "Cannot reach" in gone and "minicpmo-edge serve" in gone
        assert p.page.inner_text("#state") == "Offline"
        p.page.fill("#text", "hello?")
        p.page.click("#send")
        assert "not sent" in p.alert("not-connected")
        proxy.resume()
        p.wait("() => window.edgeDemo.stats.reconnects >= 2 && window.edgeDemo.stats.state !== 'offline'",
               timeout=15_000, what="the reconnection after the server came back")
        assert p.alert("server-gone") == ""
        # and it answers again
        done = p.stats()["repliesDone"]
        p.page.click("#send")  # the text is still in the box
        p.wait(f"() => window.edgeDemo.stats.repliesDone > {done}", what="a reply after the reconnection")
        s = p.stats()
        reply_matches_engine(s["replies"][s["replyOrder"][-1]], stack["recorder"].runs[-1])
        assert not [c for c in p.console if c.startswith("pageerror")], p.console
    finally:
        if hog:
            hog.stop()
        if proxy.listener is None:
            proxy.resume()
        p.close()


def test_camera_and_microphone_denied(browser, stack):
    """Both denied: two clear messages and typing still works. Camera denied only: a message, and live voice
    continues without frames (the server gets one audio clip, not the omni layout)."""
    p = Page(browser, stack["url"], permissions=())
    try:
        connected(p)
        p.page.click("#start")
        p.wait("() => !!document.querySelector('#alerts [data-code=\"mic-denied\"]') && "
               "!!document.querySelector('#alerts [data-code=\"camera-denied\"]')", what="the denied messages")
        assert "Microphone access was denied" in p.alert("mic-denied") and "type below" in p.alert("mic-denied")
        assert "Camera access was denied" in p.alert("camera-denied")
        assert p.stats()["state"] == "ready" and p.page.is_visible("#start") and p.page.is_disabled("#mute")
    finally:
        p.close()
    runs = stack["recorder"].runs
    p = Page(browser, stack["url"], permissions=("microphone",))
    try:
        connected(p)
        p.set_option("#opt-max-tokens", "8")
        n = len(runs)
        p.page.click("#start")
        p.wait("() => !!document.querySelector('#alerts [data-code=\"camera-denied\"]')", what="the camera message")
        assert "voice only" in p.alert("camera-denied") and p.alert("mic-denied") == ""
        p.wait("() => window.edgeDemo.stats.commits >= 1", what="a voice-only turn")
        p.page.click("#mute")
        p.wait("() => window.edgeDemo.stats.repliesDone >= 1", what="the voice-only reply")
        audio = [m for m in p.sent if m["type"] == "input.audio"]
        assert audio and not any(m["image"] for m in audio)
        job = runs[n]["job"]
        content = job.messages[-1]["content"]
        assert len(content) == 1 and isinstance(content[0], np.ndarray) and not job.prompt_kwargs.get("omni_input")
        assert abs(dominant_hz(content[0], 16000) - TONE_HZ) < 2.0
    finally:
        p.close()


def test_api_key_prompt_and_random_weights_notice(browser, golden_bundle, tmp_path):
    """A bundle whose manifest says random weights (as the built-in default bundle's does) behind an API key:
    the page shows the notice, asks for the key, says when it is wrong, and connects with the right one."""
    from edge.server.engine import Engine
    from edge.server.settings import ServerSettings

    root = tmp_path / "random-weights-bundle"
    root.mkdir()
    for f in golden_bundle.root.iterdir():
        if f.name != "bundle.json":
            (root / f.name).symlink_to(f)
    manifest = json.loads((golden_bundle.root / "bundle.json").read_text())
    manifest["source"]["random_weights"] = True
    (root / "bundle.json").write_text(json.dumps(manifest))
    settings = ServerSettings(bundle=str(root), api_key="s3cret", max_tokens=8)
    engine = Engine.load(settings, progress=False)
    server = Server(settings, engine)
    p = None
    try:
        assert httpx.get(server.url + "/v1/models").status_code == 401  # the API wants the key ...
        cfg = httpx.get(server.url + "/web/config").json()  # ... the page and its config do not
        assert cfg["api_key_required"] is True and cfg["random_weights"] is True and "RANDOM" in cfg["notice"]
        p = Page(browser, server.url + "/", permissions=())
        p.wait("() => !!document.querySelector('#alerts [data-code=\"auth-required\"]')", what="the key prompt")
        assert p.page.is_visible("#key-form") and "API key" in p.alert("auth-required")
        assert p.page.is_visible("#notice") and "RANDOM weights" in p.page.inner_text("#notice")
        p.page.fill("#key", "wrong")
        p.page.click("#key-submit")
        p.wait("() => !!document.querySelector('#alerts [data-code=\"auth-wrong\"]')", what="the wrong-key message")
        assert "refused this API key" in p.alert("auth-wrong") and p.page.is_visible("#key-form")
        assert p.stats()["sessions"] == 0
        p.page.fill("#key", "s3cret")
        p.page.click("#key-submit")
        connected(p)
        assert p.page.is_hidden("#key-form") and p.alert("auth-wrong") == ""
        p.page.fill("#text", "hi")
        p.page.click("#send")
        p.wait("() => window.edgeDemo.stats.repliesDone >= 1", what="a reply with the key")
        assert p.stats()["replies"][p.stats()["replyOrder"][0]]["status"] == "completed"
        p.page.reload()  # the key is kept for the tab
        connected(p)
        assert p.page.is_hidden("#key-form")
    finally:
        if p:
            p.close()
        server.stop()
        engine.close()


def test_voice_clone_and_image_upload(browser, stack, golden_dir, tmp_path):
    """The voice picker turns an uploaded clip (any rate) into a 16 kHz reference the server clones from; an
    uploaded image goes with the typed text, pixel for pixel."""
    import soundfile as sf
    from PIL import Image

    from edge.voice import CLONE_PREFIX

    clip_rate, clip_s, clip_hz = 22050, 3.0, 300.0  # a rate the page must resample
    t = np.arange(int(clip_s * clip_rate)) / clip_rate
    clip = tmp_path / "my-voice.wav"
    sf.write(clip, (0.3 * np.sin(2 * np.pi * clip_hz * t)).astype(np.float32), clip_rate, subtype="PCM_16")
    image = golden_dir / "inputs" / "img0.png"
    runs = stack["recorder"].runs
    p = Page(browser, stack["url"], permissions=())
    try:
        connected(p)
        p.set_option("#opt-max-tokens", "8")
        with p.page.expect_file_chooser() as fc:
            p.page.select_option("#voice", "clone")
        fc.value.set_files(str(clip))
        p.wait("() => document.getElementById('voice-status').dataset.state === 'cloned'", what="the cloned voice")
        assert "my-voice.wav" in p.page.inner_text("#voice-status")
        p.page.set_input_files("#image", str(image))
        p.page.wait_for_selector("#attachments img")
        p.page.fill("#text", "What is in this picture?")
        n = len(runs)
        p.page.click("#send")
        p.wait("() => window.edgeDemo.stats.repliesDone >= 1", what="the reply in the cloned voice")
        s = p.stats()
        assert p.types().count("input.image") == 1 and s["replies"][s["replyOrder"][0]]["samples"] > 0
        msgs = runs[n]["job"].messages
        def is_clone(m) -> bool:
            c = m["content"]
            return isinstance(c, list) and bool(c) and isinstance(c[0], str) and c[0] == CLONE_PREFIX

        clone = [m for m in msgs if is_clone(m)]
        assert len(clone) == 1
        ref = clone[0]["content"][1]
        assert len(ref) == int(clip_s * 16000) and abs(dominant_hz(ref, 16000) - clip_hz) < 2.0
        user = msgs[-1]["content"]
        assert user[-1] == "What is in this picture?"
        sent_img = np.asarray(user[0].convert("RGB"))
        assert np.array_equal(sent_img, np.asarray(Image.open(image).convert("RGB")))
        # back to the default voice: the next turn has no clone prompt
        p.page.select_option("#voice", "default")
        p.wait("() => document.getElementById('voice-status').dataset.state === 'default'", what="the default voice")
        n = len(runs)
        p.page.fill("#text", "And now?")
        p.page.click("#send")
        p.wait("() => window.edgeDemo.stats.repliesDone >= 2", what="the reply in the default voice")
        assert not [m for m in runs[n]["job"].messages if is_clone(m)]
        assert not [c for c in p.console if c.startswith("pageerror")], p.console
    finally:
        p.close()
