"Supervised tokenizer: CTC/error-rate utilities, streaming, save/load, training that learns, resume, bad input."
import math

import numpy as np
import pytest
import torch

from speechllm_course.core import HOP
from speechllm_course.supervised_tokens import (
    BLANK, CHARS, SupervisedTokenizer, SupervisedTokenizerConfig, TokenASR, VectorQuantizer, block_causal_mask,
    codebook_usage, ctc_greedy_decode, edit_distance, error_rate, ids_to_text, length_buckets, load_tokenizer, pad_tokens, paired_bootstrap, paired_gap,
    pool_frames, ssl_units, text_to_ids, token_means, train_asr, train_token_asr, with_quantizer, word_errors)


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, num_heads=2, layers_below=2, layers_above=1, pool=4, codebook_size=16)
    model = SupervisedTokenizer(SupervisedTokenizerConfig(**{**cfg, **kw})).eval()
    if model.quantizer is not None:  # codes where the encoder's outputs are, so tokens vary with the audio
        g = torch.Generator().manual_seed(1)
        z, mask = model.encode(*model.features([torch.randn(16000, generator=g) * 0.1 for _ in range(4)]))
        model.quantizer.init_from(z[mask], iters=5)
    return model


# ---- text, CTC, error rates -----------------------------------------------------------------------------------
def test_text_ids_round_trip_and_normalisation():
    assert ids_to_text(text_to_ids("  The  CAT's hat ")) == "the cat's hat"
    assert BLANK not in text_to_ids("abc") and len(CHARS) == 28


@pytest.mark.parametrize("ref, hyp, d", [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("abc", "abd", 1),
                                         ("intention", "execution", 5), ("kitten", "sitting", 3)])
def test_edit_distance_known_values(ref, hyp, d):
    assert edit_distance(ref, hyp) == d == edit_distance(hyp, ref)


def test_error_rate_is_corpus_level_and_counts_insertions():
    # 1 error in 2 words + 0 in 4 words = 1/6, not the mean of per-utterance rates (0.25)
    assert error_rate(["a b", "c d e f"], ["a x", "c d e f"]) == pytest.approx(1 / 6)
    assert error_rate(["a"], ["a b c"]) == 2.0  # insertions can push WER above 1
    assert error_rate(["ab cd"], ["ab cd"], unit="char") == 0


def test_word_errors_add_up_to_the_wer_and_paired_gaps_carry_a_standard_error():
    from speechllm_course import core  # the claim statistics moved to chapter 00 and stay importable from here
    assert (paired_gap, paired_bootstrap) == (core.paired_gap, core.paired_bootstrap)
    refs, hyps = ["the red cat", "two dogs run fast"], ["the cat", "two dogs run fast"]
    errors = word_errors(refs, hyps)
    assert errors.tolist() == [1, 0] and errors.sum() / 7 == pytest.approx(error_rate(refs, hyps))
    # 0/1 scores: the gap is the accuracy difference, its standard error that of the mean paired difference
    gap, se = paired_gap(np.array([1, 1, 0, 1]), np.array([0, 1, 0, 0]))
    assert gap == pytest.approx(0.5) and se == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    # a WER difference: per-clip errors summed over the total word count; its standard error scales the same way
    gap, se = paired_gap(np.array([3.0, 1, 2]), np.array([1.0, 1, 0]), normalizer=10)
    assert gap == pytest.approx(0.4) and se == pytest.approx(np.sqrt(3) * np.std([2, 0, 2], ddof=1) / 10)
    for call, name in ((lambda: word_errors(["a b"], []), "hyps"), (lambda: word_errors("a b", "a b"), "hyps"),
                       (lambda: paired_gap(np.ones(3), np.ones(4)), "baseline"), (lambda: paired_gap(np.ones(1), np.ones(1)), "baseline"),
                       (lambda: paired_gap(np.ones(3), np.ones(3), normalizer=0), "normalizer")):
        with pytest.raises(ValueError, match=name):
            call()


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    ids = [0, 2, 2, 0, 2, 3, 3, 0, 1, 1, 4]  # _aa_abb_  c -> "aab c"
    logits = torch.nn.functional.one_hot(torch.tensor(ids), len(CHARS) + 1).float()
    assert ctc_greedy_decode(logits) == "aab c"
    assert ctc_greedy_decode(logits, length=3) == "a"


@pytest.mark.parametrize("call, words", [
    (lambda: text_to_ids("naïve"), ["text", "letters", "ï"]),
    (lambda: text_to_ids(3), ["text", "string", "int"]),
    (lambda: error_rate(["a"], ["a", "b"]), ["hyps", "1 hypotheses", "2"]),
    (lambda: error_rate([], []), ["refs", "at least one"]),
    (lambda: error_rate(["a"], ["a"], unit="phone"), ["unit", "'word' or 'char'", "phone"]),
    (lambda: ctc_greedy_decode(torch.zeros(3)), ["logits", "(frames, vocab)"]),
])
def test_bad_text_input_errors(call, words):
    with pytest.raises(ValueError) as e: call()
    assert all(w in str(e.value) for w in words), str(e.value)


# ---- the model --------------------------------------------------------------------------------------------------
def test_block_causal_mask_blocks_future_blocks_only():
    m = block_causal_mask(6, 2)
    assert not m[1, 0] and not m[0, 1]  # inside a block: both ways
    assert m[1, 2] and not m[2, 1]  # a later block is hidden, an earlier one visible


@pytest.mark.parametrize("pool, tokens", [(1, 50), (2, 25), (4, 13), (8, 7)])
def test_token_rate_and_bitrate(pool, tokens):
    model = small(pool=pool)
    assert len(model.tokenize(torch.randn(16000) * 0.1)) == tokens
    assert model.config.token_rate == 50 / pool and model.config.bitrate == pytest.approx(50 / pool * 4)


@pytest.mark.parametrize("pool", [1, 4, 8])
def test_streaming_prefixes_give_the_same_tokens(pool):
    model = small(pool=pool)
    wav = torch.randn(24000) * 0.1
    full = model.tokenize(wav)
    block, per_block = model.config.block_frames, model.config.block_frames // pool
    assert len(set(full.tolist())) > 3  # tokens vary: the check below is not vacuous
    z_full, _ = model.encode(*model.features(wav))
    for b in (1, 2, 5):
        cut = wav[: b * block * HOP + 96]
        assert torch.equal(model.tokenize(cut), full[: b * per_block])
        z_cut, _ = model.encode(*model.features(cut))
        assert torch.allclose(z_cut[0], z_full[0, : b * per_block], atol=1e-5)


def test_future_audio_does_change_later_tokens():
    "The streaming test above could pass vacuously if tokens ignored the audio: they do not."
    model = small(pool=4)
    wav = torch.randn(24000) * 0.1
    other = wav.clone(); other[12000:] = torch.randn(12000) * 0.1
    a, b = model.tokenize(wav), model.tokenize(other)
    assert torch.equal(a[:8], b[:8]) and not torch.equal(a, b)


def test_batch_equals_one_at_a_time():
    model = small()
    wavs = [torch.randn(n) * 0.1 for n in (8000, 16000, 5000)]
    batched = model.tokenize(wavs)
    for w, t in zip(wavs, batched): assert torch.equal(model.tokenize(w), t)
    assert model.transcribe(wavs) == [model.transcribe(w) for w in wavs]


def test_save_load_round_trip_is_exact(tmp_path):
    model = small()
    model.feature_mean.fill_(0.5)  # the normalisation statistics travel with the model
    model.save_pretrained(tmp_path / "tok")
    again = SupervisedTokenizer.from_pretrained(tmp_path / "tok").eval()
    assert torch.equal(again.feature_mean, model.feature_mean)
    wav = torch.randn(16000) * 0.1
    assert torch.equal(again.tokenize(wav), model.tokenize(wav))
    f, n = model.features(wav)
    assert torch.equal(again(f, n).logits, model(f, n).logits)


def test_decode_from_ids_equals_decode_through_quantizer():
    model = small()
    f, n = model.features(torch.randn(16000) * 0.1)
    out = model(f, n)
    logits, _ = model.decode(out.token_ids, out.token_mask)
    assert torch.allclose(logits, out.logits, atol=1e-5)


def test_with_quantizer_keeps_the_trained_halves():
    asr = small(pool=1, quantize=False)
    tok = with_quantizer(asr, pool=2, codebook_size=8)
    assert tok.config.quantize and tok.config.pool == 2 and tok.config.codebook_size == 8
    assert torch.equal(tok.lower[0].linear1.weight, asr.lower[0].linear1.weight)
    assert torch.equal(tok.decoder.head.weight, asr.decoder.head.weight)
    with pytest.raises(ValueError, match="continuous"): with_quantizer(tok, 2, 8)


def _toy_examples(model, n=24):
    "Two 'words' that differ in their spectra: a low tone says 'a', a high tone says 'b'."
    rng = np.random.default_rng(0)
    t = np.arange(4000) / 16000
    examples = []
    for i in range(n):
        text = "ab"[i % 2] + " " + "ab"[(i // 2) % 2]
        wav = np.concatenate([np.sin(2 * np.pi * (300 if c == "a" else 2500) * t) * 0.5 for c in text.split()])
        wav = (wav + rng.normal(0, 0.01, len(wav))).astype(np.float32)
        f, n_ = model.features(torch.from_numpy(wav))
        examples.append(dict(features=f[0, : n_[0]], text=text))
    return examples


def test_training_learns_a_toy_task_through_the_bottleneck(tmp_path):
    asr = small(pool=1, quantize=False)
    examples = _toy_examples(asr)
    train_asr(asr, examples, steps=80, batch_size=8, lr=3e-3, progress=False)
    tok = with_quantizer(asr, pool=4, codebook_size=8)
    from speechllm_course.supervised_tokens import pooled_encoder_outputs
    tok.quantizer.init_from(pooled_encoder_outputs(tok, examples, 1000))
    hist = train_asr(tok, examples, steps=60, batch_size=8, lr=2e-3, progress=False)
    assert hist.losses[-1] < hist.losses[0]
    refs = [e["text"] for e in examples]
    f = [e["features"] for e in examples]
    from speechllm_course.supervised_tokens import pad_features
    feats, n = pad_features(f)
    out = tok.eval()(feats, n)
    hyps = [ctc_greedy_decode(l, int(m.sum())) for l, m in zip(out.logits, out.frame_mask)]
    assert error_rate(refs, hyps) < 0.2, list(zip(refs, hyps))[:4]


def test_training_resumes_from_checkpoint(tmp_path):
    asr = small(pool=1, quantize=False)
    examples = _toy_examples(asr, 16)
    ck = str(tmp_path / "ck")
    train_asr(asr, examples, steps=10, batch_size=4, progress=False, ckpt_dir=ck, ckpt_every=5)
    again = small(pool=1, quantize=False)
    hist = train_asr(again, examples, steps=12, batch_size=4, progress=False, ckpt_dir=ck, ckpt_every=5)
    assert hist.resumed_from == 10


def test_token_asr_reads_tokens():
    rng = np.random.default_rng(0)
    # token 1 means "a", token 2 means "b", token 0 is silence; two tokens per character at pool 2
    texts = ["".join(rng.choice(list("ab"), 3)) for _ in range(64)]
    seqs = [torch.tensor(sum(([0] + [1 if c == "a" else 2] * 2 for c in t), []) + [0]) for t in texts]
    torch.manual_seed(0)
    model = TokenASR(3, pool=2, width=32, heads=2, layers=1)
    train_token_asr(model, seqs, texts, steps=150, batch_size=16, lr=3e-3, progress=False)
    assert error_rate(texts, model.transcribe(seqs), unit="char") < 0.1
    with pytest.raises(ValueError, match="token_ids"): model(torch.tensor([[3]]), torch.tensor([[True]]))


def test_token_asr_from_asr_starts_from_its_decoder_and_given_vectors():
    asr = small(pool=1, quantize=False)
    vecs = torch.randn(5, 32)
    model = TokenASR.from_asr(asr, 5, pool=4, token_vectors=vecs)
    assert torch.equal(model.embed.weight, vecs) and torch.equal(model.decoder.head.weight, asr.decoder.head.weight)
    assert model.decoder.offset.num_embeddings == 4
    with pytest.raises(ValueError, match="token_vectors"): TokenASR.from_asr(asr, 5, 4, torch.randn(4, 32))


def test_token_means():
    v = [torch.tensor([[0.0], [2.0], [10.0]])]
    t = [torch.tensor([0, 0, 1])]
    m = token_means(v, t, 3)
    assert m[0].item() == 1.0 and m[1].item() == 10.0 and m[2].item() in (0.0, 2.0, 10.0)  # unseen: a data vector


# ---- helpers ----------------------------------------------------------------------------------------------------
def test_pool_frames_means_and_short_last_window():
    f = torch.arange(10, dtype=torch.float32)[:, None]
    p = pool_frames(f, 4)
    assert p[:, 0].tolist() == [1.5, 5.5, 8.5]


def test_ssl_units_shapes_and_rate():
    feats = [np.random.default_rng(i).normal(size=(40 + i, 6)).astype(np.float32) for i in range(10)]
    km, (units,) = ssl_units(feats, [feats], pool=4, n_clusters=8, iters=5)
    assert [len(u) for u in units] == [math.ceil((40 + i) / 4) for i in range(10)]
    assert all(int(u.max()) < 8 for u in units)
    with pytest.raises(ValueError, match="n_clusters"): ssl_units(feats[:1], [feats[:1]], pool=8, n_clusters=50)


def test_codebook_usage_extremes():
    assert codebook_usage([torch.arange(8)], 8) == {"used": 1.0, "perplexity": pytest.approx(8.0)}
    assert codebook_usage([torch.zeros(5, dtype=torch.long)], 8) == {"used": 1 / 8, "perplexity": pytest.approx(1.0)}


def test_length_buckets_cover_everything_once():
    lengths = np.random.default_rng(0).integers(1, 100, 103)
    buckets = length_buckets(lengths, 10)
    assert sorted(i for b in buckets for i in b) == list(range(103))
    assert all(max(lengths[b]) - min(lengths[b]) <= 20 for b in buckets[:-1])


def test_vector_quantizer_gradients_reach_encoder_and_codebook():
    vq = VectorQuantizer(4, 8)
    z = torch.randn(2, 5, 4, requires_grad=True)
    q, ids, loss = vq(z)
    (q.sum() + loss).backward()
    assert z.grad is not None and vq.codebook.grad is not None and ids.shape == (2, 5)
    assert torch.allclose(q, vq.lookup(ids))  # forward value is the code itself


@pytest.mark.parametrize("call, words", [
    (lambda m: m.tokenize(np.full(8000, np.nan, np.float32)), ["wavs[0]", "finite"]),
    (lambda m: m.tokenize(torch.zeros(100)), ["wavs[0]", "320 samples"]),
    (lambda m: m.tokenize([]), ["wavs", "at least one"]),
    (lambda m: m.tokenize(torch.zeros(1, 2, 8000)), ["wavs[0]", "1-D"]),
    (lambda m: m(torch.zeros(1, 20, 40), torch.tensor([20])), ["input_features", "80", "(1, 20, 40)"]),
    (lambda m: m(torch.zeros(0, 20, 80), torch.tensor([], dtype=torch.long)), ["input_features", "non-empty"]),
    (lambda m: m(torch.zeros(1, 20, 80), torch.tensor([21])), ["feature_lengths", "[1, 20]"]),
    (lambda m: m(torch.full((1, 20, 80), float("nan")), torch.tensor([20])), ["input_features", "finite"]),
    (lambda m: m.decode(torch.tensor([[0, 16]])), ["ids", "[0, 16)"]),
    (lambda m: m.decode(torch.zeros(1, 3, 7)), ["tokens", "32"]),
    (lambda m: m.quantizer.init_from(torch.randn(5, 32)), ["z", "codebook_size=16"]),
    (lambda m: SupervisedTokenizerConfig(pool=3), ["pool", "block_frames=8"]),
    (lambda m: SupervisedTokenizerConfig(pool=2, quantize=False), ["pool", "quantize=False"]),
    (lambda m: SupervisedTokenizerConfig(hidden_size=30, num_heads=4), ["num_heads", "hidden_size=30"]),
    (lambda m: load_tokenizer(10.0), ["rate", "12.5"]),
    (lambda m: pad_tokens([[1], []]), ["seqs", "non-empty"]),
    (lambda m: train_asr(m, [], steps=1), ["examples", "non-empty"]),
    (lambda m: train_asr(m, [dict(features=torch.zeros(10, 80), text="héllo")], steps=1), ["text", "é"]),
    (lambda m: train_token_asr(TokenASR(3, 1, 32, 2, 1), [[1]], ["a", "b"], 1), ["texts", "1 transcripts", "2"]),
])
def test_bad_input_errors(call, words):
    model = small()
    with pytest.raises(ValueError) as e: call(model)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_continuous_model_refuses_to_tokenize():
    with pytest.raises(ValueError, match="quantize=True"): small(pool=1, quantize=False).tokenize(torch.zeros(8000))
