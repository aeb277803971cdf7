"""`minicpmo-edge` command line. Errors print as one clear line (use --debug for the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge import __version__


def _cmd_synth(a) -> None:
    from converters.convert import SYNTHETIC_MARKER
    from models.synth import build_synthetic_checkpoint

    out = build_synthetic_checkpoint(Path(a.out_dir), scale=a.scale, seed=a.seed, progress=not a.quiet)
    (Path(out) / SYNTHETIC_MARKER).write_text(json.dumps({"scale": a.scale, "seed": a.seed}))
    print(f"synthetic {a.scale} checkpoint (random weights, seed {a.seed}) written to {out}")


def _cmd_convert(a) -> None:
    from converters.convert import convert

    b = convert(a.src_dir, a.bundle_dir, llm_quant=a.llm_quant, int8=not a.no_int8, progress=not a.quiet,
                overwrite=a.overwrite)
    print(f"bundle written to {b.root} ({', '.join(sorted(b.parts))})")


def _cmd_pull(a) -> None:
    from converters.pull import pull

    dst = pull(a.repo, llm_quant=a.llm_quant, dst=Path(a.bundle_dir) if a.bundle_dir else None,
               overwrite=a.overwrite)
    print(f"official checkpoint converted to {dst}")


def _cmd_info(a) -> None:
    from edge.bundle import Bundle

    b = Bundle.load(a.bundle)
    print(f"bundle {b.root}\n  arch {b.arch}, schema {b.schema_version}, source {b.source.get('name')}"
          f"{'  [RANDOM WEIGHTS]' if b.random_weights else ''}")
    for name, part in b.parts.items():
        meta = {k: v for k, v in part.meta.items() if k in ("quant", "variants")}
        for role, f in part.files.items():
            path = b.path_of(f)
            size = path.stat().st_size if path.is_file() else None
            shown = "MISSING" if size is None else f"{size / 2**20:9.1f} MiB"
            print(f"  {name:7s} {role:14s} {f.path:32s} {shown} {meta or ''}")
    problems = b.check_files()  # always: sizes against the manifest, ONNX headers (cheap)
    if problems:
        print("  problems: " + "; ".join(problems) + ". Convert the bundle again.")
        raise SystemExit(1)
    if a.verify:
        problems = b.verify()
        print("  sha256: " + ("all files OK" if not problems else "; ".join(problems)))
        if problems:
            raise SystemExit(1)


def _cmd_demo(a) -> None:
    from edge.demo import run_demo

    run_demo(bundle=a.bundle, speak=not a.no_speech, output_audio=a.output_audio, threads=a.threads,
             profile=a.profile, overrides=a.overrides)


def _cmd_live(a) -> None:
    from edge.live import LiveArgs, run_live

    fields = LiveArgs.__dataclass_fields__
    run_live(LiveArgs(**{k: v for k, v in vars(a).items() if k in fields}))


def _cmd_serve(a) -> None:
    from edge.server.settings import from_args

    try:
        from edge.server.app import serve
    except ImportError as e:
        raise RuntimeError(f"the server needs its extra dependencies ({e.name} is missing): "
                           "pip install -e '.[server]'") from e
    serve(from_args(a), log_level="debug" if a.debug else "info")


def _cmd_chat(a) -> None:
    from edge.chat_repl import ChatOptions, run_chat

    run_chat(ChatOptions(bundle=a.bundle, images=tuple(a.image), audios=tuple(a.audio), video=a.video,
                         voice=a.voice, speak=a.speak, save_audio=a.save_audio, system=a.system,
                         max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed, threads=a.threads,
                         profile=a.profile, overrides=tuple(a.overrides)))


def _cmd_bench(a) -> None:
    import importlib
    import pkgutil

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__init__.py").is_file():
        raise RuntimeError("benchmarks live in the source checkout (bench/); run this from a git clone.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    names = sorted(m.name for m in pkgutil.iter_modules([str(root / "bench")]) if m.name != "common")
    if a.name not in names:
        raise RuntimeError(f"unknown benchmark {a.name!r}; available: {', '.join(names)}")
    apply_device_limits(cpus=a.cpus, mem_cap_gib=a.mem_cap_gib)
    importlib.import_module(f"bench.{a.name}").main(a.args)


def apply_device_limits(*, cpus: int = 0, mem_cap_gib: float = 0) -> dict:
    """Approximate a smaller device for a benchmark: pin to `cpus` cores and cap the address space. Memory-mapped
    files count against RLIMIT_AS, so a capped run measures what would not fit a device of that size."""
    import os
    import resource

    applied = {}
    if cpus:
        cores = sorted(os.sched_getaffinity(0))[:cpus]
        os.sched_setaffinity(0, cores)
        applied["cpus"] = cores
    if mem_cap_gib:
        cap = int(mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        applied["mem_cap_bytes"] = cap
    if applied:
        print(f"device limits: {applied}", flush=True)
    return applied


def build_parser() -> argparse.ArgumentParser:
    from edge.profiles import add_profile_arguments

    p = argparse.ArgumentParser(prog="minicpmo-edge", description="On-device runtime for MiniCPM-o 2.6.")
    p.add_argument("--version", action="version", version=f"minicpmo-edge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("demo", help="image + spoken question -> text and speech (the main job)")
    s.add_argument("--bundle", help="bundle dir (default: an installed real bundle, else the built-in one)")
    s.add_argument("--no-speech", action="store_true", help="text reply only")
    s.add_argument("--output-audio", default="demo-reply.wav", help="where the spoken reply is written")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for llama.cpp and onnxruntime (0 = the "
                   "profile's)")
    add_profile_arguments(s)
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("live", help="live conversation: camera + microphone (or files) -> speech, with barge-in")
    from edge.live import add_live_arguments

    add_live_arguments(s)
    add_profile_arguments(s)
    s.set_defaults(fn=_cmd_live)

    s = sub.add_parser("synth", help="write a synthetic checkpoint (official layout, random weights)")
    s.add_argument("out_dir")
    s.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_synth)

    s = sub.add_parser("convert", help="checkpoint dir -> runtime bundle (GGUF LLM + ONNX parts)")
    s.add_argument("src_dir")
    s.add_argument("bundle_dir")
    s.add_argument("--llm-quant", choices=["f32", "f16", "q8_0", "q4_k_m"], default="q4_k_m")
    s.add_argument("--no-int8", action="store_true", help="skip the int8 ONNX variants")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("pull", help="download the official checkpoint (huggingface-hub) and convert it")
    s.add_argument("--repo", default="openbmb/MiniCPM-o-2_6")
    s.add_argument("--llm-quant", choices=["f32", "f16", "q8_0", "q4_k_m"], default="q4_k_m")
    s.add_argument("--bundle-dir", help="default: the user cache")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_cmd_pull)

    s = sub.add_parser("info", help="show a bundle's parts, sizes and quantisation")
    s.add_argument("bundle")
    s.add_argument("--verify", action="store_true", help="check every file's sha256")
    s.set_defaults(fn=_cmd_info)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (+ /v1/realtime WebSocket) on a bundle")
    s.add_argument("bundle", nargs="?", help="bundle dir (default: an installed real bundle, else the built-in one)")
    from edge.server.settings import add_arguments

    add_arguments(s, skip=("bundle",))
    add_profile_arguments(s)
    s.set_defaults(fn=_cmd_serve)

    s = sub.add_parser("chat", help="interactive chat in the terminal (text, images, audio, video, speech)")
    s.add_argument("--bundle", help="bundle dir (default: an installed real bundle, else the built-in one)")
    s.add_argument("--image", action="append", default=[], help="image file for the first turn (repeatable)")
    s.add_argument("--audio", action="append", default=[], help="audio file for the first turn (repeatable)")
    s.add_argument("--video", help="video file for the first turn (1 frame per second)")
    s.add_argument("--voice", help="reference clip (wav/mp3/flac) whose voice the spoken replies clone")
    s.add_argument("--speak", action="store_true", help="speak the replies on the speakers")
    s.add_argument("--save-audio", metavar="DIR", help="write each spoken reply to DIR/reply-N.wav")
    s.add_argument("--system", help="system prompt")
    s.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (default: 512)")
    s.add_argument("--temperature", type=float, help="sampling temperature (default: official 0.7; 0 = greedy)")
    s.add_argument("--seed", type=int, help="sampling seed for reproducible replies")
    s.add_argument("--threads", type=int, default=0, help="CPU threads for llama.cpp and onnxruntime (0 = the "
                   "profile's)")
    add_profile_arguments(s)
    s.set_defaults(fn=_cmd_chat)

    s = sub.add_parser("bench", help="run a benchmark from bench/ (e.g. `bench server --help`)")
    s.add_argument("--cpus", type=int, default=0, help="pin the benchmark to this many cores (approximate a device)")
    s.add_argument("--mem-cap-gib", type=float, default=0, help="address-space cap (RLIMIT_AS) for the benchmark")
    s.add_argument("name", help="benchmark module in bench/ (llm, vision, audio, tts, server, ...)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    s.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        import warnings

        # Exporter/quantizer chatter that users cannot act on (torch's TorchScript-exporter deprecation notes,
        # onnxruntime's "consider pre-processing" hint); --debug shows everything.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.getLogger().addFilter(lambda r: "pre-processing before quantization" not in r.getMessage())
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; the traceback with --debug
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
