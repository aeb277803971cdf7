"""The package's layering, enforced: every import in edge/ (function-local ones included) points to the same layer
or a lower one, the server imports nothing of live mode, nothing outside edge/server/ imports the server, and
there are no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

EDGE = REPO / "edge"
# Bottom to top. A module may import modules of its own layer and of the layers below.
LAYERS: list[tuple[str, set[str]]] = [
    ("constants, errors, options, events", {"edge.constants", "edge.errors", "edge.keys", "edge.options",
                                            "edge.events"}),
    ("stages", {"edge.bundle", "edge.onnx_session", "edge.llm", "edge.token_rows", "edge.sampling",
                "edge.image_preprocess", "edge.audio_features", "edge.audio_encoder", "edge.vision", "edge.tts",
                "edge.io"}),
    ("prompt, content, official rules, profiles", {"edge.prompt", "edge.chat_template", "edge.content",
                                                   "edge.streaming_rules", "edge.voice", "edge.turns", "edge.governor",
                                                   "edge.profiles"}),
    ("runtime", {"edge.runtime"}),
    ("session", {"edge.session", "edge.streaming"}),
    ("facade", {"edge.omni", "edge"}),  # the package root: `from edge import Omni`
    ("apps and server", {"edge.cli", "edge.demo", "edge.chat_repl", "edge.live", "edge.orchestrator",
                         "edge.default_bundle", "edge.server"}),
]
LIVE_MODE = {"edge.live", "edge.orchestrator", "edge.chat_repl", "edge.demo", "edge.cli"}
ENTRY_POINT = "edge.cli"  # the command line starts every app, the server included


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """The layer of a module: its own entry or that of the nearest package listed (edge.tts.text -> edge.tts)."""
    name = module
    while True:
        for i, (_, members) in enumerate(LAYERS):
            if name in members:
                return i
        if "." not in name:
            raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
        name = name.rsplit(".", 1)[0]


def _imports(path: Path) -> set[str]:
    """edge modules imported anywhere in the file (`from edge import keys` counts as edge.keys)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "edge"}
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                and node.module.split(".")[0] == "edge"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (EDGE.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (EDGE.parent / sub.replace(".", "/")).is_dir() else node.module)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(EDGE.rglob("*.py"))}


def test_every_import_points_down_the_layers():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if dep != mod and _layer(dep) > _layer(mod):
                bad.append(f"{mod} ({LAYERS[_layer(mod)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not bad, "\n".join(sorted(bad))


def test_server_and_live_mode_stay_apart():
    bad = []
    for mod, deps in _graph().items():
        in_server = mod.startswith("edge.server")
        for dep in deps:
            if in_server and any(dep == m or dep.startswith(m + ".") for m in LIVE_MODE):
                bad.append(f"the server module {mod} imports {dep} (live mode / apps)")
            if not in_server and mod != ENTRY_POINT and dep.startswith("edge.server"):
                bad.append(f"{mod} imports the server ({dep})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    full = _graph()
    graph = {m: {d for d in deps if d in full} for m, deps in full.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if dep == node or dep == "edge":
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The walker is not blind: a stage importing the facade is reported."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from edge.omni import Omni\n    from edge import keys\n")
    assert _imports(f) == {"edge.omni", "edge.keys"}
    assert _layer("edge.omni") > _layer("edge.llm")
