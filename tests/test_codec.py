"Codec: RVQ switches and their effects, shapes, causal streaming equality, save/load, resume, bad input."
import math

import numpy as np
import pytest
import torch

from speechllm_course.codec import (
    Codebook, Codec, CodecConfig, MultiScaleMelLoss, QuantizerConfig, RandomCrops, ResidualVQ, StreamingCodec,
    receptive_field, train_codec)
from speechllm_course.core import HOP


def tiny(causal=False, **q):
    torch.manual_seed(0)
    return Codec(CodecConfig(channels=4, latent_dim=16, causal=causal, quantizer=dict(levels=3, codebook_size=16, **q))).eval()


def blobs(n=2048, k=16, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 3
    return (centres[torch.randint(k, (n,), generator=g)] + 0.05 * torch.randn(n, dim, generator=g))[None]


# ---- quantizer --------------------------------------------------------------------------------------------------
def test_kmeans_init_finds_the_clusters_and_random_init_does_not():
    x = blobs()
    fixed = Codebook(QuantizerConfig(dim=8, levels=1, codebook_size=16, kmeans_init=True)).train()
    plain = Codebook(QuantizerConfig(dim=8, levels=1, codebook_size=16)).train()
    fixed(x), plain(x)
    used_fixed = len(torch.unique(fixed.eval()(x)[1]))
    used_plain = len(torch.unique(plain.eval()(x)[1]))
    assert used_fixed == 16 and used_plain < 16


def test_dead_codes_are_replaced_by_data_vectors():
    cb = Codebook(QuantizerConfig(dim=8, levels=1, codebook_size=16, dead_code_threshold=0.5)).train()
    with torch.no_grad(): cb.codes[1:] += 100.0  # only code 0 is ever nearest: 15 dead codes
    x = blobs()
    for _ in range(30): cb(x)
    assert cb.replaced >= 15
    assert len(torch.unique(cb.eval()(x)[1])) > 8


def test_ema_moves_codes_to_the_mean_of_their_vectors():
    cfg = QuantizerConfig(dim=2, levels=1, codebook_size=2, ema=True, ema_decay=0.5)
    cb = Codebook(cfg).train()
    with torch.no_grad(): cb.codes.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    x = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]]])
    for _ in range(40): cb(x)
    assert torch.allclose(cb.codes, torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-3)
    assert not isinstance(cb.codes, torch.nn.Parameter)  # EMA codes are not trained by the optimiser


def test_ema_update_runs_in_float32_under_bf16_autocast():
    # the GPU path (train() uses bf16 autocast on CUDA) reproduced on the CPU: a bf16 input once broke the EMA update
    cfg = QuantizerConfig(dim=8, levels=1, codebook_size=16, code_dim=4, ema=True, dead_code_threshold=0.1)
    cb = Codebook(cfg).train()
    x = blobs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3): q, ids, loss = cb(x.bfloat16())
    assert cb.codes.dtype == cb.ema_sum.dtype == torch.float32 and torch.isfinite(cb.codes).all()
    assert q.dtype == torch.float32 and torch.isfinite(loss)
    cb.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16): ids_under_autocast = cb(x)[1]
    assert torch.equal(ids_under_autocast, cb(x)[1]), "the code search must not depend on autocast"


def test_l2_normalised_and_projected_lookup_shapes():
    cb = Codebook(QuantizerConfig(dim=8, levels=1, codebook_size=16, code_dim=3, l2_normalize=True)).eval()
    assert torch.allclose(cb.table().norm(dim=-1), torch.ones(16))
    q, ids, loss = cb(torch.randn(2, 5, 8))
    assert q.shape == (2, 5, 8) and ids.shape == (2, 5) and cb.in_proj.out_features == 3


def test_each_residual_level_lowers_the_error():
    rvq = ResidualVQ(QuantizerConfig(dim=8, levels=4, codebook_size=16, kmeans_init=True)).train()
    x = blobs()
    rvq(x)
    errors = [float((rvq(x, n_levels=n)[0] - x).pow(2).mean()) for n in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_quantizer_dropout_keeps_a_random_number_of_levels():
    rvq = ResidualVQ(QuantizerConfig(dim=8, levels=4, codebook_size=16, quantizer_dropout=1.0)).train()
    x = torch.randn(64, 3, 8)
    rvq.eval()
    outs = {n: rvq(x, n_levels=n)[0] for n in range(1, 5)}
    rvq.train()
    torch.manual_seed(0)
    out, _, _ = rvq(x)
    matches = [min(range(1, 5), key=lambda n: float((out[i] - outs[n][i]).abs().max())) for i in range(64)]
    assert len(set(matches)) >= 3  # examples kept different numbers of levels


def test_straight_through_gradient_reaches_the_input():
    rvq = ResidualVQ(QuantizerConfig(dim=8, levels=2, codebook_size=16))
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, _, loss = rvq(x)
    (out.sum() + loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---- codec ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples, frames", [(3200, 10), (3300, 11), (320, 1)])
def test_shapes_and_frame_rate(samples, frames):
    codec = tiny()
    codes = codec.encode(torch.randn(2, samples) * 0.1)
    assert codes.shape == (2, 3, frames)
    assert codec.decode(codes).shape == (2, frames * HOP)
    assert codec(torch.randn(2, samples) * 0.1).audio.shape == (2, samples)
    assert codec.config.bitrate() == 50 * 3 * 4 and codec.config.bitrate(1) == 200


@pytest.mark.parametrize("chunk_frames", [1, 3])
def test_causal_streaming_equals_full_utterance(chunk_frames):
    codec = tiny(causal=True, kmeans_init=True)
    wav = torch.randn(40 * HOP) * 0.1
    codec.train(); codec(wav[None]); codec.eval()  # k-means init: codes that vary with the input
    full = codec.encode(wav)
    assert len(torch.unique(full[0, 0])) > 2
    enc, dec = StreamingCodec(codec), StreamingCodec(codec)
    step = chunk_frames * HOP
    parts = [enc.encode_chunk(wav[i: i + step]) for i in range(0, len(wav) - step + 1, step)]
    streamed = torch.cat(parts, -1)
    n = streamed.shape[-1]
    assert torch.equal(streamed, full[..., :n])
    audio = torch.cat([dec.decode_chunk(p) for p in parts], -1)
    assert torch.allclose(audio, codec.decode(full)[:, : n * HOP], atol=1e-5)


def test_non_causal_codec_depends_on_the_future_and_causal_does_not():
    wav = torch.randn(20 * HOP) * 0.1
    later = wav.clone(); later[15 * HOP:] += 0.5
    for causal in (False, True):
        codec = tiny(causal=causal)
        a, b = codec.latents(wav), codec.latents(later)
        early_same = torch.allclose(a[:, :15], b[:, :15], atol=1e-6)  # frames before the change
        assert early_same == causal


def test_receptive_field_is_what_the_encoder_sees():
    codec = tiny(causal=True)
    rf = receptive_field(codec.encoder)
    wav = torch.randn(60 * HOP) * 0.1
    z = codec.latents(wav)
    t = 50  # frame t ends at sample (t + 1) * HOP; inputs older than rf before that must not matter
    changed = wav.clone(); changed[: (t + 1) * HOP - rf - 1] = 0.3
    assert torch.allclose(codec.latents(changed)[:, t], z[:, t], atol=1e-6)
    changed2 = wav.clone(); changed2[(t + 1) * HOP - rf: (t + 1) * HOP - rf + HOP] += 1.0  # the far edge is still seen
    assert not torch.allclose(codec.latents(changed2)[:, t], z[:, t], atol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    codec = tiny(ema=True, kmeans_init=True, dead_code_threshold=0.1)
    codec.train(); codec(torch.randn(2, 3200) * 0.1); codec.eval()
    codec.save_pretrained(tmp_path / "codec")
    again = Codec.from_pretrained(tmp_path / "codec").eval()
    wav = torch.randn(1, 6400) * 0.1
    assert torch.equal(again.encode(wav), codec.encode(wav))
    assert torch.equal(again(wav).audio, codec(wav).audio)
    for a, b in zip(again.quantizer.levels, codec.quantizer.levels):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.usage, b.usage) and bool(a.initialized)


def test_training_lowers_the_loss_and_resumes(tmp_path):
    wavs = [np.sin(2 * np.pi * f * np.arange(8000) / 16000).astype(np.float32) * 0.5 for f in (200, 300, 450, 700)]
    codec = tiny(kmeans_init=True)
    hist = train_codec(codec, wavs, steps=30, batch_size=4, crop_seconds=0.2, lr=3e-3, progress=False,
                       ckpt_dir=str(tmp_path / "ck"), ckpt_every=15)
    assert hist.losses[-1] < hist.losses[0]
    again = tiny(kmeans_init=True)
    hist2 = train_codec(again, wavs, steps=35, batch_size=4, crop_seconds=0.2, progress=False, ckpt_dir=str(tmp_path / "ck"), ckpt_every=15)
    assert hist2.resumed_from == 30


def test_mel_loss_is_zero_on_identical_audio_and_positive_otherwise():
    loss = MultiScaleMelLoss()
    x = torch.randn(2, 8000) * 0.1
    assert float(loss(x, x)) == 0.0 and float(loss(x, 0.5 * x)) > 0


def test_random_crops_pad_short_and_cut_long():
    batch = RandomCrops(1000)([np.ones(500, np.float32), np.arange(3000, dtype=np.float32)])
    assert batch.shape == (2, 1000) and batch[0, 500:].abs().sum() == 0 and batch[1, 1] - batch[1, 0] == 1


@pytest.mark.parametrize("call, words", [
    (lambda c: c.encode(torch.full((1, 3200), float("nan"))), ["audio", "finite"]),
    (lambda c: c.encode(torch.zeros(2, 3, 3200)), ["audio", "(batch, samples)"]),
    (lambda c: c.encode(torch.zeros(0, 3200)), ["audio", "non-empty"]),
    (lambda c: c.encode(torch.zeros(1, 2, 3200)), ["audio", "(batch, samples)", "(1, 2, 3200)"]),  # stereo
    (lambda c: c.encode(torch.zeros(1, 3200), sample_rate=22050), ["sample_rate", "16000", "22050"]),
    (lambda c: c(torch.zeros(1, 3200), sample_rate=8000), ["sample_rate", "16000", "8000"]),
    (lambda c: c.encode(torch.zeros(1, 100)), ["audio", "320 samples", "100"]),
    (lambda c: c(torch.zeros(1, 3200), n_levels=4), ["n_levels", "[1, 3]", "4"]),
    (lambda c: c(torch.zeros(1, 3200), n_levels=0), ["n_levels", "[1, 3]"]),
    (lambda c: c.decode(torch.full((1, 1, 5), 16)), ["ids", "[0, 16)"]),
    (lambda c: c.decode(torch.zeros(1, 4, 5, dtype=torch.long)), ["ids", "1..3 levels"]),
    (lambda c: c.quantizer(torch.zeros(1, 5, 7)), ["z", "16"]),
    (lambda c: CodecConfig(strides=(2, 4, 5)), ["strides", "320"]),
    (lambda c: CodecConfig(channels=5), ["channels", "even"]),
    (lambda c: CodecConfig(quantizer=dict(codebook_size=1)), ["codebook_size", "at least 2"]),
    (lambda c: QuantizerConfig(quantizer_dropout=1.5), ["quantizer_dropout", "[0, 1]"]),
    (lambda c: QuantizerConfig(ema_decay=1.0), ["ema_decay", "(0, 1)"]),
    (lambda c: QuantizerConfig(code_dim=0), ["code_dim", "positive"]),
    (lambda c: QuantizerConfig(dead_code_threshold=-1), ["dead_code_threshold", ">= 0"]),
    (lambda c: StreamingCodec(c), ["codec", "causal"]),
    (lambda c: StreamingCodec(tiny(causal=True)).encode_chunk(torch.zeros(100)), ["chunk", "multiple of 320"]),
    (lambda c: train_codec(c, [], steps=1), ["wavs", "non-empty"]),
    (lambda c: train_codec(c, [np.full(4000, np.nan, np.float32)], steps=1), ["wavs", "finite"]),
    (lambda c: train_codec(c, [np.zeros(4000, np.float32)], steps=1, crop_seconds=0.001), ["crop_seconds", "one frame"]),
    (lambda c: MultiScaleMelLoss()(torch.zeros(1, 100), torch.zeros(1, 120)), ["estimate", "(1, 120)"]),
])
def test_bad_input_errors(call, words):
    with pytest.raises(ValueError) as e: call(tiny())
    assert all(w in str(e.value) for w in words), str(e.value)
