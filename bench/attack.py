"""Issue 19's attack cases against a real `minicpmo-edge serve` (loopback only): status, time and server RSS growth.

Why a script and not only tests: the issue's "done when" is a before/after table on the served built-in bundle;
this runs every case against a server process started from the code on PYTHONPATH, so the same script measures
the old and the new code. Usage: `python -m bench.attack [--out FILE] [--only NAME,...]`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASE_TIMEOUT_S = 150.0  # longer than the slowest case the issue saw (120 s)
HOLD_S = 30.0  # how long a slow-header / slow-body / idle connection is watched
MODEL = "minicpm-o-2_6"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def flac_silence(seconds: float) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), np.int16), 16000, format="FLAC")
    return buf.getvalue()


def mjpeg(n: int, side: int) -> bytes:
    import cv2

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "v.avi")
        w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 1.0, (side, side))
        frame = np.zeros((side, side, 3), np.uint8)
        for _ in range(n):
            w.write(frame)
        w.release()
        return Path(path).read_bytes()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_msg(*urls: str) -> dict:
    return {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]}


class Server:
    def __init__(self, media_dir: str, extra: list[str]):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edge.cli", "serve", "--port", str(self.port), "--media-dir", media_dir, *extra]
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + Path(self.log.name).read_text()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def alive(self) -> bool:
        import httpx

        try:
            return httpx.get(self.url + "/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def post(srv, path, *, json_body=None, content=None, headers=None, files=None, data=None):
    import httpx

    r = httpx.post(srv.url + path, json=json_body, content=content, headers=headers, files=files, data=data,
                   timeout=CASE_TIMEOUT_S)
    return r.status_code, r.text[:160]


def slow_send(srv, head: bytes, trickle: bytes, hold: float | None = None) -> tuple[str, str]:
    """Send `head`, then one byte of `trickle` per second; report when the server closed the connection."""
    hold = HOLD_S if hold is None else hold
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(head)
    t0 = time.time()
    try:
        for b in trickle:
            if time.time() - t0 > hold:
                return "open", f"still open after {hold:.0f} s"
            s.sendall(bytes([b]))
            s.settimeout(1.0)
            try:
                got = s.recv(4096)
                if got == b"":
                    return "closed", f"closed after {time.time() - t0:.1f} s"
                return got.split(b"\r\n")[0].decode(errors="replace"), f"answered after {time.time() - t0:.1f} s"
            except socket.timeout:
                pass
        return "open", "trickle ended"
    except OSError as e:
        return "closed", f"reset after {time.time() - t0:.1f} s ({e.__class__.__name__})"
    finally:
        s.close()


def ws_case(srv, message: str | None, origin: str | None = None, idle: float = 0.0) -> tuple[str, str]:
    from websockets.sync.client import connect

    hdrs = {"Origin": origin} if origin else None
    t0 = time.time()
    try:
        with connect(f"ws://127.0.0.1:{srv.port}/v1/realtime", additional_headers=hdrs, open_timeout=20) as ws:
            ws.recv(timeout=20)  # session.created
            if message is not None:
                ws.send(message)
                return "message", ws.recv(timeout=30)[:160]
            try:
                ws.recv(timeout=idle)
                return "message", "got a message while idle"
            except TimeoutError:
                return "open", f"still open after {idle:.0f} s idle"
    except Exception as e:  # noqa: BLE001 - the outcome is what we report
        return "closed", f"{type(e).__name__}: {str(e)[:120]} after {time.time() - t0:.1f} s"


def cases(srv, media: Path) -> dict:
    """Payloads are built here, before any case is timed."""
    big = png(5000, 5000)
    nested = "[" * 100_000 + "]" * 100_000
    thin, thin2, long_flac = png(200704, 1), png(100000, 2), flac_silence(1800)
    video = data_url("video/avi", mjpeg(4, 8000))
    return {
        "png_200704x1": lambda: post(srv, "/v1/chat/completions", json_body=image_msg(data_url("image/png", thin))),
        "png_100000x2": lambda: post(srv, "/v1/chat/completions", json_body=image_msg(data_url("image/png", thin2))),
        "flac_30min_silence": lambda: post(srv, "/v1/audio/transcriptions", files={
            "file": ("a.flac", long_flac, "audio/flac")}, data={"model": MODEL}),
        "ten_25mp_png": lambda: post(srv, "/v1/chat/completions",
                                     json_body=image_msg(*[data_url("image/png", big)] * 10)),
        "video_4x8000x8000_mjpeg": lambda: post(srv, "/v1/chat/completions", json_body={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "video_url", "video_url": {"url": video}}]}]}),
        "temperature_1e-300": lambda: post(srv, "/v1/chat/completions", json_body={
            "model": MODEL, "max_tokens": 4, "temperature": 1e-300, "messages": [{"role": "user", "content": "hi"}]}),
        "chat_seed_-1": lambda: post(srv, "/v1/chat/completions", json_body={
            "model": MODEL, "max_tokens": 4, "seed": -1, "messages": [{"role": "user", "content": "hi"}]}),
        "speech_seed_-1": lambda: post(srv, "/v1/audio/speech", json_body={"model": MODEL, "input": "hi", "seed": -1}),
        "transcription_temperature_nan": lambda: post(srv, "/v1/audio/transcriptions", files={
            "file": ("a.flac", flac_silence(1), "audio/flac")}, data={"model": MODEL, "temperature": "nan"}),
        "lone_surrogate": lambda: post(srv, "/v1/chat/completions", content=b'{"model": "m", "max_tokens": 4, '
                                       b'"messages": [{"role": "user", "content": "\\ud800"}]}',
                                       headers={"Content-Type": "application/json"}),
        "nested_json_http": lambda: post(srv, "/v1/chat/completions", content=nested.encode(),
                                         headers={"Content-Type": "application/json"}),
        "nested_json_socket": lambda: ws_case(srv, nested),
        "nul_in_file_url": lambda: post(srv, "/v1/chat/completions",
                                        json_body=image_msg("file://" + str(media) + "/a\x00b.png")),
        "speech_spk_emb_text": lambda: post(srv, "/v1/audio/speech", json_body={
            "model": MODEL, "input": "hello [spk_emb] world", "seed": 1}),
        "post_without_content_type": lambda: post(srv, "/v1/chat/completions", content=json.dumps({
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Content-Type": ""}),
        "ws_foreign_origin": lambda: ws_case(srv, json.dumps({"type": "ping"}), origin="http://evil.example"),
        "dns_rebinding_host": lambda: post(srv, "/v1/chat/completions", json_body={
            "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Host": "evil.example:%d" % srv.port}),
        "health_shows_path": lambda: ("200", "path in /health" if "/" in json.dumps(
            __import__("httpx").get(srv.url + "/health").json().get("bundle", "")) else "no path"),
        "slow_headers": lambda: slow_send(srv, b"GET /health HTTP/1.1\r\n", b"X-a: b\r\n" * 100),
        "slow_body": lambda: slow_send(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                       b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n", b"{" * 1000),
        "idle_socket": lambda: ws_case(srv, None, idle=HOLD_S),  # HOLD_S read at call time (--hold)
        "twenty_rejected_heavy": lambda: [post(srv, "/v1/chat/completions",
                                               json_body=image_msg(*[data_url("image/png", big)] * 10))
                                          for _ in range(20)][-1],
    }


def main(argv=None) -> None:
    global HOLD_S
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--only", default="", help="comma-separated case names")
    ap.add_argument("--serve-args", default="", help="extra `serve` arguments")
    ap.add_argument("--hold", type=float, default=HOLD_S, help="seconds a slow / idle connection is watched")
    a = ap.parse_args(argv)
    HOLD_S = a.hold
    media = Path(tempfile.mkdtemp(prefix="attack-media-"))
    srv = Server(str(media), a.serve_args.split())
    results = {}
    try:
        start_rss = rss_mb(srv.proc.pid)
        for name, fn in cases(srv, media).items():
            if a.only and name not in a.only.split(","):
                continue
            before = rss_mb(srv.proc.pid)
            t0 = time.time()
            try:
                status, detail = fn()
            except Exception as e:  # noqa: BLE001 - a client-side failure is a result too
                status, detail = "error", f"{type(e).__name__}: {e}"[:160]
            dt = time.time() - t0
            time.sleep(1.0)
            after = rss_mb(srv.proc.pid)
            ok = srv.alive()
            results[name] = {"status": str(status), "seconds": round(dt, 2), "rss_growth_mb": round(after - before),
                             "server_alive": ok, "detail": detail}
            print(f"{name:30s} {str(status):10s} {dt:7.2f} s  {after - before:+7.0f} MB  alive={ok}  {detail[:90]}",
                  flush=True)
        results["_total_rss_growth_mb"] = round(rss_mb(srv.proc.pid) - start_rss)
        print("total RSS growth", results["_total_rss_growth_mb"], "MB")
    finally:
        srv.stop()
        print("server log tail:\n" + Path(srv.log.name).read_text()[-3000:])
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
