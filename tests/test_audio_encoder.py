"""Audio encoder ONNX graphs vs the golden fixture and vs transformers' Whisper encoder with the same weights.

Tolerances: float32 `max|out - ref| <= 1e-4 * max|ref|` (golden README) for golden and torch comparisons, and
for streaming vs its exact equivalent (block-causal attention over per-chunk conv features). int8: cosine >= 0.99.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge import keys
from edge.audio_encoder import AudioEncoder, audio_placeholder, chunk_mask, encoder_frames, pooled_tokens
from edge.audio_features import N_FRAMES, log_mel_pieces
from edge.bundle import Bundle
from edge.io.audio import load_audio
from tests.helpers import cosine, rel_err

REL_TOL = 1e-4
INT8_MIN_COSINE = 0.99
CHUNK_MEL = 100  # mel frames per 1-s chunk


@pytest.fixture(scope="session")
def audio_bundle(golden_ckpt, tmp_path_factory):
    """Export once per session into a tmp dir (fp32 + int8)."""
    from converters.audio_encoder import export

    root = tmp_path_factory.mktemp("audio_bundle")
    part = export(golden_ckpt, root, int8=True, progress=False)
    return Bundle(root, keys.BUNDLE_SCHEMA_VERSION, keys.BUNDLE_ARCH, source={}, dims={}, special_tokens={},
                  parts={keys.PART_AUDIO: part})


@pytest.fixture(scope="session")
def enc(audio_bundle):
    return AudioEncoder(audio_bundle, variant="fp32")


@pytest.fixture(scope="session")
def enc_int8(audio_bundle):
    return AudioEncoder(audio_bundle, variant="int8")


# --- golden -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1])
def test_golden_from_reference_mel(enc, golden_ref, k):
    mel = golden_ref[f"wav{k}_mel"]
    chunked = enc.forward(mel, chunked=True)
    full = enc.forward(mel, chunked=False)
    errs = {
        "apm_hidden_chunked": rel_err(chunked.hidden[None], golden_ref[f"wav{k}_apm_hidden_chunked"]),
        "audio_embeds_chunked": rel_err(chunked.embeds, golden_ref[f"wav{k}_audio_embeds_chunked"]),
        "audio_embeds_full": rel_err(full.embeds, golden_ref[f"wav{k}_audio_embeds_full"]),
    }
    print(f"wav{k} rel errors: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    assert max(errs.values()) <= REL_TOL, errs


@pytest.mark.parametrize("k", [0, 1])
def test_golden_end_to_end_from_wav(enc, golden_dir, golden_ref, k):
    """File -> load_audio -> numpy log-mel -> ONNX: the whole audio-in path."""
    wave = load_audio(golden_dir / "inputs" / f"wav{k}.wav")
    embeds = enc.encode_audio(wave, chunked=True)
    err = rel_err(embeds, golden_ref[f"wav{k}_audio_embeds_chunked"])
    print(f"wav{k} end-to-end chunked embeds rel err {err:.2e}")
    assert err <= REL_TOL
    assert audio_placeholder(wave.size).count(keys.UNK) == embeds.shape[0]
    assert audio_placeholder(wave.size) == str(golden_ref[f"wav{k}_placeholder"])


@pytest.mark.parametrize("k", [0, 1])
def test_int8_cosine(enc, enc_int8, golden_ref, k):
    mel = golden_ref[f"wav{k}_mel"]
    c_chunked = cosine(enc_int8.encode(mel, chunked=True), golden_ref[f"wav{k}_audio_embeds_chunked"])
    c_full = cosine(enc_int8.encode(mel, chunked=False), golden_ref[f"wav{k}_audio_embeds_full"])
    c_stream = cosine(_stream_all(enc_int8, mel)[1], _stream_all(enc, mel)[1])
    print(f"wav{k} int8 cosine: chunked {c_chunked:.5f}, full {c_full:.5f}, streaming vs fp32 {c_stream:.5f}")
    assert min(c_chunked, c_full, c_stream) >= INT8_MIN_COSINE


@pytest.fixture(scope="session")
def hf_mel():
    """Mel of one <= 30-s wave by transformers' WhisperFeatureExtractor, called as the official processor."""
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=80)

    def run(wave):
        out = fe([wave], sampling_rate=16_000, return_attention_mask=True, padding="max_length",
                 return_tensors="np")
        return out["input_features"][0][:, : out["attention_mask"][0].sum()]

    return run


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_graphs_share_one_weights_file(audio_bundle, variant):
    """Whole and streaming graphs point at the same tensors of one external-data file (stored once)."""
    import onnx

    from edge.audio_encoder import ROLE_STREAM, ROLE_WEIGHTS, ROLE_WHOLE

    def refs(role):
        model = onnx.load(str(audio_bundle.file(keys.PART_AUDIO, role)), load_external_data=False)
        ext = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
        return {(int(e["offset"]), int(e["length"])) for e in ext}, {e["location"] for e in ext}

    (whole, loc_w), (stream, loc_s) = refs(ROLE_WHOLE[variant]), refs(ROLE_STREAM[variant])
    weights = audio_bundle.file(keys.PART_AUDIO, ROLE_WEIGHTS[variant])
    assert loc_w == loc_s == {weights.name}
    shared = sum(n for _, n in whole & stream)
    assert shared >= 0.99 * sum(n for _, n in stream) and shared >= 0.99 * sum(n for _, n in whole)
    assert weights.stat().st_size == max(o + n for o, n in whole | stream)


# --- transformers reference -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def torch_ref(golden_ckpt):
    """transformers WhisperEncoder + torch projector / AvgPool1d built from the checkpoint's weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    acfg = golden_ckpt.config["audio_config"]
    cfg = transformers.WhisperConfig(**{k: v for k, v in acfg.items() if k not in ("architectures",)})
    cfg._attn_implementation = "eager"
    encoder = transformers.models.whisper.modeling_whisper.WhisperEncoder(cfg).eval()
    state = {n[len("apm."):]: torch.from_numpy(golden_ckpt.f32(n).copy()) for n in golden_ckpt.names("apm.")}
    encoder.load_state_dict(state, strict=True)
    hidden = golden_ckpt.config["hidden_size"]
    proj = torch.nn.Sequential(torch.nn.Linear(acfg["encoder_ffn_dim"] // 4, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden)).eval()
    for i, name in ((0, "linear1"), (2, "linear2")):
        proj[i].weight.data = torch.from_numpy(golden_ckpt.f32(f"audio_projection_layer.{name}.weight").copy())
        proj[i].bias.data = torch.from_numpy(golden_ckpt.f32(f"audio_projection_layer.{name}.bias").copy())
    return encoder, proj, torch.nn.AvgPool1d(2, stride=2)


def torch_forward(ref, mel: np.ndarray, lengths: list[int], *, chunked: bool, conv_chunk: int | None = None):
    """The official `get_audio_embedding` math on transformers modules: padding mask (keys past each item's
    length) OR'd with the 1-s chunk mask when chunked. With conv_chunk, the convolutions run on each
    conv_chunk-frame slice alone (what the streaming path does) before the positions are added."""
    import torch
    import torch.nn.functional as F

    encoder, proj, pool = ref
    x = torch.from_numpy(np.asarray(mel, np.float32))
    with torch.no_grad():
        pieces = [x] if conv_chunk is None else list(torch.split(x, conv_chunk, dim=2))
        feats = [F.gelu(encoder.conv2(F.gelu(encoder.conv1(p)))) for p in pieces]
        h = torch.cat(feats, dim=2).permute(0, 2, 1)
        b, s, _ = h.shape
        h = h + encoder.embed_positions.weight[:s]
        lens = torch.tensor([encoder_frames(n) for n in lengths])
        blocked = torch.arange(s)[None, :] >= lens[:, None]  # (B, S) padded keys
        blocked = blocked[:, None, None, :].expand(b, 1, s, s)
        if chunked:
            blocked = blocked | torch.from_numpy(chunk_mask(s, encoder_frames(CHUNK_MEL)) < 0)[None, None]
        mask = torch.zeros(b, 1, s, s).masked_fill(blocked, float("-inf"))
        for layer in encoder.layers:
            out = layer(h, mask, layer_head_mask=None)
            h = out[0] if isinstance(out, tuple) else out
        hidden = encoder.layer_norm(h)
        embeds = pool(proj(hidden).transpose(1, 2)).transpose(1, 2)
    return hidden.numpy(), embeds.numpy()


@pytest.mark.parametrize("frames", [237, 1000])
@pytest.mark.parametrize("chunked", [False, True])
def test_onnx_matches_transformers(enc, torch_ref, frames, chunked):
    mel = np.random.default_rng(frames).uniform(-1.0, 1.5, size=(1, 80, frames)).astype(np.float32)
    hidden, embeds = torch_forward(torch_ref, mel, [frames], chunked=chunked)
    out = enc.forward(mel[0], chunked=chunked)
    errs = rel_err(out.hidden, hidden[0]), rel_err(out.embeds, embeds[0])
    print(f"{frames} frames chunked={chunked}: hidden {errs[0]:.2e}, embeds {errs[1]:.2e}")
    assert max(errs) <= REL_TOL


def test_full_30s_matches_unmodified_whisper_encoder(enc, torch_ref):
    """transformers' own WhisperEncoder.forward (3000 frames, full attention) as the reference."""
    import torch

    mel = np.random.default_rng(30).uniform(-1.0, 1.5, size=(1, 80, N_FRAMES)).astype(np.float32)
    with torch.no_grad():
        ref = torch_ref[0](torch.from_numpy(mel)).last_hidden_state.numpy()[0]
    out = enc.forward(mel[0], chunked=False)
    err = rel_err(out.hidden, ref)
    print(f"30-s full attention vs WhisperEncoder.forward: {err:.2e}")
    assert err <= REL_TOL and out.embeds.shape == (750, enc.hidden_size)


@pytest.mark.parametrize("short,chunked", [(1503, True), (1501, False)])
def test_batch_padding_rule_for_odd_pieces(enc, torch_ref, short, chunked):
    """A 45-s audio: official batch = [3000 frames, `short` frames padded to 3000]. The odd piece's last
    position sees one conv1 frame of padding; `batch_frames` reproduces it."""
    rng = np.random.default_rng(short)
    batch = np.zeros((2, 80, N_FRAMES), np.float32)
    batch[0] = rng.uniform(-1, 1.5, (80, N_FRAMES))
    batch[1, :, :short] = rng.uniform(-1, 1.5, (80, short))
    _, embeds = torch_forward(torch_ref, batch, [N_FRAMES, short], chunked=chunked)
    n_tok = pooled_tokens(short)
    padded = enc.forward(batch[1, :, :short], chunked=chunked, batch_frames=N_FRAMES).embeds
    alone = enc.forward(batch[1, :, :short], chunked=chunked).embeds
    err = rel_err(padded, embeds[1, :n_tok])
    print(f"odd piece in a padded batch: {err:.2e} (alone differs by {rel_err(alone, embeds[1, :n_tok]):.2e})")
    assert err <= REL_TOL
    if chunked:  # the last position shares a chunk (and a pooled token) with few others: the rule matters
        assert rel_err(alone, embeds[1, :n_tok]) > 10 * REL_TOL


def test_two_audios_in_one_prompt(enc, torch_ref, golden_dir):
    """Two audios of one prompt are one padded batch in the official processor; encode_audio(batch_frames=...)
    reproduces the shorter one's embeddings (odd frame count: 103 frames -> its last token is affected)."""
    from edge.audio_encoder import piece_frames

    long_wave = load_audio(golden_dir / "inputs" / "wav1.wav")
    short_wave = long_wave[: 102 * 160 + 1] * 0.5
    (m_long,), (m_short,) = log_mel_pieces(long_wave), log_mel_pieces(short_wave)
    assert m_short.shape[1] == 103
    batch = np.zeros((2, 80, m_long.shape[1]), np.float32)
    batch[0], batch[1, :, :103] = m_long, m_short
    _, ref = torch_forward(torch_ref, batch, [m_long.shape[1], 103], chunked=True)
    got = enc.encode_audio(short_wave, batch_frames=max(piece_frames(long_wave.size), piece_frames(short_wave.size)))
    assert got.shape == (pooled_tokens(103), enc.hidden_size)
    assert rel_err(got, ref[1, : got.shape[0]]) <= REL_TOL
    assert rel_err(enc.encode_audio(short_wave), ref[1, : got.shape[0]]) > 10 * REL_TOL


# --- streaming --------------------------------------------------------------------------------------------------

def _stream_all(encoder, mel: np.ndarray):
    s = encoder.stream()
    hid, emb = [], []
    for i in range(0, mel.shape[1], CHUNK_MEL):
        e, h = s.step(mel[:, i:i + CHUNK_MEL], return_hidden=True)
        emb.append(e)
        hid.append(h)
    return np.concatenate(hid), np.concatenate(emb), s


@pytest.mark.parametrize("frames", [350, 1037])
def test_streaming_equals_block_causal_over_chunk_convs(enc, torch_ref, frames):
    """The KV cache makes chunk-by-chunk encoding equal to block-causal attention over the whole utterance,
    given the same conv features: per chunk, zero-padded at the chunk borders, as the official streaming path.
    Pooling also runs per chunk there, so the reference pools each chunk's projector output separately."""
    import torch

    mel = np.random.default_rng(frames).uniform(-1.0, 1.5, size=(80, frames)).astype(np.float32)
    hidden, embeds, s = _stream_all(enc, mel)
    sizes = [encoder_frames(min(CHUNK_MEL, frames - i)) for i in range(0, frames, CHUNK_MEL)]
    assert s.cache_length == sum(sizes)
    ref_h, _ = torch_forward(torch_ref, mel[None], [frames], chunked=True, conv_chunk=CHUNK_MEL)
    _, proj, pool = torch_ref
    with torch.no_grad():
        ref_e = [pool(proj(c).transpose(1, 2)).transpose(1, 2)[0].numpy()
                 for c in torch.split(torch.from_numpy(ref_h), sizes, dim=1)]
    errs = rel_err(hidden, ref_h[0]), rel_err(embeds, np.concatenate(ref_e))
    gap = rel_err(hidden, enc.forward(mel, chunked=True).hidden)
    print(f"{frames} frames: streaming vs block-causal over per-chunk convs: hidden {errs[0]:.2e}, embeds "
          f"{errs[1]:.2e}; vs whole-utterance chunk mask (convs see across borders): {gap:.2e}")
    assert max(errs) <= REL_TOL


def test_streaming_first_chunk_equals_whole_graph(enc):
    """With no cache, one chunk through the streaming graph equals the whole graph on that chunk (full mask)."""
    mel = np.random.default_rng(1).uniform(-1.0, 1.5, size=(80, CHUNK_MEL)).astype(np.float32)
    e, h = enc.stream().step(mel, return_hidden=True)
    whole = enc.forward(mel, chunked=False)
    assert rel_err(h, whole.hidden) <= REL_TOL and rel_err(e, whole.embeds) <= REL_TOL


def test_step_audio_uses_each_chunks_own_mel(enc, golden_dir, hf_mel):
    """streaming_prefill runs the processor on each 1-s slice: the second slice's mel is its own, not a slice
    of the whole-utterance mel (they differ at the borders and in the max-8 clamp)."""
    wave = load_audio(golden_dir / "inputs" / "wav1.wav")
    s = enc.stream()
    got = [s.step_audio(wave[i:i + 16_000]) for i in range(0, wave.size, 16_000)]
    ref = enc.stream()
    want = [ref.step(hf_mel(wave[i:i + 16_000])) for i in range(0, wave.size, 16_000)]
    assert [g.shape[0] for g in got] == [25, 25, 25, 12]
    assert max(rel_err(g, w) for g, w in zip(got, want)) <= REL_TOL
    from edge.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="1-s slices"):
        s.step_audio(wave[:16_001])


def test_streaming_reset_rule(enc):
    """cache + new >= 1500 positions -> reset before the chunk (official): 29 chunks fit, the 30th starts over."""
    rng = np.random.default_rng(2)
    mels = [rng.uniform(-1.0, 1.5, size=(80, CHUNK_MEL)).astype(np.float32) for _ in range(31)]
    s = enc.stream()
    lengths = []
    for m in mels[:30]:
        out = s.step(m)
        lengths.append(s.cache_length)
    assert lengths[28] == 29 * 50 and lengths[29] == 50 and s.resets == 1
    fresh = enc.stream().step(mels[29])
    np.testing.assert_array_equal(out, fresh)  # after the reset the chunk sees no history
    s.reset()
    assert s.cache_length == 0


def test_token_counts_and_bad_mel(enc):
    assert pooled_tokens(100) == 25 and pooled_tokens(200) == 50 and pooled_tokens(2) == 0
    assert enc.encode(np.zeros((80, 2), np.float32)).shape == (0, enc.hidden_size)
    assert enc.stream().step(np.zeros((80, 100), np.float32)).shape == (25, enc.hidden_size)
    s = enc.stream()
    assert [s.step(np.zeros((80, t), np.float32)).shape[0] for t in (1, 2, 3, 4, 99)] == [0, 0, 1, 1, 25]
    assert s.cache_length == 1 + 1 + 2 + 2 + 50
    from edge.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="mel must be"):
        enc.encode(np.zeros((64, 100), np.float32))
    with pytest.raises(InvalidInputError, match="frames"):
        enc.encode(np.zeros((80, N_FRAMES + 1), np.float32))
    with pytest.raises(InvalidInputError, match="frames"):
        enc.stream().step(np.zeros((80, 101), np.float32))
    mels = log_mel_pieces(np.zeros(16_000 * 31, np.float32))
    assert [m.shape[1] for m in mels] == [N_FRAMES, 100]
