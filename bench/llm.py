"""LLM backbone speed vs plain llama-cpp-python on the same GGUF and threads, plus the bandwidth ceiling.

    python -m bench.llm BUNDLE_OR_GGUF [--threads 2] [--repeats 3] [--prompt 512] [--decode 128]

Prefill tok/s (a `--prompt`-token prompt) and decode tok/s (`--decode` tokens) of `edge.llm.LLM` and of
`llama_cpp.Llama`, interleaved in one process; the machine's memory read bandwidth and the implied decode
ceiling (bandwidth / bytes of weights read per token); peak RSS. JSON to bench/results/llm-*.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import interleave, memory_bandwidth_gbs, peak_rss_gib, versions, write_result


def gguf_path(p: Path) -> Path:
    if p.is_dir():
        from edge import keys
        from edge.bundle import Bundle

        return Bundle.load(p).file(keys.PART_LLM, "model")
    return p


def weight_bytes_per_token(path: Path) -> int:
    """Bytes a decode step streams from memory: every weight except the token table (only one row is read)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    return int(sum(int(t.n_bytes) for t in r.tensors if t.name != "token_embd.weight"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--flash-attn", choices=["off", "on"], default="off",
                    help="same setting on both sides (plain llama_cpp.Llama defaults to off)")
    a = ap.parse_args(argv)

    import llama_cpp

    from edge.llm import LLM, LLMOptions
    from edge.sampling import SamplingOptions

    path = gguf_path(a.model)
    ours = LLM(path, LLMOptions(n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                                flash_attn=a.flash_attn))
    plain = llama_cpp.Llama(str(path), n_ctx=a.n_ctx, n_threads=a.threads, n_threads_batch=a.threads,
                            n_batch=512, flash_attn=a.flash_attn == "on", verbose=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, min(ours.n_vocab, 150000), size=a.prompt).tolist()
    sampling = SamplingOptions(seed=0)

    def ours_prefill():
        ours.reset()
        t = time.perf_counter()
        ours.prefill([prompt])
        return time.perf_counter() - t

    def plain_prefill():
        plain.reset()
        t = time.perf_counter()
        plain.eval(prompt)
        return time.perf_counter() - t

    def ours_decode():
        ours.reset()
        last, _ = ours.prefill([prompt[:16]])
        t = time.perf_counter()
        n = sum(1 for _ in ours.generate(last, sampling, max_new_tokens=a.decode))
        assert n == a.decode
        return time.perf_counter() - t

    def plain_decode():
        plain.reset()
        gen = plain.generate(prompt[:16], temp=0.7, top_p=0.8, top_k=100, repeat_penalty=1.05)
        next(gen)  # the first token comes from the prompt's logits: excluded like ours (prefill not timed)
        t = time.perf_counter()
        for i, _ in enumerate(gen):
            if i + 1 >= a.decode:
                break
        return time.perf_counter() - t

    pre = interleave({"edge": ours_prefill, "llama_cpp.Llama": plain_prefill}, a.repeats)
    dec = interleave({"edge": ours_decode, "llama_cpp.Llama": plain_decode}, a.repeats)
    bw = memory_bandwidth_gbs(threads=a.threads)
    per_tok = weight_bytes_per_token(path)
    res = {
        "model": str(path), "model_bytes": path.stat().st_size, "threads": a.threads, "n_ctx": a.n_ctx,
        "flash_attn": a.flash_attn, "note": "sides interleaved in one process; host shared with other jobs",
        "versions": versions("llama_cpp_python", "numpy", "onnxruntime"),
        "prefill_tokens": a.prompt, "decode_tokens": a.decode,
        "prefill_tok_s": {k: {"best": a.prompt / v["min"], "median": a.prompt / v["median"]} for k, v in pre.items()},
        "decode_tok_s": {k: {"best": a.decode / v["min"], "median": a.decode / v["median"]} for k, v in dec.items()},
        "raw_seconds": {"prefill": pre, "decode": dec},
        "memory_bandwidth": bw, "weight_bytes_per_token": per_tok,
        "decode_ceiling_tok_s": bw["read_gbs"] * 1e9 / per_tok,
        "peak_rss_gib": peak_rss_gib(),
    }
    e, p = res["decode_tok_s"]["edge"]["median"], res["decode_tok_s"]["llama_cpp.Llama"]["median"]
    res["decode_ratio_edge_over_plain_median"] = e / p
    print(f"prefill tok/s  edge {res['prefill_tok_s']['edge']['median']:.1f}  plain "
          f"{res['prefill_tok_s']['llama_cpp.Llama']['median']:.1f}")
    print(f"decode  tok/s  edge {e:.2f}  plain {p:.2f}  ratio {e / p:.3f}  ceiling {res['decode_ceiling_tok_s']:.2f}")
    write_result("llm", res)


if __name__ == "__main__":
    main()
