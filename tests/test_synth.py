"""Synthetic checkpoints (models/synth.py, models/tokenizers.py) against the golden fixture's official layout.

The golden checkpoint is the exemplar: a tiny build must have its exact tensor set and shapes, its config and
preprocessor keys (and values, dims being the golden dims), its Vocos.pt state_dict layout and its tokenizer
structure. Full-scale shapes are checked from the tensor list and config alone (nothing is written).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from converters.checkpoint import Checkpoint
from edge import keys
from edge.errors import InvalidInputError
from models import synth
from models import tokenizers as toks

REPO = Path(__file__).resolve().parents[1]
# config values that may differ from the golden file: provenance only
CONFIG_KEYS_ALLOWED_TO_DIFFER = {"_name_or_path"}


def _build(root: Path, seed: int = 0) -> Path:
    return synth.build_synthetic_checkpoint(root, "tiny", seed=seed, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("synth") / "tiny")


@pytest.fixture(scope="module")
def tiny_ckpt(tiny) -> Checkpoint:
    return Checkpoint.open(tiny)


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _collapse(name: str) -> str:
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


# --- shapes from config.json, derived independently of models/synth.py ----------------------------------------------
def _shape_rules(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, v, a, t = cfg["hidden_size"], cfg["vision_config"], cfg["audio_config"], cfg["tts_config"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    vh, vf, d, af, th, tf = (v["hidden_size"], v["intermediate_size"], a["d_model"], a["encoder_ffn_dim"],
                             t["hidden_size"], t["intermediate_size"])
    nat, grid = t["num_audio_tokens"], v["image_size"] // v["patch_size"]
    L = r"layers\.\d+\."
    return [
        (r"llm\.(model\.embed_tokens|lm_head)\.weight", (cfg["vocab_size"], h)),
        (rf"llm\.model\.{L}self_attn\.(q|o)_proj\.weight", (h, h)), (rf"llm\.model\.{L}self_attn\.q_proj\.bias", (h,)),
        (rf"llm\.model\.{L}self_attn\.[kv]_proj\.weight", (kv, h)),
        (rf"llm\.model\.{L}self_attn\.[kv]_proj\.bias", (kv,)),
        (rf"llm\.model\.{L}mlp\.(gate|up)_proj\.weight", (cfg["intermediate_size"], h)),
        (rf"llm\.model\.{L}mlp\.down_proj\.weight", (h, cfg["intermediate_size"])),
        (rf"llm\.model\.({L}(input|post_attention)_layernorm|norm)\.weight", (h,)),
        (r"vpm\.embeddings\.patch_embedding\.weight", (vh, 3, v["patch_size"], v["patch_size"])),
        (r"vpm\.embeddings\.position_embedding\.weight", (grid * grid, vh)),
        (rf"vpm\.encoder\.{L}self_attn\.\w+_proj\.weight", (vh, vh)), (rf"vpm\.encoder\.{L}mlp\.fc1\.weight", (vf, vh)),
        (rf"vpm\.encoder\.{L}mlp\.fc1\.bias", (vf,)), (rf"vpm\.encoder\.{L}mlp\.fc2\.weight", (vh, vf)),
        (r"vpm\..*\.(bias|weight)", (vh,)),
        (r"resampler\.query", (cfg["query_num"], h)), (r"resampler\.kv_proj\.weight", (h, vh)),
        (r"resampler\.attn\.in_proj_weight", (3 * h, h)), (r"resampler\.attn\.in_proj_bias", (3 * h,)),
        (r"resampler\.(attn\.out_proj\.weight|proj)", (h, h)), (r"resampler\..*\.(bias|weight)", (h,)),
        (r"apm\.conv1\.weight", (d, a["num_mel_bins"], 3)), (r"apm\.conv2\.weight", (d, d, 3)),
        (r"apm\.embed_positions\.weight", (a["max_source_positions"], d)),
        (rf"apm\.{L}self_attn\.\w+_proj\.weight", (d, d)), (rf"apm\.{L}fc1\.weight", (af, d)),
        (rf"apm\.{L}fc1\.bias", (af,)), (rf"apm\.{L}fc2\.weight", (d, af)), (r"apm\..*\.(bias|weight)", (d,)),
        (r"audio_projection_layer\.linear1\.weight", (h, af // 4)),
        (r"audio_projection_layer\.linear2\.weight", (h, h)), (r"audio_projection_layer\.linear\d\.bias", (h,)),
        (r"tts\.projector\.linear1\.weight", (th, t["llm_dim"])), (r"tts\.projector\.linear2\.weight", (th, th)),
        (r"tts\.projector\.linear\d\.bias", (th,)), (r"tts\.emb_code\.\d+\.weight", (nat, th)),
        (r"tts\.emb_text\.weight", (t["num_text_tokens"], th)),
        (r"tts\.head_code\.\d+\.parametrizations\.weight\.original0", (nat, 1)),
        (r"tts\.head_code\.\d+\.parametrizations\.weight\.original1", (nat, th)),
        (r"tts\.model\.embed_tokens\.weight", (32000, th)),  # LlamaConfig default vocab, unused
        (rf"tts\.model\.{L}self_attn\.\w_proj\.weight", (th, th)),
        (rf"tts\.model\.{L}mlp\.(gate|up)_proj\.weight", (tf, th)),
        (rf"tts\.model\.{L}mlp\.down_proj\.weight", (th, tf)),
        (r"tts\.model\..*norm\.weight", (th,)),
    ]


def _check_shapes(shapes: dict[str, tuple], cfg: dict, golden: Checkpoint) -> None:
    rules = [(re.compile(p), s) for p, s in _shape_rules(cfg)]
    for name, shape in shapes.items():
        if name.startswith("tts.dvae."):  # hard-coded sizes in the official code: same at every scale
            assert shape == golden.tensors[name].shape, name
            continue
        expected = next((s for p, s in rules if p.fullmatch(name)), None)
        assert expected is not None, f"no shape rule for {name}"
        assert shape == expected, (name, shape, expected)
    v, a, t = cfg["vision_config"], cfg["audio_config"], cfg["tts_config"]
    layers = {"llm.model.layers": cfg["num_hidden_layers"], "vpm.encoder.layers": v["num_hidden_layers"],
              "apm.layers": a["encoder_layers"], "tts.model.layers": t["num_hidden_layers"],
              "tts.emb_code": t["num_vq"], "tts.head_code": t["num_vq"]}
    for prefix, n in layers.items():
        found = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
        assert found == set(range(n)), (prefix, sorted(found), n)


# --- layout -------------------------------------------------------------------------------------------------------
def test_tiny_tensor_set_and_shapes_equal_golden(tiny_ckpt, golden_ckpt):
    assert set(tiny_ckpt.names()) == set(golden_ckpt.names())
    assert len(tiny_ckpt.names()) == 395
    for name in golden_ckpt.names():
        assert tiny_ckpt.tensors[name].shape == golden_ckpt.tensors[name].shape, name
        assert tiny_ckpt.tensors[name].dtype == "BF16", name
    _check_shapes({n: i.shape for n, i in tiny_ckpt.tensors.items()}, tiny_ckpt.config, golden_ckpt)


def test_tiny_is_sharded_with_a_consistent_index(tiny, tiny_ckpt):
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in tiny_ckpt.tensors.values())
    for name, info in tiny_ckpt.tensors.items():
        assert info.file.name == index["weight_map"][name]


def test_full_scale_specs_follow_config_without_writing(golden_ckpt):
    specs = synth.tensor_specs(synth.FULL)
    cfg = synth.model_config(synth.FULL, {t: i for i, t in enumerate(toks.chattts_vocab())}, seed=0)
    shapes = {s.name: s.shape for s in specs}
    assert len(shapes) == len(specs)
    assert {_collapse(n) for n in shapes} == {_collapse(n) for n in golden_ckpt.names()}
    _check_shapes(shapes, cfg, golden_ckpt)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (3584, 28, 151700)
    assert cfg["tts_config"]["llm_dim"] == cfg["hidden_size"]
    total = sum(s.nbytes for s in specs)
    assert 8.0e9 < total / 2 < 9.0e9  # "8B parameters" (Qwen2.5-7B + SigLIP-400M + Whisper-medium + ChatTTS)
    shards = synth._plan_shards(specs, synth.FULL.shard_bytes)
    assert len(shards) == 4 and all(sum(s.nbytes for s in sh) <= synth.FULL.shard_bytes for sh in shards)


def test_config_and_preprocessor_cover_golden(tiny, golden_dir):
    def check(mine: dict, ref: dict, path: str = "") -> None:
        for k, v in ref.items():
            assert k in mine, f"missing key {path}{k}"
            if isinstance(v, dict):
                check(mine[k], v, f"{path}{k}.")
            elif path + k not in CONFIG_KEYS_ALLOWED_TO_DIFFER:
                assert mine[k] == v, (path + k, mine[k], v)

    for fname in ("config.json", "preprocessor_config.json", "generation_config.json", "special_tokens_map.json"):
        check(json.loads((tiny / fname).read_text()), json.loads((golden_dir / "ckpt" / fname).read_text()))
    # tokenizer_config: same settings; added token ids are synthetic (the golden list has no <unit>), so compare
    # the decoder entries by content
    mine, ref = (json.loads((r / "tokenizer_config.json").read_text()) for r in (tiny, golden_dir / "ckpt"))
    mine_dec, ref_dec = mine.pop("added_tokens_decoder"), ref.pop("added_tokens_decoder")
    check(mine, ref)
    by_content = {e["content"]: e for e in mine_dec.values()}
    assert all(by_content[e["content"]] == e for e in ref_dec.values())


def test_vocos_state_dict_layout_equals_golden(tiny, golden_dir):
    torch = pytest.importorskip("torch")
    mine = torch.load(tiny / "assets" / "Vocos.pt", weights_only=True)
    ref = torch.load(golden_dir / "ckpt" / "assets" / "Vocos.pt", weights_only=True)
    assert list(mine) == list(ref)
    for k in ref:
        assert (mine[k].shape, mine[k].dtype) == (ref[k].shape, ref[k].dtype), k
    # fixed buffers are the real functions (rounded to bf16), checked against torch / transformers implementations
    from transformers.audio_utils import mel_filter_bank

    hann = torch.hann_window(synth.VOCOS_N_FFT).to(torch.bfloat16)
    assert torch.equal(mine["head.istft.window"], hann)
    assert torch.equal(mine["feature_extractor.mel_spec.spectrogram.window"], hann)
    fb = mel_filter_bank(synth.VOCOS_N_FFT // 2 + 1, synth.VOCOS_MELS, 0.0, synth.VOCOS_SR / 2, synth.VOCOS_SR,
                         norm=None, mel_scale="htk")
    got = mine["feature_extractor.mel_spec.mel_scale.fb"].float().numpy()
    assert np.max(np.abs(got - fb)) <= 2 ** -8 * np.max(fb)  # bf16 has an 8-bit significand


# --- values -------------------------------------------------------------------------------------------------------
def test_values_finite_and_initialised_as_documented(tiny_ckpt):
    for name in tiny_ckpt.names():
        x = tiny_ckpt.f32(name)
        assert np.all(np.isfinite(x)), name
        kind = synth._init_kind(synth.TensorSpec(name, x.shape))
        if name.endswith("original0") or name == "apm.embed_positions.weight" or x.size < 4096:
            continue
        if kind == "ones":
            assert abs(x.mean() - 1) < 0.01 and abs(x.std() - synth.INIT_STD) < 0.1 * synth.INIT_STD, name
        elif kind == "normal":
            assert abs(x.mean()) < 0.005 and abs(x.std() - synth.INIT_STD) < 0.05 * synth.INIT_STD, name
    from transformers.models.whisper.modeling_whisper import sinusoids

    pos = tiny_ckpt.f32("apm.embed_positions.weight")
    assert np.max(np.abs(pos - sinusoids(*pos.shape).numpy())) <= 2 ** -8
    for q in range(tiny_ckpt.config["tts_config"]["num_vq"]):
        p = f"tts.head_code.{q}.parametrizations.weight.original"
        v, g = tiny_ckpt.f32(p + "1"), tiny_ckpt.f32(p + "0")[:, 0]
        np.testing.assert_allclose(g, np.linalg.norm(v, axis=1), rtol=2 ** -8)  # weight = g * v / |v| = v


def test_values_do_not_depend_on_order_or_chunking(tiny_ckpt, monkeypatch):
    specs = {s.name: s for s in synth.tensor_specs(synth.TINY)}
    for name in ("llm.model.embed_tokens.weight", "tts.model.embed_tokens.weight", "vpm.post_layernorm.weight"):
        alone = synth._bf16_tensor(specs[name], 0, synth.WEIGHTS_KEY, specs)
        np.testing.assert_array_equal(alone, np.asarray(tiny_ckpt.raw(name)))
        monkeypatch.setattr(synth, "CHUNK_ELEMS", 1000)
        np.testing.assert_array_equal(synth._bf16_tensor(specs[name], 0, synth.WEIGHTS_KEY, specs), alone)
        monkeypatch.undo()


def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path):
    ref = _file_bytes(tiny)
    assert _file_bytes(_build(tmp_path / "again")) == ref
    # another process with another hash seed: nothing may depend on set/dict iteration order or on the process
    code = ("import sys; from models.synth import build_synthetic_checkpoint as b; "
            "b(sys.argv[1], 'tiny', seed=0, progress=False)")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], check=True, env=env, cwd=REPO)
    assert _file_bytes(tmp_path / "proc") == ref
    other = _file_bytes(_build(tmp_path / "seed1", seed=1))
    assert set(other) == set(ref)
    for k in ref:
        same = other[k] == ref[k]
        assert same == ((k.endswith(".json") and k != "config.json") or k.endswith(".txt")), k


def test_build_errors_and_atomicity(tmp_path, monkeypatch):
    with pytest.raises(InvalidInputError, match="unknown scale"):
        synth.build_synthetic_checkpoint(tmp_path / "x", "huge")
    with pytest.raises(InvalidInputError, match="seed"):
        synth.build_synthetic_checkpoint(tmp_path / "x", "tiny", seed=-1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidInputError, match="not empty"):
        synth.build_synthetic_checkpoint(busy, "tiny", progress=False)
    with pytest.raises(InvalidInputError, match="not a checkpoint"):
        synth.build_synthetic_checkpoint(busy, "tiny", progress=False, overwrite=True)
    assert (busy / "notes.txt").read_text() == "keep me"
    monkeypatch.setattr(synth.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError, match="GB free"):
        synth.build_synthetic_checkpoint(tmp_path / "nospace", "tiny", progress=False)
    assert not (tmp_path / "nospace").exists() and not list(tmp_path.glob(".*.incomplete"))


# --- tokenizers ---------------------------------------------------------------------------------------------------
def test_llm_tokenizer_added_tokens_encode_to_one_id(tiny, golden_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    added = json.loads((tiny / "added_tokens.json").read_text())
    decoder = json.loads((tiny / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    golden_added = json.loads((golden_dir / "ckpt" / "added_tokens.json").read_text())
    required = set(golden_added) | set(keys.RUNTIME_SPECIAL_TOKENS) | {keys.UNIT, keys.DEFAULT_VOICE}
    assert required <= set(added) == set(toks.ADDED_TOKENS)
    vocab_size = json.loads((tiny / "config.json").read_text())["vocab_size"]
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size  # tiny: no unused embedding rows
    for t, i in added.items():
        assert tok.encode(t, add_special_tokens=False).ids == [i], t
        assert tok.encode(f"a{t}b", add_special_tokens=False).tokens[1] == t, t
        assert decoder[str(i)]["content"] == t and decoder[str(i)]["special"] is True
        assert i < vocab_size
    prompt = "<|im_start|>user\n<image><unk></image>hi<unit><|im_end|>\n"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ([added[t] for t in ("<|im_start|>", "<image>", "<unk>", "</image>", "<unit>", "<|im_end|>")]
            == [i for i in ids if i in added.values()])


def test_llm_tokenizer_structure_and_roundtrip(tiny, golden_dir):
    from tokenizers import Tokenizer

    mine = json.loads((tiny / "tokenizer.json").read_text())
    ref = json.loads((golden_dir / "ckpt" / "tokenizer.json").read_text())
    for k in ("normalizer", "pre_tokenizer"):
        assert mine[k] == ref[k], k
    assert mine["model"]["type"] == "BPE" and all(isinstance(m, str) for m in mine["model"]["merges"])
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    golden_cfg = json.loads((golden_dir / "ckpt" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == golden_cfg["chat_template"]
    merges = (tiny / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1:] == mine["model"]["merges"]
    assert json.loads((tiny / "vocab.json").read_text()) == mine["model"]["vocab"]
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    texts = ("Hello world, 你好 👋 café", "Cafe\u0301 x=1e-6;\n\tdef f(): return 42  \r\n", "中文😀🚀 151700")
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert len(tok.encode("The quick brown fox jumps over the lazy dog").ids) < 40  # merges were learned


def test_chattts_tokenizer_matches_golden_structure_and_tts_config(tiny, golden_dir, golden_ref):
    from tokenizers import Tokenizer

    d, gd = tiny / "assets" / "chattts_tokenizer", golden_dir / "ckpt" / "assets" / "chattts_tokenizer"
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in gd.iterdir())
    mine, ref = Tokenizer.from_file(str(d / "tokenizer.json")), Tokenizer.from_file(str(gd / "tokenizer.json"))
    mj, rj = json.loads((d / "tokenizer.json").read_text()), json.loads((gd / "tokenizer.json").read_text())
    for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert mj[k] == rj[k], k
    assert (set(json.loads((d / "tokenizer_config.json").read_text()))
            == set(json.loads((gd / "tokenizer_config.json").read_text())))
    tts = json.loads((tiny / "config.json").read_text())["tts_config"]
    for t in toks.BERT_SPECIAL_TOKENS + toks.CHATTTS_CONTROL_TOKENS:
        assert len(mine.encode(t, add_special_tokens=False).ids) == 1, t
    ids = {t: mine.token_to_id(t) for t in toks.CHATTTS_CONTROL_TOKENS}
    assert ((tts["audio_bos_token_id"], tts["text_eos_token_id"], tts["spk_emb_token_id"])
            == (ids["[Ptts]"], ids["[Etts]"], ids["[spk_emb]"]))
    assert mine.get_vocab_size() <= tts["num_text_tokens"]
    assert (d / "vocab.txt").read_text().splitlines() == toks.chattts_vocab()
    prompt = str(golden_ref["tts_prompt"])  # the official prepare_tts_text output
    got = mine.encode(prompt, add_special_tokens=False)
    assert got.tokens == ref.encode(prompt, add_special_tokens=False).tokens
    assert len(got.ids) == golden_ref["tts_input_ids"].shape[0]
    from transformers import BertTokenizerFast

    fast = BertTokenizerFast.from_pretrained(str(d))
    assert fast(prompt, add_special_tokens=False)["input_ids"] == got.ids


# --- loads in transformers ----------------------------------------------------------------------------------------
def test_llm_tensors_load_into_transformers_qwen2(tiny, tiny_ckpt):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = tiny_ckpt.config
    cfg = Qwen2Config(**{k: c[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
        "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers")})
    model = Qwen2ForCausalLM(cfg).eval()
    state = {n[len("llm."):]: torch.from_numpy(tiny_ckpt.f32(n).copy()) for n in tiny_ckpt.names("llm.")}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in model.state_dict().items():
        assert torch.equal(p, state[name]), name
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    ids = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n").ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), c["vocab_size"]) and torch.isfinite(logits).all()
