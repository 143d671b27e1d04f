"""core: the scale knob, atomic writes, the artifact cache (incl. interrupted and concurrent builds), train() edge cases."""
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from speechllm_course import core
from speechllm_course.core import NOISE_SES, Gap, paired_bootstrap, paired_gap


def test_scale_knob(monkeypatch):
    monkeypatch.delenv("SPEECHLLM_SCALE", raising=False)
    assert core.get_scale() == "course"
    monkeypatch.setenv("SPEECHLLM_SCALE", "SMOKE")
    assert core.get_scale() == "smoke"
    monkeypatch.setenv("SPEECHLLM_SCALE", "tiny")
    with pytest.raises(ValueError, match=r"SPEECHLLM_SCALE: expected one of .*got 'tiny'"):
        core.get_scale()
    with pytest.raises(ValueError, match="scale: expected"):
        core.for_scale(dict(smoke=1, course=2, full=3), scale="medium")


def test_bad_inputs():
    with pytest.raises(ValueError, match="seed: expected an int"):
        core.seed_everything("42")
    with pytest.raises(ValueError, match="prefer"):
        core.pick_device("quantum")
    with pytest.raises(ValueError, match="n_samples"):
        core.n_frames(-1)
    with pytest.raises(ValueError, match="mode"):
        with core.atomic_write("/tmp/x", "a"):
            pass
    with pytest.raises(ValueError, match="steps: expected a positive int, got 0"):
        core.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="model: expected a torch nn.Module"):
        core.train("not a model", [1, 2, 3], steps=1)
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="all parameters frozen"):
        core.train(frozen, [1, 2, 3], steps=1)
    with pytest.raises(ValueError, match="data: expected a non-empty dataset"):
        core.train(nn.Linear(2, 1), [], steps=1, progress=False)
    with pytest.raises(ValueError, match="loss_fn"):  # a plain module has no .loss
        core.train(nn.Linear(2, 1), [{"input": torch.zeros(2)}] * 4, steps=1, batch_size=2, progress=False)


def _build_slowly(tmp: Path):
    (tmp / "pid").write_text(str(os.getpid()))
    time.sleep(1.0)
    np.save(tmp / "x.npy", np.arange(10))
    return {"builder": os.getpid()}


def _ask(root):
    return str(core.get_or_build("slow", _build_slowly, version=1, root=root, scale="smoke"))


def test_concurrent_get_or_build_builds_once(tmp_path):
    with mp.get_context("spawn").Pool(3) as pool:
        paths = pool.map(_ask, [str(tmp_path)] * 3)
    assert len(set(paths)) == 1
    man = core.load_manifest(paths[0])
    assert man["info"]["builder"] == int((Path(paths[0]) / "pid").read_text())
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir() if not p.name.endswith(".lock")) == ["slow"]


def test_interrupted_build_is_detected_and_rebuilt(tmp_path):
    base = tmp_path / "smoke"
    # a build killed mid-way leaves a temp folder; an older crash could even leave a final folder without manifest
    (base / ".thing.building-deadbeef").mkdir(parents=True)
    (base / ".thing.building-deadbeef" / "half.npy").write_bytes(b"\x93NUMPY")
    (base / "thing").mkdir()
    (base / "thing" / "x.npy").write_bytes(b"partial")
    assert core.artifact_problem(base / "thing") == "no manifest (build never finished)"
    built = []
    path = core.get_or_build("thing", lambda t: (built.append(1), np.save(t / "x.npy", np.ones(3)))[0] and None,
                             version=1, root=tmp_path, scale="smoke")
    assert built == [1] and np.load(path / "x.npy").tolist() == [1, 1, 1]
    assert not list(base.glob(".thing.building-*")), "leftovers of the crashed build must be swept"
    assert core.load_manifest(path)["reason"] == "no manifest (build never finished)"
    # same size, different bytes: only a full verification notices
    arr = np.load(path / "x.npy"); arr[0] = 7; np.save(path / "x.npy", arr)
    assert core.artifact_problem(path, 1) is None
    assert core.artifact_problem(path, 1, verify="full") == "checksum of x.npy changed"
    path = core.get_or_build("thing", lambda t: np.save(t / "x.npy", np.ones(3)), version=1, root=tmp_path,
                             scale="smoke", verify="full")
    assert np.load(path / "x.npy").tolist() == [1, 1, 1]
    # a new version rebuilds
    path = core.get_or_build("thing", lambda t: np.save(t / "x.npy", np.zeros(2)), version=2, root=tmp_path, scale="smoke")
    assert np.load(path / "x.npy").tolist() == [0, 0]


def test_get_or_build_bad_args(tmp_path):
    with pytest.raises(ValueError, match="name"):
        core.get_or_build("a/b", lambda t: None, version=1, root=tmp_path)
    with pytest.raises(ValueError, match="build"):
        core.get_or_build("a", "not callable", version=1, root=tmp_path)
    with pytest.raises(ValueError, match="verify"):
        core.get_or_build("a", lambda t: None, version=1, root=tmp_path, verify="maybe")


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHLLM_DATA", str(tmp_path / "d"))
    assert core.data_root() == (tmp_path / "d").resolve()
    monkeypatch.delenv("SPEECHLLM_DATA")
    monkeypatch.chdir(Path(__file__).parent)  # inside the checkout: its data/
    assert core.data_root() == Path(__file__).resolve().parents[1] / "data"


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.2), nn.Linear(16, 1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _mse(m, b):
    return {"loss": nn.functional.mse_loss(m(b[0]), b[1]), "abs_err": (m(b[0]) - b[1]).abs().mean()}


def test_train_deterministic_and_logs_extras():
    h1 = core.train(m1 := _mlp(), _data(), loss_fn=_mse, steps=30, batch_size=8, log_every=10, progress=False)
    h2 = core.train(m2 := _mlp(), _data(), loss_fn=_mse, steps=30, batch_size=8, log_every=10, progress=False, seed=0)
    assert h1.losses == h2.losses and len(h1.extras["abs_err"]) == 3
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    h3 = core.train(_mlp(), _data(), loss_fn=_mse, steps=30, batch_size=8, log_every=10, progress=False, seed=1)
    assert h3.losses != h1.losses, "the seed must matter (shuffling, dropout)"


def test_train_hands_the_model_back_without_the_autocast_wrapper():
    # on CUDA, mixed_precision='auto' means bf16 autocast; forcing bf16 on the CPU takes the same path here
    m = _mlp()
    core.train(m, _data(), loss_fn=_mse, steps=5, batch_size=8, mixed_precision="bf16", progress=False)
    copy = _mlp().eval(); copy.load_state_dict(m.state_dict()); m.eval()
    x = _data()[:8][0]
    with torch.no_grad(): assert torch.equal(m(x), copy(x)), "after train() forward must run in float32 again"
    assert next(m.parameters()).device.type == "cpu" and "_original_forward" not in m.__dict__
    # accelerate's prepare() returns a model it has marked as prepared untouched: on CUDA a second train() of the same
    # model (the codecs' two phases) would then leave it on the CPU while the batches went to the GPU
    assert not getattr(m, "_is_accelerate_prepared", False)


@pytest.mark.parametrize("chosen, autocast_expected", [(None, False), ("bf16", True), ("no", False)])
def test_speechllm_mixed_precision_reaches_train_auto(monkeypatch, chosen, autocast_expected):
    "`mixed_precision='auto'` follows $SPEECHLLM_MIXED_PRECISION (every chapter trains with 'auto'); bf16 on the CPU takes the CUDA path's autocast."
    if chosen is None: monkeypatch.delenv("SPEECHLLM_MIXED_PRECISION", raising=False)
    else: monkeypatch.setenv("SPEECHLLM_MIXED_PRECISION", chosen)
    seen = set()
    def noting_autocast(m, b):
        seen.add(torch.is_autocast_enabled("cpu"))
        return _mse(m, b)
    core.train(_mlp(), _data(), loss_fn=noting_autocast, steps=3, batch_size=8, progress=False)
    assert seen == {autocast_expected}


def test_a_bad_speechllm_mixed_precision_is_named(monkeypatch):
    monkeypatch.setenv("SPEECHLLM_MIXED_PRECISION", "fp32")
    with pytest.raises(ValueError, match="SPEECHLLM_MIXED_PRECISION.*'no', 'bf16' or 'fp16'.*fp32"):
        core.train(_mlp(), _data(), loss_fn=_mse, steps=1, batch_size=8, progress=False)


def test_train_hands_the_model_back_after_a_crash():
    m = _mlp()
    def crash(step, model): raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        core.train(m, _data(), loss_fn=_mse, steps=5, batch_size=8, mixed_precision="bf16", on_step=crash, progress=False)
    copy = _mlp().eval(); copy.load_state_dict(m.state_dict()); m.eval()
    x = _data()[:8][0]
    with torch.no_grad(): assert torch.equal(m(x), copy(x))


def test_train_nan_loss_is_reported():
    with pytest.raises(FloatingPointError, match="loss is nan"):
        core.train(_mlp(), _data(), loss_fn=lambda m, b: m(b[0]).sum() * float("nan"), steps=2, batch_size=8, progress=False)


def test_resume_finished_run_is_noop(tmp_path):
    ck = tmp_path / "ck"
    core.train(_mlp(), _data(), loss_fn=_mse, steps=10, batch_size=8, log_every=5, ckpt_dir=str(ck), progress=False)
    m = _mlp()
    h = core.train(m, _data(), loss_fn=_mse, steps=10, batch_size=8, log_every=5, ckpt_dir=str(ck), progress=False)
    assert h.resumed_from == 10 and len(h.losses) == 2
    assert not torch.equal(m[0].weight, _mlp()[0].weight), "the finished weights must be loaded"


def test_a_tied_embedding_lm_resumes_to_the_uninterrupted_weights_without_the_shared_tensor_notice(tmp_path, caplog):
    "The course's LMs tie lm_head to the input embeddings: the checkpoint stores the shared tensor once and a resume re-ties it."
    import logging
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(conf)
    g = torch.Generator().manual_seed(0)
    data = [dict(input_ids=ids, labels=ids) for ids in torch.randint(40, (48, 12), generator=g)]
    kw = dict(steps=12, batch_size=8, lr=1e-2, log_every=4, progress=False)
    class Crash(Exception): pass
    def crash_at_8(step, model):
        if step == 8: raise Crash
    ck = tmp_path / "ck"
    with caplog.at_level(logging.WARNING), pytest.raises(Crash):
        core.train(make(), data, ckpt_dir=str(ck), ckpt_every=4, on_step=crash_at_8, **kw)
    assert core.latest_checkpoint(ck).name == "step-000008"
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
    resumed = make()
    h = core.train(resumed, data, ckpt_dir=str(ck), ckpt_every=4, **kw)
    whole = make()
    core.train(whole, data, **kw)
    assert h.resumed_from == 8
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight  # still one tensor after loading
    for (n, p), q in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.allclose(p, q, atol=1e-6), f"{n} differs from the uninterrupted run"
    assert not torch.equal(resumed.model.embed_tokens.weight, make().model.embed_tokens.weight)


# ---- judging a claim against its noise ----------------------------------------------------------------------------
def test_a_gap_judges_claims_beyond_two_standard_errors_at_the_boundaries():
    assert NOISE_SES == 2
    g = Gap(0.30, 0.10)
    # a gain: above its margin by more than two standard errors, and not at exactly two
    assert g.exceeds() and g.exceeds(0.09) and not g.exceeds(0.10) and not g.exceeds(0.2)
    assert not Gap(0.2, 0.1).exceeds() and Gap(0.2001, 0.1).exceeds()
    # a drop, mirrored; "within a tolerance" fails only when short of it by more than the noise
    assert Gap(-0.30, 0.10).below() and not Gap(-0.30, 0.10).below(0.1) and not g.below()
    assert Gap(-0.05, 0.01).within(0.05) and Gap(-0.069, 0.01).within(0.05) and not Gap(-0.071, 0.01).within(0.05)
    assert Gap(0.0, 0.0).within(0) and not Gap(0.0, 0.0).exceeds()
    # formats with a sign and its error, in other units on request; unpacks and compares as a pair
    assert f"{g}" == "+0.300 ± 0.100" and f"{g:.1f}" == f"{g:+.1f}" == "+0.3 ± 0.1" and f"{Gap(-0.3, 0.1).scaled(-100):.0f}" == "+30 ± 10"
    gap, se = g
    assert (gap, se) == g == (0.30, 0.10) and isinstance(paired_gap(np.ones(3), np.zeros(3)), Gap)
    for bad in (-0.01, float("nan")):
        with pytest.raises(ValueError, match="tolerance"):
            g.within(bad)
    # a NaN would compare False every way, so "within" would always hold: no verdict is given on one
    for broken in (Gap(float("nan"), 0.1), Gap(0.1, float("nan")), Gap(0.1, -0.1), Gap(float("inf"), 0.1)):
        for judge in (broken.exceeds, broken.below, lambda: broken.within(0.05)):
            with pytest.raises(ValueError, match="gap"):
                judge()
    for scores, baseline, name in ((np.array([1.0, np.nan, 0.0]), np.zeros(3), "scores"), (np.ones(3), np.array([0.0, np.inf, 1.0]), "baseline")):
        with pytest.raises(ValueError, match=name):
            paired_gap(scores, baseline)


def test_the_paired_bootstrap_agrees_with_the_paired_gap_on_a_mean_and_names_bad_input():
    rng = np.random.default_rng(3)
    a, b = (rng.random(400) < 0.7).astype(float), (rng.random(400) < 0.6).astype(float)
    accuracy = lambda outs, refs: float(np.mean([o == r for o, r in zip(outs, refs)]))
    refs = np.ones(400)
    gap, se = paired_bootstrap(accuracy, a, b, refs, n_resamples=2000, seed=0)
    exact_gap, exact_se = paired_gap(a, b)
    assert gap == pytest.approx(exact_gap) and se == pytest.approx(exact_se, rel=0.1)
    # a set-level metric: micro F1 over predicted label sets, where no per-item mean exists
    def micro_f1(preds, golds):
        tp = sum(len(p & g) for p, g in zip(preds, golds)); fp = sum(len(p - g) for p, g in zip(preds, golds))
        fn = sum(len(g - p) for p, g in zip(preds, golds))
        return 2 * tp / max(1, 2 * tp + fp + fn)
    golds = [{"bell", "beeps"}, {"siren"}, {"clicks"}, {"bell"}] * 20
    good, bad = golds, [{"siren"}] * 80
    gap, se = paired_bootstrap(micro_f1, good, bad, golds, n_resamples=200)
    assert gap == pytest.approx(1 - micro_f1(bad, golds)) and 0 < se < gap / 4
    assert isinstance(paired_bootstrap(micro_f1, good, bad, golds, n_resamples=20), Gap)
    # drawn within strata, each stratum keeps its size: a stratum scored 1 against 0 throughout adds no variance
    drawn = []
    def share_of_first(outs, refs):
        drawn.append(sum(r < 10 for r in refs))
        return float(np.mean(outs))
    ones_then_zeros, labels = np.r_[np.ones(10), np.zeros(30)], ["a"] * 10 + ["b"] * 30
    assert paired_bootstrap(share_of_first, ones_then_zeros, np.zeros(40), list(range(40)), n_resamples=30, strata=labels) == (0.25, 0.0)
    assert set(drawn[2:]) == {10}
    assert paired_bootstrap(share_of_first, ones_then_zeros, np.zeros(40), list(range(40)), n_resamples=30).se > 0.03
    with pytest.raises(ValueError, match="strata"):
        paired_bootstrap(share_of_first, ones_then_zeros, np.zeros(40), list(range(40)), strata=labels[:-1])
    assert paired_bootstrap(micro_f1, good, good, golds, n_resamples=50) == (0.0, 0.0)
    assert paired_bootstrap(micro_f1, bad, good, golds, seed=1, n_resamples=50) == paired_bootstrap(micro_f1, bad, good, golds, seed=1, n_resamples=50)
    for call, name in ((lambda: paired_bootstrap(micro_f1, good[:3], bad, golds), "baseline"),
                       (lambda: paired_bootstrap(micro_f1, good[:1], bad[:1], golds[:1]), "references"),
                       (lambda: paired_bootstrap(micro_f1, good, bad, golds, n_resamples=1), "n_resamples")):
        with pytest.raises(ValueError, match=name):
            call()
