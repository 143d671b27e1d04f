"Chapter 06c: event clips, patches, the random-projection tokenizer, masked prediction, the distilled tokenizer, agreement measures, bad input."
import numpy as np
import pytest
import torch

from speechllm_course.audio_tokens import (
    AUDIO_VARIANTS, PATCH_FRAMES, AudioEncoder, AudioEncoderConfig, AudioTokenizer, AudioTokenizerConfig,
    RandomProjectionTokenizer, RandomProjectionTokenizerConfig, encoder_features, event_clip, event_clips, log_mel_patches,
    agreement_counts, agreement_from_counts, random_patch_mask, token_agreement, token_histogram, train_audio_encoder, train_audio_tokenizer)
from speechllm_course.core import HOP
from speechllm_course.world import EVENT_KINDS


@pytest.fixture(scope="module")
def clips():
    return event_clips(4, seed=0)


def test_event_clips_are_deterministic_balanced_and_finite(clips):
    wavs, labels = clips
    again, labels2 = event_clips(4, seed=0)
    assert np.array_equal(labels, labels2) and all(np.array_equal(a, b) for a, b in zip(wavs, again))
    assert np.bincount(labels, minlength=len(EVENT_KINDS)).tolist() == [4] * len(EVENT_KINDS)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() and np.abs(w).max() <= 1 for w in wavs)
    other, _ = event_clips(4, seed=1)
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(wavs, other))


def test_variants_keep_length_and_change_what_they_say(clips):
    w = clips[0][0]
    for name, fn in AUDIO_VARIANTS.items():
        v = fn(w)
        assert len(v) == len(w), name
    assert np.allclose(AUDIO_VARIANTS["-12 dB"](w), w * 10 ** (-12 / 20))
    assert np.array_equal(AUDIO_VARIANTS["original"](w), w)


def test_patches_cover_whole_patches_only():
    n = 10 * PATCH_FRAMES * HOP + 500
    p = log_mel_patches(np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.1)
    assert p.shape == (10, PATCH_FRAMES * 80) and torch.isfinite(p).all()


def test_random_projection_tokenizer_is_fixed_by_its_seed_and_survives_save_load(tmp_path, clips):
    a = RandomProjectionTokenizer(RandomProjectionTokenizerConfig(codebook_size=32, seed=3))
    b = RandomProjectionTokenizer(RandomProjectionTokenizerConfig(codebook_size=32, seed=3))
    c = RandomProjectionTokenizer(RandomProjectionTokenizerConfig(codebook_size=32, seed=4))
    patches = [log_mel_patches(w) for w in clips[0]]
    for m in (a, b, c): m.fit_normalisation(patches)
    w = clips[0][0]
    assert torch.equal(a.tokenize(w), b.tokenize(w)) and not torch.equal(a.tokenize(w), c.tokenize(w))
    assert len(a.tokenize(w)) == len(log_mel_patches(w)) and int(a.tokenize(w).max()) < 32
    assert not any(p.requires_grad for p in a.parameters())
    a.save_pretrained(tmp_path)
    assert torch.equal(RandomProjectionTokenizer.from_pretrained(tmp_path).tokenize(w), a.tokenize(w))


def test_random_patch_mask_hides_the_right_number_of_real_patches_only():
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10], mask[1, :5], mask[2, :1] = True, True, True
    hidden = random_patch_mask(mask, 0.6, torch.Generator().manual_seed(0))
    assert hidden.sum(1).tolist() == [6, 3, 1]
    assert not (hidden & ~mask).any()


def test_masked_prediction_learns_context_and_only_scores_masked_patches(clips):
    torch.manual_seed(0)
    patches = [log_mel_patches(w) for w in clips[0]]
    rp = RandomProjectionTokenizer(RandomProjectionTokenizerConfig(codebook_size=16)).fit_normalisation(patches)
    targets = [rp.ids(p[None])[0] for p in patches]
    enc = AudioEncoder(AudioEncoderConfig(hidden_size=32, num_layers=1, num_heads=2, num_targets=16)).fit_normalisation(patches)
    # the loss ignores visible patches: changing their targets does not change it
    p = patches[0][None]
    m = torch.ones(p.shape[:2], dtype=torch.bool)
    masked = torch.zeros_like(m); masked[0, :3] = True
    t1 = targets[0][None].clone(); t2 = t1.clone(); t2[0, 3:] = (t2[0, 3:] + 1) % 16
    enc.eval()
    assert torch.allclose(enc(p, m, masked, t1)["loss"], enc(p, m, masked, t2)["loss"])
    hist = train_audio_encoder(enc.train(), patches, targets, steps=80, batch_size=12, lr=3e-3, progress=False)
    assert hist.losses[-1] < hist.losses[0]
    feats = encoder_features(enc, patches[:3])
    assert [f.shape for f in feats] == [(len(p), 32) for p in patches[:3]]


def test_distilled_tokenizer_learns_to_rebuild_the_teacher_and_round_trips(tmp_path, clips):
    torch.manual_seed(0)
    patches = [log_mel_patches(w) for w in clips[0]]
    # a teacher that depends on the patch: a fixed random projection of it
    proj = torch.randn(patches[0].shape[1], 8)
    teacher = [torch.tanh((p - p.mean()) / (p.std() + 1e-5) @ proj / 20) for p in patches]
    tok = AudioTokenizer(AudioTokenizerConfig(hidden_size=32, num_layers=1, num_heads=2, estimator_layers=1, codebook_size=16,
                                              code_dim=8, teacher_dim=8)).fit_normalisation(patches)
    hist = train_audio_tokenizer(tok, patches, teacher, steps=80, batch_size=12, lr=3e-3, progress=False)
    cos = hist.extras["cosine"]
    assert cos[-1] > cos[0]
    tok.eval()
    ids = tok.tokenize(clips[0][0])
    assert ids.shape == (len(patches[0]),) and int(ids.max()) < 16
    tok.save_pretrained(tmp_path)
    assert torch.equal(AudioTokenizer.from_pretrained(tmp_path).eval().tokenize(clips[0][0]), ids)


def test_token_agreement_and_kappa():
    a = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]
    assert token_agreement(a, a, 4) == (1.0, 1.0)
    collapsed = [torch.zeros(4, dtype=torch.long)] * 2
    observed, kappa = token_agreement(collapsed, collapsed, 4)
    assert observed == 1.0 and kappa == 0.0  # a collapsed codebook agrees with itself by chance alone
    shuffled = [torch.tensor([1, 0, 3, 2]), torch.tensor([2, 3, 0, 1])]
    observed, kappa = token_agreement(a, shuffled, 4)
    assert observed == 0.0 and kappa < 0
    # different lengths compare the common prefix; levels are compared level by level
    assert token_agreement([torch.tensor([[1, 2, 3], [0, 0, 0]])], [torch.tensor([[1, 2], [0, 1]])], 4)[0] == 0.75


def test_agreement_counts_weigh_clips_as_a_bootstrap_draw_would():
    a = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), torch.tensor([1, 1, 2, 2])]
    b = [torch.tensor([0, 1, 2, 0]), torch.tensor([1, 0, 3, 2]), torch.tensor([1, 1, 2, 3])]
    counts = agreement_counts(a, b, 4)
    assert counts["same"].tolist() == [3, 0, 3] and counts["counts_a"].shape == (3, 1, 4)
    assert agreement_from_counts(counts) == token_agreement(a, b, 4)
    assert np.allclose(agreement_from_counts(counts, np.array([2, 2, 2])), token_agreement(a, b, 4))  # doubling every clip changes nothing
    # clip 0 twice and clip 2 once is the set [a0, a0, a2]: what the bootstrap scores for that draw
    assert np.allclose(agreement_from_counts(counts, np.array([2, 0, 1])), token_agreement([a[0], a[0], a[2]], [b[0], b[0], b[2]], 4))


def test_token_histogram_is_one_normalised_histogram_per_level():
    h = token_histogram(torch.tensor([[0, 0, 1], [2, 2, 2]]), 3)
    assert np.allclose(h, [2 / 3, 1 / 3, 0, 0, 0, 1])
    assert np.allclose(token_histogram(torch.tensor([1, 1]), 2), [0, 1])


@pytest.mark.parametrize("fn, words", [
    (lambda: event_clip("thunder", np.random.default_rng(0)), ["kind", "siren"]),
    (lambda: event_clips(0), ["per_kind"]),
    (lambda: log_mel_patches(np.zeros(100, np.float32)), ["wav", "1280"]),
    (lambda: log_mel_patches(np.zeros((2, 3000), np.float32)), ["wav", "1-D"]),
    (lambda: log_mel_patches(np.full(3000, np.nan, np.float32)), ["wav", "finite"]),
    (lambda: AudioEncoderConfig(mask_prob=0), ["mask_prob"]),
    (lambda: AudioEncoderConfig(hidden_size=30, num_heads=4), ["num_heads"]),
    (lambda: AudioTokenizerConfig(codebook_size=0), ["codebook_size"]),
    (lambda: AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2))(torch.zeros(1, 3, 5), torch.ones(1, 3, dtype=torch.bool)),
     ["patches", "320"]),
    (lambda: train_audio_encoder(AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, num_targets=4)),
                                 [torch.zeros(3, 320)], [torch.tensor([0, 1, 9])], steps=1), ["targets[0]", "[0, 4)"]),
    (lambda: train_audio_tokenizer(AudioTokenizer(AudioTokenizerConfig(hidden_size=16, num_layers=1, num_heads=2, teacher_dim=8)),
                                   [torch.zeros(3, 320)], [torch.zeros(3, 5)], steps=1), ["teacher[0]", "(3, 8)"]),
    (lambda: token_agreement([torch.zeros(3, dtype=torch.long)], [], 4), ["b", "1 token sequences"]),
    (lambda: agreement_from_counts(agreement_counts([torch.zeros(3, dtype=torch.long)] * 2, [torch.zeros(3, dtype=torch.long)] * 2, 4), np.ones(3)),
     ["weights", "2 non-negative weights"]),
    (lambda: agreement_from_counts(agreement_counts([torch.zeros(3, dtype=torch.long)] * 2, [torch.zeros(3, dtype=torch.long)] * 2, 4), np.zeros(2)),
     ["weights", "not all 0"]),
])
def test_bad_input(fn, words):
    with pytest.raises(ValueError) as e: fn()
    assert all(w in str(e.value) for w in words), str(e.value)
