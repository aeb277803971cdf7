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
            print(f"  {name:7s} {role:14s} {f.path:32s} {f.bytes / 2**20:9.1f} MiB {meta or ''}")
    if a.verify:
        problems = b.verify()
        print("  sha256: " + ("all files OK" if not problems else "; ".join(problems)))
        if problems:
            raise SystemExit(1)


def _cmd_demo(a) -> None:
    from edge.demo import run_demo

    run_demo(bundle=a.bundle, speak=not a.no_speech, output_audio=a.output_audio, threads=a.threads)


def _cmd_live(a) -> None:
    from edge.live import LiveArgs, run_live

    fields = LiveArgs.__dataclass_fields__
    run_live(LiveArgs(**{k: v for k, v in vars(a).items() if k in fields}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minicpmo-edge", description="On-device runtime for MiniCPM-o 2.6.")
    p.add_argument("--version", action="version", version=f"minicpmo-edge {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("demo", help="image + spoken question -> text and speech (the main job)")
    s.add_argument("--bundle", help="bundle dir (default: an installed real bundle, else the built-in one)")
    s.add_argument("--no-speech", action="store_true", help="text reply only")
    s.add_argument("--output-audio", default="demo-reply.wav", help="where the spoken reply is written")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("live", help="live conversation: camera + microphone (or files) -> speech, with barge-in")
    from edge.live import add_live_arguments

    add_live_arguments(s)
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
