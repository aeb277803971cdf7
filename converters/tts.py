"""Export the MiniCPM-o 2.6 TTS (ConditionalChatTTS + DVAE decoder + Vocos) to ONNX graphs and numpy tables.

What is written (under `tts/` in the bundle; roles/names are owned by edge/tts/backbone.py and decoder.py):
- backbone.{fp32,int8}.onnx (+ .weights, external data): the Llama of `tts.model` with explicit past keys/values in,
  the new positions' keys/values out, an additive attention mask and position ids in; works for n-token prefill and
  1-token steps, with any past length (0 included), and the 4 weight-normed `head_code` projections of the last
  position.
- projector.fp32.onnx: `tts.projector` (Linear-ReLU-Linear) + L2 normalisation, as `merge_inputs_embeds` does.
- emb_text.npy, emb_code.npy: embedding tables looked up in numpy.
- dvae.{fp32,int8}.onnx: GFSQ code embedding -> DVAEDecoder -> out_conv -> * coef (the decode path only).
- vocos.{fp32,int8}.onnx: VocosBackbone + ISTFTHead linear, exp/clip magnitude, cos/sin phase (ISTFT in numpy).
- istft_window.npy: `head.istft.window` from `assets/Vocos.pt` (never recomputed, spec §10).
- tokenizer/: copy of `assets/chattts_tokenizer/`.

The graphs are written by converters/tts_graphs.py straight from the checkpoint's tensors (no torch);
`assets/Vocos.pt` is read by the restricted unpickler of converters/torch_pickle.py. int8 = 8-bit blockwise
MatMulNBits for the backbone's projections (a step is 80 matrix-vector products, which MatMulNBits' int8 kernels
run faster than DynamicQuantizeLinear + MatMulInteger, bench/results/tts-full-*.json) and per-channel int8
DynamicQuantizeMatMul for the Linear layers of DVAE and Vocos; each int8 graph is kept only if its probe output
stays within INT8_MIN_COSINE of fp32, and the cosine is recorded in the meta.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters import tts_graphs as G
from converters.checkpoint import Checkpoint
from converters.onnx_graph import Graph, LinearKind, WeightStore, probe_run
from converters.progress import reporter
from converters.torch_pickle import load_state_dict
from edge.bundle import BundleFile, BundlePart
from edge.errors import CorruptModelFileError, ModelFilesNotFoundError
from edge.tts import backbone as B
from edge.tts import decoder as D
from edge.tts.text import TOKENIZER_DIR, TOKENIZER_FILES

log = logging.getLogger("converters.tts")

TTS_DIR = "tts"
VOCOS_FILE = "assets/Vocos.pt"
TOKENIZER_SRC = "assets/chattts_tokenizer"

# Hard-coded sizes of the official code (`initialize_vocos`), spec §1.7.
SAMPLE_RATE = 24000
VOCOS_N_FFT, VOCOS_HOP = 1024, 256
WEIGHTS_ROLE_SUFFIX = ".weights"  # bundle role of a graph's external-data file: "<graph role>.weights"
INT8_MIN_COSINE = 0.99  # below this on the export probe an int8 graph is not written (the runtime uses fp32)

# ConditionalChatTTSConfig defaults (official configuration_minicpm.py) for keys a config.json may omit.
TTS_CONFIG_DEFAULTS = {
    "llm_dim": 2560, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 20, "num_audio_tokens": 626, "num_text_tokens": 21178, "num_mel_bins": 100, "num_vq": 4,
    "use_speaker_embedding": True, "spk_emb_token_id": 21143, "num_spk_embs": 1, "audio_bos_token_id": 21132,
    "text_eos_token_id": 21133, "streaming_text_chunk_size": 10, "streaming_text_reserved_len": 300,
    "streaming_audio_chunk_size": 50, "use_mlp": True, "top_p": 0.7, "top_k": 20, "repetition_penalty": 1.0,
}


@dataclass(frozen=True)
class _Cfg:
    c: dict

    def __getitem__(self, k):
        return self.c.get(k, TTS_CONFIG_DEFAULTS.get(k))


def _run(path: Path, feed: dict) -> list[np.ndarray]:
    return probe_run(path, feed)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def weights_path(graph: Path) -> Path:
    """The external-data file of a graph written with `external=True` (`backbone.fp32.onnx` -> `.weights`)."""
    return graph.with_suffix(".weights")


def _write(path: Path, build, external: bool = False) -> Path:
    """Build one graph into `path`; with `external` its weights stream into `weights_path(path)` while it is
    built (the backbone: hundreds of MB that should never all be in memory at once)."""
    if not external:
        g = Graph(path.stem)
        build(g)
        return g.save(path)
    with WeightStore(weights_path(path)) as store:
        g = Graph(path.stem, store)
        build(g)
        return g.save(path)


def _int8_variant(fp32: Path, build, name: str, feed: dict, progress: bool,
                  external: bool = False) -> tuple[Path | None, float]:
    """Write the int8 graph next to `fp32`; keep it only if its probe outputs stay within INT8_MIN_COSINE."""
    ref = _run(fp32, feed)
    out = _write(fp32.with_name(fp32.name.replace(".fp32.", ".int8.")), build, external)
    cos = min(_cos(a, b) for a, b in zip(_run(out, feed), ref))
    reporter("tts", progress)(f"{name} int8: cosine vs fp32 on the probe = {cos:.5f}")
    if cos < INT8_MIN_COSINE:
        log.warning("tts %s int8 cosine %.4f < %.2f: not written, the runtime will use fp32", name, cos,
                    INT8_MIN_COSINE)
        out.unlink()
        weights_path(out).unlink(missing_ok=True)
        return None, cos
    return out, cos


def _required(cfg: _Cfg) -> list[str]:
    names = ["tts.emb_text.weight", "tts.model.norm.weight", "tts.dvae.coef", "tts.dvae.out_conv.weight",
             "tts.projector.linear1.weight", "tts.projector.linear2.weight"]
    names += [f"tts.emb_code.{q}.weight" for q in range(cfg["num_vq"])]
    names += [f"tts.head_code.{q}.parametrizations.weight.original{j}" for q in range(cfg["num_vq"]) for j in (0, 1)]
    names += [f"tts.model.layers.{i}.self_attn.q_proj.weight" for i in range(cfg["num_hidden_layers"])]
    names += [f"tts.dvae.vq_layer.quantizer.rvqs.{g}.project_out.weight" for g in range(G.FSQ_GROUPS)]
    return names


def _check_config(ckpt: Checkpoint) -> _Cfg:
    if "tts_config" not in ckpt.config:
        raise ModelFilesNotFoundError(f"{ckpt.root}/config.json has no tts_config: this checkpoint has no TTS.")
    cfg = _Cfg(dict(ckpt.config["tts_config"]))
    if not cfg["use_mlp"] or not cfg["use_speaker_embedding"]:
        raise CorruptModelFileError("only the MiniCPM-o 2.6 TTS layout (use_mlp and use_speaker_embedding) is "
                                    "supported; the official code raises NotImplementedError otherwise too.")
    llm_hidden = ckpt.config.get("hidden_size")
    if llm_hidden is not None and llm_hidden != cfg["llm_dim"]:
        raise CorruptModelFileError(
            f"tts_config.llm_dim is {cfg['llm_dim']} but the LLM hidden size is {llm_hidden}; the speaker projector "
            "maps the LLM's <|spk|> state, so they must match (spec §10).")
    ckpt.require(_required(cfg))
    return cfg


def export(ckpt: Checkpoint, out_dir: Path, *, int8: bool = True, progress: bool = True) -> BundlePart:
    """Write the TTS part into `out_dir` (files under `tts/`) and return its BundlePart."""
    cfg = _check_config(ckpt)
    vocos_path, tok_src = ckpt.root / VOCOS_FILE, ckpt.root / TOKENIZER_SRC
    for p in (vocos_path, tok_src / "tokenizer.json"):
        if not p.is_file():
            raise ModelFilesNotFoundError(f"{p} is missing; the TTS needs the checkpoint's assets/ folder "
                                          "(Vocos.pt and chattts_tokenizer/). Download the checkpoint again.", str(p))
    say = reporter("tts", progress)
    out_dir = Path(out_dir)
    (out_dir / TTS_DIR).mkdir(parents=True, exist_ok=True)
    get = ckpt.f32
    dims = G.BackboneDims(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"])
    H, L, NH, hd = dims.hidden, dims.layers, dims.heads, dims.head_dim
    nvq, llm_dim = cfg["num_vq"], cfg["llm_dim"]
    files: dict[str, str] = {}
    int8_cos: dict[str, float] = {}
    rng = np.random.default_rng(0)

    def path(name: str) -> Path:
        return out_dir / TTS_DIR / name

    def rel(p: Path) -> str:
        return p.relative_to(out_dir).as_posix()

    say("tables: emb_text, emb_code; head_code weight norm folded")
    np.save(path("emb_text.npy"), get("tts.emb_text.weight"))
    np.save(path("emb_code.npy"), np.stack([get(f"tts.emb_code.{q}.weight") for q in range(nvq)]))
    heads = np.stack([G.weight_norm(get(f"tts.head_code.{q}.parametrizations.weight.original0"),
                                    get(f"tts.head_code.{q}.parametrizations.weight.original1")) for q in range(nvq)])
    files.update({B.ROLE_EMB_TEXT: "tts/emb_text.npy", B.ROLE_EMB_CODE: "tts/emb_code.npy"})

    say("projector")
    p = _write(path("projector.fp32.onnx"), lambda g: G.projector(g, get, llm_dim))
    files[B.variant_role(B.ROLE_PROJECTOR, "fp32")] = rel(p)

    say(f"backbone: {L} layers, hidden {H}, {NH} heads")
    n, past = 3, 5
    feed = {B.IN_EMBEDS: rng.standard_normal((1, n, H)).astype(np.float32),
            B.IN_POSITIONS: np.arange(past, past + n, dtype=np.int64)[None], B.IN_MASK: B.causal_mask(past, n)}
    for i in range(L):
        for nm in B.past_names(i):
            feed[nm] = (rng.standard_normal((1, NH, past, hd)) * 0.5).astype(np.float32)
    p = _write(path("backbone.fp32.onnx"), lambda g: G.backbone(g, get, dims, heads, LinearKind.FP32), True)
    files[B.variant_role(B.ROLE_BACKBONE, "fp32")] = rel(p)
    files[B.variant_role(B.ROLE_BACKBONE, "fp32") + WEIGHTS_ROLE_SUFFIX] = rel(weights_path(p))
    if int8:
        q8, int8_cos["backbone"] = _int8_variant(
            p, lambda g: G.backbone(g, get, dims, heads, LinearKind.NBITS8), "backbone", feed, progress, True)
        if q8:
            files[B.variant_role(B.ROLE_BACKBONE, "int8")] = rel(q8)
            files[B.variant_role(B.ROLE_BACKBONE, "int8") + WEIGHTS_ROLE_SUFFIX] = rel(weights_path(q8))

    say("dvae decoder")
    n_dvae = len({k.split(".")[4] for k in ckpt.names("tts.dvae.decoder.decoder_block.")})
    p = _write(path("dvae.fp32.onnx"), lambda g: G.dvae(g, get, nvq, n_dvae, LinearKind.FP32))
    files[B.variant_role(D.ROLE_DVAE, "fp32")] = rel(p)
    codes = rng.integers(0, cfg["num_audio_tokens"] - 1, (1, nvq, 16)).astype(np.int64)
    mel = _run(p, {D.DVAE_IN: codes})[0]
    if int8:
        q8, int8_cos["dvae"] = _int8_variant(p, lambda g: G.dvae(g, get, nvq, n_dvae, LinearKind.INT8), "dvae",
                                             {D.DVAE_IN: codes}, progress)
        if q8:
            files[B.variant_role(D.ROLE_DVAE, "int8")] = rel(q8)

    say("vocos backbone + ISTFT head")
    sd = load_state_dict(vocos_path)
    n_voc = len({k.split(".")[2] for k in sd if k.startswith("backbone.convnext.")})
    p = _write(path("vocos.fp32.onnx"), lambda g: G.vocos(g, sd, n_voc, LinearKind.FP32))
    files[B.variant_role(D.ROLE_VOCOS, "fp32")] = rel(p)
    if int8:
        q8, int8_cos["vocos"] = _int8_variant(p, lambda g: G.vocos(g, sd, n_voc, LinearKind.INT8), "vocos",
                                              {D.VOCOS_IN: mel}, progress)
        if q8:
            files[B.variant_role(D.ROLE_VOCOS, "int8")] = rel(q8)
    np.save(path("istft_window.npy"), sd["head.istft.window"])
    files[D.ROLE_ISTFT_WINDOW] = "tts/istft_window.npy"

    (out_dir / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    for fname in TOKENIZER_FILES:
        if (tok_src / fname).is_file():
            shutil.copyfile(tok_src / fname, out_dir / TOKENIZER_DIR / fname)
            files[f"tokenizer/{fname}"] = f"{TOKENIZER_DIR}/{fname}"

    meta = {
        "hidden": H, "num_layers": L, "num_heads": NH, "head_dim": hd, "llm_dim": llm_dim, "num_vq": nvq,
        "num_audio_tokens": cfg["num_audio_tokens"], "num_text_tokens": cfg["num_text_tokens"],
        "audio_bos_token_id": cfg["audio_bos_token_id"], "text_eos_token_id": cfg["text_eos_token_id"],
        "spk_emb_token_id": cfg["spk_emb_token_id"], "num_spk_embs": cfg["num_spk_embs"],
        "use_speaker_embedding": bool(cfg["use_speaker_embedding"]),
        "reserved_len": cfg["streaming_text_reserved_len"], "text_chunk": cfg["streaming_text_chunk_size"],
        "audio_chunk": cfg["streaming_audio_chunk_size"], "top_p": cfg["top_p"], "top_k": cfg["top_k"],
        "repetition_penalty": cfg["repetition_penalty"], "num_mel_bins": cfg["num_mel_bins"],
        "sample_rate": SAMPLE_RATE, "hop_length": VOCOS_HOP, "n_fft": VOCOS_N_FFT, "int8_cosine": int8_cos,
    }
    say(f"done: int8 cosine {int8_cos}")
    return BundlePart({role: BundleFile.describe(out_dir, p) for role, p in files.items()}, meta)
