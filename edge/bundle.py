"""The runtime bundle: a directory with `bundle.json` and the part files it names.

Layout of `bundle.json` (schema `edge.keys.BUNDLE_SCHEMA_VERSION`)::

    {
      "schema_version": 2, "arch": "minicpmo-2.6",
      "source": {"config_sha256": "...", "name": "openbmb/MiniCPM-o-2_6" | "synthetic-tiny" | ...,
                 "random_weights": false},
      "dims": {...},                       # model dims the runtime needs (LLM hidden, vocab, ...)
      "special_tokens": {"<|im_end|>": 593, ...},
      "parts": {
        "llm":    {"files": {"model": {"path": "llm.gguf", "sha256": "...", "bytes": 123}},
                   "meta": {"quant": "f32", "chat_template": "{% for message in messages %}...",
                            "template_variables": {"eos_token": "<|im_end|>", ...}, "skipped_in_text": [...]}},
        "vision": {"files": {"fp32": {...}, "int8": {...}}, "meta": {...}},
        ...
      }
    }

A part's `files` maps a role (a quantisation variant, or a sub-graph name) to one file; `meta` holds whatever the
runtime class of that part needs. New parts are added without touching the others.

Trust: a manifest's paths must stay inside the bundle directory (checked at load: no `..`, no absolute paths), so
a crafted bundle.json cannot make the runtime open other files. `check_files` compares every file's size with the
manifest and reads the first bytes of each ONNX graph (cheap: no hashing), so a truncated or overwritten file is
named at start-up instead of failing on first use; `verify` hashes everything (`minicpmo-edge info --verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge import keys
from edge.errors import BundleVersionError, CorruptModelFileError, ModelFilesNotFoundError

_HASH_BLOCK = 1 << 22
# An ONNX file is a serialised ModelProto; protobuf writes fields in number order, so it starts with field 1
# (ir_version, varint): tag byte (1 << 3) | 0 = 0x08, then a small version number (onnx IR versions are 3..13).
ONNX_SUFFIX = ".onnx"
ONNX_FIRST_TAG = 0x08
ONNX_MAX_IR_VERSION = 64


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative to the bundle directory
    sha256: str
    bytes: int

    @classmethod
    def describe(cls, root: Path, rel: str) -> "BundleFile":
        p = root / rel
        return cls(rel, sha256_file(p), p.stat().st_size)


@dataclass
class BundlePart:
    files: dict[str, BundleFile] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"files": {k: vars(v) for k, v in self.files.items()}, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> "BundlePart":
        return cls({k: BundleFile(**v) for k, v in d.get("files", {}).items()}, dict(d.get("meta", {})))


@dataclass
class Bundle:
    root: Path
    schema_version: int
    arch: str
    source: dict
    dims: dict
    special_tokens: dict[str, int]
    parts: dict[str, BundlePart]

    @property
    def random_weights(self) -> bool:
        return bool(self.source.get("random_weights", False))

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's own chat template (tokenizer_config.json), as the converter recorded it."""
        return self._llm_meta().get(keys.LLM_META_CHAT_TEMPLATE)

    @property
    def template_variables(self) -> dict:
        """`bos_token`, `eos_token`, ...: the special-token variables transformers hands the chat template."""
        return dict(self._llm_meta().get(keys.LLM_META_TEMPLATE_VARIABLES, {}))

    @property
    def skipped_in_text(self) -> list[int] | None:
        """Token ids a reply's text leaves out (the checkpoint's `special` added tokens, as HF's
        decode(skip_special_tokens=True)); None for a bundle that does not say."""
        ids = self._llm_meta().get(keys.LLM_META_SKIPPED_IN_TEXT)
        return None if ids is None else list(ids)

    def _llm_meta(self) -> dict:
        part = self.parts.get(keys.PART_LLM)
        return part.meta if part is not None else {}

    @classmethod
    def load(cls, root: str | Path) -> "Bundle":
        root = Path(root)
        manifest = root / keys.BUNDLE_MANIFEST
        if not manifest.is_file():
            raise ModelFilesNotFoundError(
                f"{manifest} not found: {root} is not a MiniCPM-o Edge bundle. Create one with "
                "`minicpmo-edge convert CHECKPOINT_DIR BUNDLE_DIR` or `minicpmo-edge pull`.", str(manifest))
        try:
            d = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise CorruptModelFileError(f"{manifest} is not valid JSON ({e}); convert the bundle again.",
                                        str(manifest)) from e
        version = d.get("schema_version")
        if version != keys.BUNDLE_SCHEMA_VERSION:
            raise BundleVersionError(
                f"bundle {root} has schema version {version}, this runtime reads version "
                f"{keys.BUNDLE_SCHEMA_VERSION}. Convert the checkpoint again with this version's "
                "`minicpmo-edge convert`.")
        if d.get("arch") != keys.BUNDLE_ARCH:
            raise BundleVersionError(f"bundle {root} is for arch {d.get('arch')!r}, expected {keys.BUNDLE_ARCH!r}.")
        parts = {k: BundlePart.from_json(v) for k, v in d.get("parts", {}).items()}
        bundle = cls(root, version, d["arch"], d.get("source", {}), d.get("dims", {}),
                     dict(d.get("special_tokens", {})), parts)
        for part in parts.values():
            for f in part.files.values():
                bundle.path_of(f)
        return bundle

    def path_of(self, f: BundleFile) -> Path:
        """Where a manifest entry points; CorruptModelFileError if that is outside the bundle directory."""
        # Lexical, not resolved: `..` and absolute paths in the manifest are refused, while a symlink that the
        # bundle's owner put inside the directory (e.g. to share files between bundles) is theirs to make.
        root = Path(os.path.abspath(self.root))
        path = Path(os.path.normpath(root / f.path))
        if Path(f.path).is_absolute() or not path.is_relative_to(root):
            raise CorruptModelFileError(
                f"{self.root / keys.BUNDLE_MANIFEST} lists {f.path!r}, which is outside the bundle directory; a "
                "bundle may only name its own files. Convert the bundle again (or fix the manifest).", f.path)
        return path

    def to_json(self) -> dict:
        return {
            "schema_version": self.schema_version, "arch": self.arch, "source": self.source, "dims": self.dims,
            "special_tokens": self.special_tokens, "parts": {k: v.to_json() for k, v in self.parts.items()},
        }

    def save(self) -> None:
        """Write bundle.json atomically (temp file + rename), so a crash never leaves half a manifest."""
        tmp = self.root / (keys.BUNDLE_MANIFEST + ".incomplete")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False))
        tmp.replace(self.root / keys.BUNDLE_MANIFEST)

    def has_part(self, name: str) -> bool:
        return name in self.parts

    def part(self, name: str) -> BundlePart:
        if name not in self.parts:
            raise ModelFilesNotFoundError(
                f"bundle {self.root} has no '{name}' part (it has: {', '.join(sorted(self.parts)) or 'none'}). "
                "Convert the checkpoint again with a converter that writes it.")
        return self.parts[name]

    def file(self, part: str, role: str) -> Path:
        """Absolute path of one part file; a clear error when the manifest or the disk lacks it."""
        p = self.part(part)
        if role not in p.files:
            raise ModelFilesNotFoundError(
                f"bundle part '{part}' has no '{role}' file (it has: {', '.join(sorted(p.files))}).")
        path = self.path_of(p.files[role])
        if not path.is_file():
            raise ModelFilesNotFoundError(
                f"{path} is listed in {keys.BUNDLE_MANIFEST} but missing on disk. Convert the bundle again.",
                str(path))
        expected = p.files[role].bytes
        if path.stat().st_size != expected:
            raise CorruptModelFileError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {expected}: the file is truncated or "
                "was replaced. Convert the bundle again.", str(path))
        return path

    def verify(self) -> list[str]:
        """Check every file's sha256; return the problems found (empty list = all good)."""
        problems = []
        for pname, part in self.parts.items():
            for role, f in part.files.items():
                path = self.path_of(f)
                if not path.is_file():
                    problems.append(f"{pname}/{role}: {f.path} missing")
                elif sha256_file(path) != f.sha256:
                    problems.append(f"{pname}/{role}: {f.path} sha256 mismatch")
        return problems

    def check_files(self) -> list[str]:
        """Cheap checks of every file (existence, size = manifest, ONNX header); the problems found."""
        problems = []
        for pname, part in self.parts.items():
            for role, f in part.files.items():
                path = self.path_of(f)
                if not path.is_file():
                    problems.append(f"{pname}/{role}: {f.path} is missing")
                    continue
                size = path.stat().st_size
                if size != f.bytes:
                    problems.append(f"{pname}/{role}: {f.path} has {size} bytes, the manifest says {f.bytes}")
                elif path.name.endswith(ONNX_SUFFIX) and not onnx_header_ok(path):
                    problems.append(f"{pname}/{role}: {f.path} does not start like an ONNX model (corrupt or "
                                    "overwritten)")
        return problems


def onnx_header_ok(path: Path) -> bool:
    """True when the file starts with an ONNX ModelProto's ir_version field (see ONNX_FIRST_TAG)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == ONNX_FIRST_TAG and 0 < head[1] <= ONNX_MAX_IR_VERSION


def require_intact(bundle: Bundle) -> None:
    """CorruptModelFileError naming every problem of `check_files` (none: returns)."""
    problems = bundle.check_files()
    if problems:
        raise CorruptModelFileError(
            f"bundle {bundle.root} is damaged: " + "; ".join(problems) + ". Convert the bundle again (`minicpmo-edge "
            "convert` or `pull --overwrite`); `minicpmo-edge info BUNDLE --verify` checks every checksum.",
            str(bundle.root))
