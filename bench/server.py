"""Server throughput and time to first token: `minicpmo-edge serve` vs llama-cpp-python's own server.

    python -m bench.server [--bundle DIR] [--levels 1,4,16] [--rounds 4] [--max-tokens 32] [--threads 2]

For each concurrency level C, C clients each send `--rounds` streaming chat requests back to back; reported per
level: requests/s (all requests / wall time), p50/p95 time to first token (request sent -> first non-empty
content delta), completion tokens and aggregate decode tokens/s. Workloads, run one server at a time in the same
invocation (so they do not compete for the CPU):
  - edge, text+image: a 896x560 drawn image (sliced like a phone photo) + a question;
  - edge, text: the same question without the image;
  - llama-cpp-python (`python -m llama_cpp.server`, needs `pip install 'llama-cpp-python[server]'`) on the
    bundle's own llm.gguf, chatml template, text only.
Every request asks for exactly `--max-tokens` tokens (min_tokens = max_tokens; both servers support it), so
the sides generate equally long replies. Default bundle: the built-in tiny one. JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import versions, write_result

QUESTION = "Describe what you see and answer briefly."
SYSTEM = "You are a helpful assistant."  # the Qwen2 ChatML default that edge's template adds (edge/prompt.py)
STARTUP_TIMEOUT_S = 600  # the first `serve` of the default bundle may build it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Proc:
    """A server subprocess with its log in a temp file; `ready_path` is polled until it answers 200."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, name: str):
        self.name, self.port = name, port
        self.log = tempfile.NamedTemporaryFile("w+", suffix=f"-{name}.log", delete=False)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if self.p.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.p.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start in {STARTUP_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()
        os.unlink(self.log.name)


async def one_request(client, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            usage = d.get("usage") or usage
            for c in d.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
    return {"ttft": ttft, "total": time.perf_counter() - t0, "content_chunks": chunks,
            "completion_tokens": (usage or {}).get("completion_tokens"), "prompt_tokens": (usage or {}).get(
                "prompt_tokens")}


async def run_level(url: str, body: dict, clients: int, rounds: int, probe_tokens: int | None = None) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker():
            return [await one_request(client, url, body) for _ in range(rounds)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = [r["completion_tokens"] if r["completion_tokens"] is not None else probe_tokens or r["content_chunks"]
              for r in results]
    return {"clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "ttft_p50_ms": percentile(ttfts, 0.5) * 1000, "ttft_p95_ms": percentile(ttfts, 0.95) * 1000,
            "latency_p50_ms": percentile([r["total"] for r in results], 0.5) * 1000,
            "completion_tokens_mean": statistics.mean(tokens), "tokens_per_s": sum(tokens) / wall,
            "prompt_tokens": results[0]["prompt_tokens"]}


def probe(url: str, body: dict) -> dict:
    """One non-streaming request with the same body: the server's own token counts and finish reason (streamed
    chunks are not always one token each, and not every server streams usage)."""
    import httpx

    r = httpx.post(url, json={**body, "stream": False, "stream_options": None}, timeout=600).json()
    return {"usage": r.get("usage"), "finish_reason": r["choices"][0]["finish_reason"]}


def workload(url: str, body: dict, levels: list[int], rounds: int, label: str) -> dict:
    asyncio.run(run_level(url, body, 1, 1))  # warm-up (first-call allocations, lazy encoder loading)
    out = {"probe": probe(url, body), "levels": []}
    print(f"  {label}: one request = {out['probe']}", flush=True)
    for c in levels:
        r = asyncio.run(run_level(url, body, c, rounds, (out["probe"]["usage"] or {}).get("completion_tokens")))
        print(f"  {label:22s} C={c:2d}: {r['requests_per_s']:6.2f} req/s  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  "
              f"p95 {r['ttft_p95_ms']:7.1f} ms  ({r['requests']} requests, {r['completion_tokens_mean']:.0f} tok)",
              flush=True)
        out["levels"].append(r)
    return out


def image_data_url() -> str:
    from edge.demo import demo_image

    buf = io.BytesIO()
    demo_image().save(buf, "JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="bundle dir (default: the built-in tiny bundle)")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients per level")
    ap.add_argument("--rounds", type=int, default=4, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--concurrency", type=int, default=1, help="edge server --concurrency")
    ap.add_argument("--skip-llama", action="store_true", help="do not run llama-cpp-python's server")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.levels.split(",")]

    from edge import keys
    from edge.bundle import Bundle
    from edge.default_bundle import ensure_default_bundle

    bundle = Bundle.load(a.bundle) if a.bundle else ensure_default_bundle()
    gguf = bundle.file(keys.PART_LLM, "model")
    n = a.max_tokens
    # An explicit system prompt (the official default one) so that both servers see the same ChatML prompt:
    # edge adds it when absent, llama-cpp-python's chatml format does not.
    text_msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    image_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}},
                                               {"type": "text", "text": QUESTION}]}]
    common = {"model": "bench", "stream": True, "max_tokens": n, "min_tokens": n, "seed": 0,
              "stream_options": {"include_usage": True}}
    results: dict = {"bundle": str(bundle.root), "bundle_name": bundle.source.get("name"),
                     "random_weights": bundle.random_weights, "threads": a.threads, "max_tokens": n,
                     "rounds": a.rounds, "levels": levels, "edge_concurrency": a.concurrency,
                     "versions": versions("llama_cpp_python", "fastapi", "uvicorn", "onnxruntime")}

    port = free_port()
    print(f"edge server on {bundle.root} ...", flush=True)
    edge = Proc([sys.executable, "-m", "edge.cli", "serve", str(bundle.root), "--port", str(port), "--threads",
                 str(a.threads), "--max-queue", str(max(levels) * 2), "--max-tokens", str(max(n, 1)),
                 "--concurrency", str(a.concurrency)], port, "/health", "edge")
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        results["edge_text_image"] = workload(url, {**common, "messages": image_msgs}, levels, a.rounds,
                                              "edge text+image")
        results["edge_text"] = workload(url, {**common, "messages": text_msgs}, levels, a.rounds, "edge text")
    finally:
        edge.stop()

    if not a.skip_llama:
        port = free_port()
        print(f"llama-cpp-python server on {gguf} ...", flush=True)
        llama = Proc([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                      "--n_ctx", "4096", "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
                      "--chat_format", "chatml", "--verbose", "False",
                      # its default lets a new request abort the running stream; queue them instead, like edge
                      "--interrupt_requests", "False"], port, "/v1/models", "llama_cpp.server")
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            results["llama_cpp_server_text"] = workload(url, {**common, "messages": text_msgs}, levels, a.rounds,
                                                        "llama_cpp.server text")
        finally:
            llama.stop()
    write_result("server-tiny" if bundle.random_weights else "server", results)


if __name__ == "__main__":
    main()
