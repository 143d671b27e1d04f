"Probing (chapter 03): CPC save/load and frame grid, InfoNCE sanity, standardisation, clustering, LM scoring, bad input."
import numpy as np
import pytest
import torch

from speechllm_course.core import HOP
from speechllm_course.probing import (CPCConfig, CPCModel, ContinuousInputLM, CropCollator, cluster_replace, continuous_batch,
                                      continuous_log_likelihood, probe_accuracy, spoken_minimal_pairs,
                                      standardize_utterances, train_cpc, unit_log_likelihood)
from speechllm_course.units import UnitLMConfig, make_unit_lm


@pytest.fixture(scope="module")
def tiny_cpc():
    torch.manual_seed(0)
    return CPCModel(CPCConfig(conv_dim=16, hidden_size=16, context_size=16, prediction_steps=3, n_negatives=8)).eval()


@pytest.mark.parametrize("n", [320, 641, 16000, 16319])
def test_frames_follow_the_label_grid(tiny_cpc, n):
    assert tiny_cpc.frames(torch.randn(n)).shape == (n // HOP, 16)
    assert tiny_cpc.frames(torch.randn(n), which="z").shape == (n // HOP, 16)


def test_save_load_round_trip(tiny_cpc, tmp_path):
    tiny_cpc.save_pretrained(tmp_path / "cpc")
    again = CPCModel.from_pretrained(tmp_path / "cpc")
    wav = torch.randn(8000)
    assert torch.equal(tiny_cpc.frames(wav), again.frames(wav))
    assert again.config.prediction_steps == 3 and again.config.n_negatives == 8


def test_context_is_causal(tiny_cpc):
    "c_t summarises z_1..z_t only: changing later encoder frames leaves earlier context frames untouched."
    z = torch.randn(1, 30, 16)
    changed = z.clone(); changed[:, 20:] = torch.randn(1, 10, 16)
    with torch.no_grad():
        a, b = tiny_cpc.context(z)[0], tiny_cpc.context(changed)[0]
    assert torch.equal(a[:, :20], b[:, :20]) and not torch.allclose(a[:, 20:], b[:, 20:])


def test_cpc_learns_a_predictable_signal():
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    wavs = [(0.3 * np.sin(2 * np.pi * (200 + 300 * (t * (1 + i % 3)) % 1) * t)).astype(np.float32) for i in range(8)]
    cfg = CPCConfig(conv_dim=16, hidden_size=16, context_size=16, prediction_steps=2, n_negatives=8)
    model, hist = train_cpc(wavs, cfg, steps=30, batch_size=4, max_frames=40, lr=3e-3, progress=False)
    assert hist.losses[-1] < hist.losses[0]


def test_crop_collator_shapes(tiny_cpc):
    batch = CropCollator(tiny_cpc, max_frames=20)([np.zeros(HOP * 30, np.float32), np.zeros(HOP * 25 + 7, np.float32)])
    assert batch["input_values"].shape == (2, 20 * HOP + tiny_cpc.receptive_field - HOP)
    out = tiny_cpc(batch["input_values"])
    assert out.z.shape == (2, 20, 16) and out.loss is not None and 0 <= float(out.accuracy) <= 1


def test_standardize_and_cluster_replace():
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal((50, 4)) * 3 + 7 for _ in range(5)]
    for f in standardize_utterances(feats):
        assert np.allclose(f.mean(0), 0, atol=1e-5) and np.allclose(f.std(0), 1, atol=1e-3)
    rep = cluster_replace(feats, feats[:2], k=3, iters=5)
    assert rep[0].shape == (50, 4) and len(np.unique(np.concatenate(rep), axis=0)) <= 3


def test_lm_scores_prefer_the_training_pattern():
    seqs = [[0, 1, 2, 3] * 5 for _ in range(64)]
    from speechllm_course.units import train_unit_lm
    lm, _ = train_unit_lm(seqs, 4, UnitLMConfig(steps=60, batch_size=16, layers=1, dim=32, heads=2, max_len=32), progress=False)
    good, bad = unit_log_likelihood(lm, [[0, 1, 2, 3] * 5, [3, 2, 1, 0] * 5], 4)
    assert good > bad


def test_continuous_lm_batch_and_scores():
    items = [(np.ones((10, 3), np.float32), np.arange(10) % 4), (np.zeros((6, 3), np.float32), np.arange(6) % 4)]
    b = continuous_batch(items)
    assert b["frames"].shape == (2, 10, 3) and b["attention_mask"][1].sum() == 6
    assert b["next_units"][1, 5] == -100 and b["next_units"][0, 0] == 1
    lm = ContinuousInputLM(3, 4, layers=1, dim=16, heads=2, max_len=16)
    scores = continuous_log_likelihood(lm, items)
    assert scores.shape == (2,) and (scores < 0).all()


def test_spoken_pairs_are_matched():
    pairs = spoken_minimal_pairs("lexical", 3, progress=False) + spoken_minimal_pairs("syntactic", 3, progress=False)
    for p in pairs:
        assert p["real"] != p["fake"] and len(p["real_wav"]) > HOP and len(p["fake_wav"]) > HOP
    again = spoken_minimal_pairs("lexical", 3, progress=False)
    assert [p["fake"] for p in again] == [p["fake"] for p in pairs[:3]]
    assert np.array_equal(again[0]["real_wav"], pairs[0]["real_wav"])  # deterministic synthesis


@pytest.mark.parametrize("call, words", [
    (lambda m: m.frames(torch.randn(2, 1000)), ["wav", "1-D"]),
    (lambda m: m.frames(torch.randn(100)), ["wav", "320"]),
    (lambda m: m.frames(torch.full((1000,), float("nan"))), ["wav", "finite"]),
    (lambda m: m.frames(torch.randn(1000), which="x"), ["which", "'c' or 'z'"]),
    (lambda m: m(torch.randn(1000)), ["input_values", "batch"]),
    (lambda m: m(m.frame_aligned(torch.randn(1, 320))), ["input_values", "2 frames"]),
    (lambda m: CPCModel(CPCConfig(conv_strides=(5, 4, 4, 2))), ["conv_strides", "320"]),
    (lambda m: CPCModel(CPCConfig(conv_kernels=(10, 8))), ["conv_kernels", "4 kernels"]),
    (lambda m: CropCollator(m)([]), ["wavs", "non-empty"]),
    (lambda m: CropCollator(m)([np.zeros(400, np.float32)]), ["wavs", "2 frames"]),
    (lambda m: train_cpc([], CPCConfig(), steps=1), ["wavs", "at least one"]),
    (lambda m: train_cpc([np.full(3200, np.inf, np.float32)], CPCConfig(), steps=1), ["wavs", "finite"]),
    (lambda m: standardize_utterances([np.zeros((0, 3))]), ["feats", "non-empty"]),
    (lambda m: spoken_minimal_pairs("phonetic", 2), ["kind", "lexical"]),
    (lambda m: spoken_minimal_pairs("lexical", 0), ["n", "positive"]),
    (lambda m: ContinuousInputLM(3, 4)(torch.zeros(1, 5, 2), torch.ones(1, 5)), ["frames", "(batch, frames, 3)"]),
    (lambda m: probe_accuracy(np.zeros((4, 2)), np.zeros(3, int), np.zeros((4, 2)), np.zeros(4, int), 2), ["train_x", "one row per label"]),
])
def test_bad_input_names_the_argument(tiny_cpc, call, words):
    with pytest.raises(ValueError) as e: call(tiny_cpc)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_probe_per_item_correctness_averages_to_the_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.eye(3)[y] + rng.normal(0, 0.8, (300, 3))  # noisy one-hot: some test rows are misread
    acc = probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3, steps=200)
    correct = probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3, steps=200, per_item=True)
    assert correct.shape == (100,) and set(np.unique(correct)) <= {0.0, 1.0}
    assert 0 < correct.mean() < 1 and correct.mean() == pytest.approx(acc)
