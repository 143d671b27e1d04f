"Chapter 07: audio checks, speaker encoder, flow-matching decoder, Griffin-Lim vocoder, HuBERT units, the pipeline, babbling tools, bad input."
import math

import numpy as np
import pytest
import torch

from speechllm_course.core import HOP, SAMPLE_RATE
from speechllm_course.features import LogMel
from speechllm_course.resynth import (
    GriffinLimVocoder, HubertUnits, PhoneTrigram, SpeakerEncoder, SpeakerEncoderConfig, UnitToMel, UnitToMelConfig, UnitToSpeech,
    babble, check_wav, deinterleave_levels, interleave_levels, speaker_similarity, train_speaker_encoder, train_unit_to_mel)
from speechllm_course.ssl import HubertForMaskedPrediction, hubert_config
from speechllm_course.units import KMeans, UnitLMConfig, train_unit_lm


def _voice(f0: float, bright: float, seconds: float, seed: int) -> np.ndarray:
    "A buzzy vowel-like sound: harmonics of f0 with a spectral tilt; two (f0, bright) settings = two 'speakers'."
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f = f0 * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(2, 5) * t))
    phase = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
    y = sum(np.sin(k * phase) * bright ** k for k in range(1, 20))
    y = y + 0.01 * rng.standard_normal(len(t))
    return (0.5 * y / np.abs(y).max()).astype(np.float32)


@pytest.fixture(scope="module")
def two_speakers():
    wavs = [_voice(110, 0.9, 0.6 + 0.1 * (i % 3), i) for i in range(12)] + [_voice(230, 0.6, 0.6 + 0.1 * (i % 3), 100 + i) for i in range(12)]
    return wavs, [0] * 12 + [1] * 12


@pytest.fixture(scope="module")
def tiny_units():
    torch.manual_seed(0)
    enc = HubertForMaskedPrediction(hubert_config(hidden_size=32, num_layers=2, num_heads=2, conv_dim=8, num_clusters=10, final_dim=8)).eval()
    wavs = [_voice(110 + 20 * i, 0.8, 0.5, i) for i in range(4)]
    from speechllm_course.ssl import hidden_layers
    feats = torch.cat([hidden_layers(enc, w)[1] for w in wavs])
    mean, std = feats.mean(0), feats.std(0) + 1e-5
    km = KMeans(6, 32).fit((feats - mean) / std, max_iter=5)
    return HubertUnits(enc, 1, km, mean.numpy(), std.numpy())


@pytest.mark.parametrize("wav, kwargs, words", [
    (np.zeros((2, 800), np.float32), {}, "mono"),
    (np.zeros(HOP - 1, np.float32), {}, "at least 320 samples"),
    (np.full(800, np.nan, np.float32), {}, "finite"),
    (np.zeros(800, np.int16), {}, "float waveform"),
    (np.zeros(800, np.float32), dict(sample_rate=22050), "16000 Hz"),
    ([0.0] * 800, {}, "numpy array or torch tensor"),
])
def test_check_wav_rejects_bad_audio_with_a_clear_message(wav, kwargs, words):
    with pytest.raises(ValueError, match=words):
        check_wav(wav, **kwargs)


def test_check_wav_accepts_one_channel_arrays():
    assert check_wav(np.zeros((1, 640), np.float32)).shape == (640,)
    assert check_wav(torch.zeros(640, 1, dtype=torch.float64)).dtype == torch.float32


def test_speaker_encoder_separates_two_voices_and_round_trips(two_speakers, tmp_path):
    wavs, ids = two_speakers
    mels = [LogMel()(torch.from_numpy(w)).T for w in wavs]
    torch.manual_seed(0)
    enc = SpeakerEncoder(SpeakerEncoderConfig(hidden_size=16, embedding_dim=8, num_speakers=2)).fit_normalisation(mels)
    hist = train_speaker_encoder(enc, mels, ids, steps=30, batch_size=8, crop_frames=20, progress=False)
    assert hist.losses[-1] < hist.losses[0]
    e = enc.embed(wavs)
    assert e.shape == (24, 8) and torch.allclose(e.norm(dim=-1), torch.ones(24), atol=1e-5)
    cos = e @ e.T
    same = torch.tensor(ids)[:, None] == torch.tensor(ids)[None]
    assert cos[same].mean() > cos[~same].mean() + 0.2  # the two voices land apart
    assert speaker_similarity(enc, wavs[:3], wavs[:3]) == pytest.approx(np.ones(3), abs=1e-5)
    enc.save_pretrained(tmp_path / "spk")
    again = SpeakerEncoder.from_pretrained(tmp_path / "spk")
    assert torch.allclose(again.embed(wavs[0]), enc.embed(wavs[0]), atol=1e-6)


def test_speaker_encoder_bad_input(two_speakers):
    wavs, ids = two_speakers
    enc = SpeakerEncoder(SpeakerEncoderConfig(hidden_size=8, embedding_dim=4, num_speakers=2))
    mels = [LogMel()(torch.from_numpy(w)).T for w in wavs[:2]]
    with pytest.raises(ValueError, match="speakers"): train_speaker_encoder(enc, mels, [0, 5], steps=1)
    with pytest.raises(ValueError, match="speakers"): train_speaker_encoder(enc, mels, [0], steps=1)
    with pytest.raises(ValueError, match="num_speakers"): SpeakerEncoderConfig(num_speakers=1)
    with pytest.raises(ValueError, match="wavs"): enc.embed([])
    with pytest.raises(ValueError, match=r"wavs\[1\]"): enc.embed([wavs[0], np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="wavs_b"): speaker_similarity(enc, wavs[:2], wavs[:1])


def _toy_decoder(speaker_dim=3):
    torch.manual_seed(0)
    return UnitToMel(UnitToMelConfig(num_units=5, speaker_dim=speaker_dim, n_mels=6, hidden_size=16, num_heads=2, num_layers=1))


def test_flow_velocity_ignores_padding():
    m = _toy_decoder()
    u = torch.randint(0, 5, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool); mask[1, 6:] = False
    x, t, s = torch.randn(2, 9, 6), torch.rand(2), torch.randn(2, 3)
    u2, x2 = u.clone(), x.clone()
    u2[1, 6:], x2[1, 6:] = 4 - u2[1, 6:], 0.0
    a, b = m.velocity(x, t, u, s, mask), m.velocity(x2, t, u2, s, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-5)


def test_generate_is_deterministic_given_a_generator_and_survives_save_load(tmp_path):
    m = _toy_decoder()
    u, s = torch.randint(0, 5, (2, 7)), torch.randn(2, 3)
    g = lambda: torch.Generator().manual_seed(5)
    a = m.generate(u, s, steps=3, generator=g())
    assert torch.equal(a, m.generate(u, s, steps=3, generator=g()))
    assert not torch.equal(a, m.generate(u, s, steps=3, generator=torch.Generator().manual_seed(6)))
    m.save_pretrained(tmp_path / "dec")
    again = UnitToMel.from_pretrained(tmp_path / "dec")
    assert torch.allclose(again.generate(u, s, steps=3, generator=g()), a, atol=1e-5)
    cold = [m.generate(u, s, steps=3, temperature=0.0, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
    assert torch.equal(cold[0], cold[1]) and not torch.equal(cold[0], a)  # no starting noise: the seed no longer matters


def test_decoder_without_speaker_conditioning():
    m = _toy_decoder(speaker_dim=0)
    u = torch.randint(0, 5, (3, 8))
    assert m.generate(u, steps=2).shape == (3, 8, 6)
    assert torch.isfinite(m(u, torch.randn(3, 8, 6), torch.ones(3, 8, dtype=torch.bool))["loss"])


def test_unit_to_mel_training_lowers_the_loss_and_resumes(tmp_path):
    m = _toy_decoder()
    g = torch.Generator().manual_seed(0)
    units = [torch.randint(0, 5, (int(n),), generator=g) for n in (12, 30, 20, 8)]
    mels = [torch.nn.functional.one_hot(u, 5).float()[:, [0, 1, 2, 3, 4, 0]] * 2 for u in units]
    voices = [torch.randn(3) for _ in units]
    h1 = train_unit_to_mel(m, units, mels, voices, steps=4, batch_size=2, max_frames=10, progress=False, ckpt_dir=str(tmp_path), ckpt_every=2)
    h2 = train_unit_to_mel(m, units, mels, voices, steps=80, batch_size=2, max_frames=10, progress=False, ckpt_dir=str(tmp_path), ckpt_every=40)
    assert h2.resumed_from == 4 and h2.steps[-1] == 80
    assert np.mean(h2.losses[-10:]) < np.mean(h1.losses[:2])


@pytest.mark.parametrize("call, words", [
    (lambda m: m.generate(torch.full((1, 4), 5), torch.zeros(1, 3)), r"units.*\[0, 5\)"),
    (lambda m: m.generate(torch.zeros(1, 4).float(), torch.zeros(1, 3)), "int64 unit ids"),
    (lambda m: m.generate(torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 3)), "speaker"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long)), "speaker"),
    (lambda m: m.generate(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3), steps=0), "steps"),
    (lambda m: m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, 6), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 3)), "mels"),
    (lambda m: train_unit_to_mel(m, [torch.zeros(4, dtype=torch.long)], [torch.zeros(3, 6)], [torch.zeros(3)], steps=1), r"mels\[0\]"),
    (lambda m: train_unit_to_mel(m, [torch.zeros(4, dtype=torch.long)], [torch.zeros(4, 6)], None, steps=1), "speakers"),
    (lambda m: UnitToMelConfig(hidden_size=15, num_heads=2), "hidden_size"),
])
def test_decoder_bad_input_names_the_argument(call, words):
    with pytest.raises(ValueError, match=words):
        call(_toy_decoder())


def test_griffin_lim_keeps_the_spectrum_and_the_callers_rng():
    w = _voice(150, 0.8, 0.8, 0)
    voc = GriffinLimVocoder(n_iter=16)
    mel = LogMel()(torch.from_numpy(w)).T
    torch.manual_seed(123); expected = torch.rand(3)
    torch.manual_seed(123); y = voc(mel, len(w)); after = torch.rand(3)
    assert torch.equal(expected, after)  # the vocoder's fixed phase seed does not touch the global RNG
    assert y.shape == w.shape and y.dtype == np.float32
    assert np.array_equal(y, voc(mel, len(w)))
    from speechllm_course.codec import mel_distance
    assert mel_distance(y, w) < 0.5 * mel_distance(np.zeros_like(w) + 1e-4 * np.random.default_rng(0).standard_normal(len(w)).astype(np.float32), w)
    assert len(voc(mel)) == len(mel) * HOP
    with pytest.raises(ValueError, match="log_mel"): voc(torch.zeros(5, 40))
    with pytest.raises(ValueError, match="log_mel"): voc(torch.full((5, 80), float("nan")))
    with pytest.raises(ValueError, match="log_mel: expected at least one frame"): voc(torch.zeros(0, 80))  # an answer with no units
    with pytest.raises(ValueError, match="upsample"): GriffinLimVocoder(upsample=3)


@pytest.mark.parametrize("upsample", [1, 4])
def test_griffin_lim_speaks_a_single_frame(upsample):
    "One 20 ms frame (a one-unit answer) is shorter than the STFT's reflect padding: it still comes out, 320 samples."
    voc = GriffinLimVocoder(n_iter=4, upsample=upsample)
    mel = LogMel()(torch.from_numpy(_voice(150, 0.8, 0.8, 0))).T
    one = voc(mel[:1])
    assert one.shape == (HOP,) and np.isfinite(one).all() and np.abs(one).max() > 0
    assert voc.min_frames == 2 and voc(mel[:2]).shape == (2 * HOP,)  # two frames already fit


def test_hubert_units_frame_grid_determinism_and_round_trip(tiny_units, tmp_path):
    w = _voice(140, 0.8, 0.7, 9)
    u = tiny_units(w)
    assert u.shape == (len(w) // HOP,) and u.dtype == torch.long and 0 <= int(u.min()) and int(u.max()) < 6
    assert torch.equal(u, tiny_units(w))
    tiny_units.save_pretrained(tmp_path / "units")
    again = HubertUnits.from_pretrained(tmp_path / "units", tiny_units.encoder)
    assert torch.equal(again(w), u) and again.layer == 1
    with pytest.raises(ValueError, match="sample_rate"): tiny_units(w, sample_rate=8000)
    with pytest.raises(ValueError, match="mean"): HubertUnits(tiny_units.encoder, 1, tiny_units.kmeans, np.zeros(3), np.ones(3))


def test_pipeline_synthesizes_to_length_and_checks_its_parts(tiny_units):
    spk = SpeakerEncoder(SpeakerEncoderConfig(hidden_size=8, embedding_dim=4, num_speakers=2))
    dec = UnitToMel(UnitToMelConfig(num_units=6, speaker_dim=4, hidden_size=16, num_heads=2, num_layers=1))
    pipe = UnitToSpeech(tiny_units, spk, dec, GriffinLimVocoder(n_iter=2))
    w = _voice(120, 0.8, 0.5, 3) [:7777]
    y = pipe.resynthesize(w, voice_of=_voice(200, 0.7, 0.4, 4), steps=2)
    assert y.shape == w.shape and np.isfinite(y).all()
    assert len(pipe.synthesize([0, 1, 2], pipe.voice(w), steps=1)) == 3 * HOP
    with pytest.raises(ValueError, match="units"): pipe.synthesize([], pipe.voice(w))
    with pytest.raises(ValueError, match="steps"): pipe.synthesize([0, 1], pipe.voice(w), steps=0)
    with pytest.raises(ValueError, match="decoder"):
        UnitToSpeech(tiny_units, spk, UnitToMel(UnitToMelConfig(num_units=7, speaker_dim=4, hidden_size=16, num_heads=2, num_layers=1)))
    with pytest.raises(ValueError, match="speaker_encoder"):
        UnitToSpeech(tiny_units, spk, UnitToMel(UnitToMelConfig(num_units=6, speaker_dim=5, hidden_size=16, num_heads=2, num_layers=1)))


def test_interleaving_round_trips_and_rejects_bad_codes():
    codes = torch.randint(0, 16, (4, 9))
    assert torch.equal(deinterleave_levels(interleave_levels(codes, 16), 4, 16), codes)
    with pytest.raises(ValueError, match="codes"): interleave_levels(torch.tensor([[16]]), 16)
    with pytest.raises(ValueError, match="codes"): interleave_levels(torch.zeros(3, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="whole frames"): deinterleave_levels([0, 1, 2], 2, 16)
    with pytest.raises(ValueError, match="wrong level"): deinterleave_levels([16, 0], 2, 16)


def test_phone_trigram_prefers_the_training_order():
    lm = PhoneTrigram().fit([["a", "b", "c", "d"]] * 10 + [["sil", "a", "b", "sil"]])
    assert lm.perplexity([["a", "b", "c", "d"]]) < lm.perplexity([["d", "c", "b", "a"]])
    assert lm.perplexity([["a", "b", "sil", "c", "d"]]) == pytest.approx(lm.perplexity([["a", "b", "c", "d"]]))  # silences are not phones
    assert np.isfinite(lm.perplexity([["zz"]]))  # unknown phones are scored as <unk>
    with pytest.raises(ValueError, match="weights"): PhoneTrigram((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="transcripts"): PhoneTrigram().fit([[]])
    with pytest.raises(RuntimeError, match="fit"): PhoneTrigram().perplexity([["a"]])


def test_phone_trigram_cross_entropy_is_the_log_perplexity_with_a_standard_error():
    lm = PhoneTrigram().fit([["a", "b", "c", "d"]] * 10 + [["d", "c"]])
    babble = [["a", "b", "c", "d"], ["d", "c", "b", "a"], ["a", "b"], ["c", "a", "d"]]
    h, se = lm.cross_entropy(babble)
    assert h == pytest.approx(math.log(lm.perplexity(babble))) and se > 0
    h_same, se_same = lm.cross_entropy([["a", "b", "c", "d"]] * 4)
    assert se_same == pytest.approx(0, abs=1e-12) and h_same < h  # identical transcripts: no spread
    # with more transcripts of the same kind the standard error shrinks like 1/sqrt(n)
    assert lm.cross_entropy(babble * 9)[1] == pytest.approx(se * math.sqrt((36 / 35) / (4 / 3)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="transcripts"): lm.cross_entropy([["a"]])


def test_babble_has_the_length_and_the_constraints():
    lm, _ = train_unit_lm([[0, 3, 1, 2] * 4] * 12, 4, UnitLMConfig(layers=1, dim=16, heads=2, steps=3, batch_size=4), progress=False)
    a = babble(lm, 4, 5, 8, allowed=[range(0, 2), range(2, 4)], seed=3)
    assert len(a) == 5 and all(len(x) == 8 for x in a)
    assert all(t < 2 for x in a for t in x[0::2]) and all(2 <= t < 4 for x in a for t in x[1::2])
    assert a == babble(lm, 4, 5, 8, allowed=[range(0, 2), range(2, 4)], seed=3)  # seeded
    with pytest.raises(ValueError, match="length"): babble(lm, 4, 2, 0)
    with pytest.raises(ValueError, match="allowed"): babble(lm, 4, 2, 3, allowed=[range(0, 5)])
