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
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edge import keys
from edge.errors import BundleVersionError, CorruptModelFileError, ModelFilesNotFoundError

_HASH_BLOCK = 1 << 22


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
        return cls(root, version, d["arch"], d.get("source", {}), d.get("dims", {}),
                   dict(d.get("special_tokens", {})), parts)

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
        path = self.root / p.files[role].path
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
                path = self.root / f.path
                if not path.is_file():
                    problems.append(f"{pname}/{role}: {f.path} missing")
                elif sha256_file(path) != f.sha256:
                    problems.append(f"{pname}/{role}: {f.path} sha256 mismatch")
        return problems
