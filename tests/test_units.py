"Units: k-means save/load round trip, determinism, bad input; metrics and dedup edge cases."
import numpy as np
import pytest
import torch

from speechllm_course.units import KMeans, dedup, train_unit_bpe, unit_quality


@pytest.fixture(scope="module")
def blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 5
    return centers[torch.randint(5, (2000,), generator=g)] + torch.randn(2000, 8, generator=g)


def test_save_load_round_trip_is_exact(blobs, tmp_path):
    km = KMeans(5, 8).fit(blobs, seed=3)
    km.save_pretrained(tmp_path / "km")
    again = KMeans.from_pretrained(tmp_path / "km")
    assert torch.equal(km.centroids, again.centroids)
    assert torch.equal(km.predict(blobs), again.predict(blobs)) and again.inertia_ == km.inertia_


def test_same_seed_same_model_and_minibatch(blobs):
    a, b = KMeans(5, 8).fit(blobs, seed=1), KMeans(5, 8).fit(blobs, seed=1)
    assert torch.equal(a.centroids, b.centroids)
    m1, m2 = KMeans(5, 8).fit(blobs, batch_size=256, seed=2), KMeans(5, 8).fit(blobs, batch_size=256, seed=2)
    assert torch.equal(m1.centroids, m2.centroids) and m1.score(blobs) < 1.1 * a.score(blobs)


def test_numpy_input_and_n_init(blobs):
    km = KMeans(5, 8).fit(blobs.numpy(), n_init=3, init="random", seed=0)
    assert km.predict(blobs.numpy()).shape == (2000,)


@pytest.mark.parametrize("call, words", [
    (lambda km, x: km.predict(torch.randn(3, 9)), ["x", "8 features", "9"]),
    (lambda km, x: KMeans(100, 8).fit(torch.randn(20, 8)), ["x", "n_clusters=100", "20 rows"]),
    (lambda km, x: KMeans(2, 8).fit(torch.empty(0, 8)), ["x", "at least one row"]),
    (lambda km, x: KMeans(2, 8).fit(torch.full((5, 8), float("nan"))), ["x", "finite"]),
    (lambda km, x: KMeans(2, 8).fit(torch.randn(5, 8, 1)), ["x", "2-D"]),
    (lambda km, x: KMeans(2, 8).fit(torch.randn(5, 8), init="magic"), ["init", "magic"]),
    (lambda km, x: KMeans(0, 8), ["n_clusters", "0"]),
    (lambda km, x: KMeans.from_pretrained("/nonexistent/kmeans"), ["path", "config.json"]),
    (lambda km, x: unit_quality(np.array([0, 1]), np.array([0]), 2, 2), ["phones", "one label per unit"]),
    (lambda km, x: unit_quality(np.array([0, 5]), np.array([0, 1]), 2, 2), ["units", "[0, 2)"]),
    (lambda km, x: train_unit_bpe([[0, 1]], 5, vocab_size=3), ["vocab_size", "5"]),
])
def test_bad_input_names_the_argument(blobs, call, words):
    km = KMeans(5, 8).fit(blobs, max_iter=3)
    with pytest.raises(ValueError) as e: call(km, blobs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_predict_before_fit_is_a_clear_error():
    with pytest.raises(RuntimeError, match="fit"): KMeans(2, 3).predict(torch.randn(4, 3))


def test_dedup_edge_cases():
    u, r = dedup([])
    assert len(u) == 0 and len(r) == 0
    u, r = dedup(np.array([4]))
    assert u.tolist() == [4] and r.tolist() == [1]
