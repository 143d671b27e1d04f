"Chapter 10b: unit tokens, word-level interleaving, training mixes, few-shot prompts, modality-restricted generation, the text-to-token model, likelihood transfer, save/load, bad input."

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from speechllm_course.interleaving import (
    SPEECH_MARKER, TEXT_MARKER, SpeechTextVocab, add_speech_tokens, asr_prompt, candidate_sets, continue_pretraining, cross_modal_nll,
    expand_units, few_shot_asr, few_shot_tts, generate, interleave_plan, interleaved_documents, mean_run_lengths, new_text_to_token, pack_mix,
    pad_examples, shared_prefix_nlls, speech_documents, speech_text_llm, synthetic_documents, target_nlls, text_documents_ids, text_to_token,
    text_to_token_examples, train_text_to_token, transcript_choice, transcription_documents, tts_prompt, unit_error_rate, unit_token, utterance_halves, utterance_spans,
    word_frames)
from speechllm_course.lm import load_llm, render, text_documents, tiny_llama_config, train_text_tokenizer
from speechllm_course.supervised_tokens import error_rate
from speechllm_course.units import dedup

K = 12
TEXTS = ["the red cat sleeps", "my horse eats the apple", "two dogs run", "the old bird has my lemon"]


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return add_speech_tokens(tokenizer, K)


def tiny_llm(vocab, seed=0, max_len=256):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab.tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=max_len)).eval()


def fake_utterance(text, seed=0, by_word=False):
    "An utterance whose word i lasts 3 + i % 3 frames of units (2i, 2i+1 repeated; by_word: two units chosen by the word itself), with word timings."
    words, starts, ends, units, t = text.split(), [], [], [], 0
    for i, _ in enumerate(words):
        n = 3 + i % 3
        starts.append(t / 50); ends.append((t + n) / 50)
        first = sum(map(ord, words[i])) % K if by_word else (2 * i) % K
        units += [first] * 2 + [(first + 1 if by_word else 2 * i + 1) % K] * (n - 2)
        t += n
    units = np.array(units)
    return dict(words=words, bounds=word_frames(starts, ends, len(units)), units=units, text=text)


def test_unit_tokens_round_trip_and_resize(tokenizer):
    tok = train_text_tokenizer([render(d) for d in text_documents(200, seed=1)], vocab_size=150)
    model = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=64))
    old = model.get_input_embeddings().weight.detach().clone()
    v = add_speech_tokens(tok, K, model, max_len=300)
    assert len(tok) == len(old) + K + 2 and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert torch.equal(model.get_input_embeddings().weight[: len(old)], old)  # the text tokens are untouched
    assert model.config.max_position_embeddings == 300
    assert add_speech_tokens(tok, K, model).text_id == v.text_id and len(tok) == len(old) + K + 2  # idempotent
    units = np.arange(K)[::-1]
    assert v.to_units(v.units(units)).tolist() == units.tolist()
    assert [tok.convert_ids_to_tokens(i) for i in v.units([0, 5])] == [unit_token(0), unit_token(5)]
    speech, text = v.mask("speech"), v.mask("text")
    assert speech.sum() == K + 1 and not (speech & text)[torch.arange(len(tok)) != v.end_id].any()  # only the end token is shared
    assert not text[v.text_id] and not text[v.speech_id]


def test_spans_encode_like_their_string(vocab):
    spans = [("text", "the red"), ("speech", [3, 1, 4]), ("text", "cat sleeps")]
    ids = vocab.encode(spans)
    assert ids == [vocab.text_id] + vocab.text("the red") + [vocab.speech_id] + vocab.units([3, 1, 4]) + [vocab.text_id] + vocab.text("cat sleeps") + [vocab.end_id]
    assert vocab.tokenizer(vocab.render(spans), add_special_tokens=False)["input_ids"] == ids
    assert vocab.render(spans).startswith(TEXT_MARKER + "the red" + SPEECH_MARKER + "<u3><u1><u4>")
    assert vocab.encode(spans, end=False) == ids[:-1]


def test_word_frames():
    assert word_frames([0.0, 0.1, 0.31], [0.1, 0.31, 0.5], 24) == [(0, 5), (5, 16), (16, 24)]
    assert word_frames([0.0, 0.2], [0.2, 0.2], 30) == [(0, 10), (10, 11)]  # a zero-length word still owns a frame
    assert word_frames([0.0, 0.9], [0.9, 1.0], 40) == [(0, 40), (39, 40)]  # clipped to the clip


def test_interleave_plan_covers_the_words_alternating_and_repeats_from_its_seed():
    for n in range(1, 9):
        for seed in range(20):
            plan = interleave_plan(n, seed, 0.3)
            assert plan[0][1] == 0 and plan[-1][2] == n and all(p[2] == q[1] and p[1] < p[2] for p, q in zip(plan, plan[1:]))
            assert all(p[0] != q[0] for p, q in zip(plan, plan[1:]))  # modalities alternate
            assert len(plan) >= 2 or n == 1  # at least one switch
            assert plan == interleave_plan(n, seed, 0.3)
    assert len({tuple(interleave_plan(6, s)) for s in range(30)}) > 5  # seeds differ
    assert interleave_plan(4, 0, 1.0, first="text") == [("text", 0, 1), ("speech", 1, 2), ("text", 2, 3), ("speech", 3, 4)]


def test_interleaving_respects_word_boundaries_and_markers(vocab):
    u = fake_utterance("my horse eats the apple")
    plan = [("text", 0, 2), ("speech", 2, 4), ("text", 4, 5)]
    spans = utterance_spans(u["words"], u["bounds"], u["units"], plan)
    assert spans[0] == ("text", "my horse") and spans[2] == ("text", "apple")
    assert spans[1][0] == "speech" and spans[1][1].tolist() == [4, 5, 6, 7]  # exactly the deduplicated units of words 2 and 3
    docs = interleaved_documents(vocab, [fake_utterance(t) for t in TEXTS], 3, 0.4, seed=7)
    assert docs == interleaved_documents(vocab, [fake_utterance(t) for t in TEXTS], 3, 0.4, seed=7)
    assert docs != interleaved_documents(vocab, [fake_utterance(t) for t in TEXTS], 3, 0.4, seed=8)
    for d, t in zip(docs, [t for t in TEXTS for _ in range(3)]):
        assert d[0] in (vocab.text_id, vocab.speech_id) and d[-1] == vocab.end_id and d.count(vocab.end_id) == 1
        assert vocab.text_id in d and vocab.speech_id in d
        # every marker is followed by its modality's tokens, never the other's
        for i, x in enumerate(d[:-1]):
            if x == vocab.speech_id: assert d[i + 1] in vocab._unit_of
            if x == vocab.text_id: assert d[i + 1] not in vocab._unit_of
        words = vocab.tokenizer.decode([x for x in d if x not in vocab._unit_of], skip_special_tokens=True).split()
        assert words == [w for w in t.split() if w in words]  # the text spans are the sentence's own words, in order


def test_documents_and_packing(vocab):
    s = speech_documents(vocab, [np.array([1, 1, 2, 2, 2, 1])])
    assert s == [[vocab.speech_id] + vocab.units([1, 2, 1]) + [vocab.end_id]]
    t = text_documents_ids(vocab, ["the cat" + vocab.tokenizer.eos_token])
    assert t == [[vocab.text_id] + vocab.text("the cat") + [vocab.end_id]]
    blocks, counts = pack_mix(dict(speech=s * 10, text=t * 10), block=8, seed=0)
    assert blocks.shape[1] == 8 and counts == dict(speech=10 * len(s[0]), text=10 * len(t[0]))
    assert torch.equal(blocks, pack_mix(dict(speech=s * 10, text=t * 10), block=8, seed=0)[0])


def test_transcription_documents_pair_each_utterance_both_ways(vocab):
    u = fake_utterance("the red cat")
    S, T, E = vocab.speech_id, vocab.text_id, vocab.end_id
    units = vocab.units(dedup(u["units"])[0])
    asr = [S, *units, T, *vocab.text("the red cat"), E]
    tts = [T, *vocab.text("the red cat"), S, *units, E]
    assert transcription_documents(vocab, [u]) == [asr, tts]
    assert transcription_documents(vocab, [u], repeats=2) == [asr, tts, asr, tts]
    two = transcription_documents(vocab, [u, fake_utterance("two dogs run")])
    assert len(two) == 4 and two[:2] == [asr, tts] and two[2] != asr
    # the ASR pair reads exactly like a zero-shot ASR prompt followed by the transcript
    assert asr == asr_prompt(vocab, [], dedup(u["units"])[0]) + vocab.text("the red cat") + [E]


def test_few_shot_prompts_are_exact(vocab):
    shots = [(np.array([1, 2]), "the cat"), (np.array([3]), "a dog")]
    got = asr_prompt(vocab, shots, np.array([4, 5]))
    S, T, E, u = vocab.speech_id, vocab.text_id, vocab.end_id, vocab.units
    assert got == [S, *u([1, 2]), T, *vocab.text("the cat"), E, S, *u([3]), T, *vocab.text("a dog"), E, S, *u([4, 5]), T]
    assert vocab.tokenizer.decode(got).startswith("[SPEECH]<u1><u2>[TEXT] the cat<|end|>[SPEECH]<u3>")
    got = tts_prompt(vocab, shots[:1], "my horse")
    assert got == [T, *vocab.text("the cat"), S, *u([1, 2]), E, T, *vocab.text("my horse"), S]
    assert asr_prompt(vocab, [], np.array([4])) == [S, *u([4]), T]  # zero-shot


def test_generation_stays_in_its_modality(vocab):
    model = tiny_llm(vocab)
    prompts = [[vocab.text_id] + vocab.text(t) + [vocab.speech_id] for t in TEXTS]
    speech = generate(model, vocab, prompts, "speech", [5, 9, 1, 7], temperature=1.0, seed=3)
    assert [len(g) <= c for g, c in zip(speech, [5, 9, 1, 7])] == [True] * 4
    for g in speech:
        assert all(x in vocab._unit_of for x in g) and all(a != b for a, b in zip(g, g[1:]))  # units only, never one twice in a row
    assert speech == generate(model, vocab, prompts, "speech", [5, 9, 1, 7], temperature=1.0, seed=3)  # seeded sampling repeats
    text = generate(model, vocab, prompts, "text", 6)
    assert all(x not in vocab._unit_of and x not in (vocab.text_id, vocab.speech_id) for g in text for x in g)
    assert text[1] == generate(model, vocab, prompts[1:2], "text", 6)[0]  # left padding does not change a greedy continuation
    shots = [[(np.array([1, 2]), "the cat")]] * 2
    assert len(few_shot_asr(model, vocab, shots, [np.array([3, 4]), np.array([5])], max_new_tokens=3)) == 2
    assert all(len(u) <= 2 * 2 * 2 + 4 for u in few_shot_tts(model, vocab, shots, ["my cat", "a dog"], units_per_word=2.0))


def test_target_nlls_are_per_item_and_batch_invariant(vocab):
    model = tiny_llm(vocab)
    prefixes = [[vocab.speech_id, *vocab.units([1, 2, 3]), vocab.text_id], [vocab.text_id]]
    targets = [vocab.text("the red cat") + [vocab.end_id], vocab.text("two dogs run fast") + [vocab.end_id]]
    batched = target_nlls(model, prefixes, targets, vocab.pad_id, batch_size=2)
    for p, t, got in zip(prefixes, targets, batched):  # right padding changes nothing: each item alone, by hand
        with torch.no_grad(): logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0, :-1].float(), -1)
        assert got == pytest.approx(-sum(float(logp[len(p) - 1 + i, x]) for i, x in enumerate(t)), rel=1e-4)


def test_transcript_choice_scores_every_candidate_after_its_prompt(vocab):
    model = tiny_llm(vocab)
    shots = [[(np.array([1, 2]), "the cat")], []]
    units = [np.array([3, 4]), np.array([5])]
    cands = [["the red cat", "two dogs run", "my horse"], ["a dog", "the cat", "my lemon"]]
    nll = transcript_choice(model, vocab, shots, units, cands)
    assert nll.shape == (2, 3)
    for i in range(2):  # the prompt read once and shared: the same scores as reading it with every candidate
        prompt = asr_prompt(vocab, shots[i], units[i])
        want = target_nlls(model, [prompt] * 3, [vocab.text(c) + [vocab.end_id] for c in cands[i]], vocab.pad_id)
        assert np.allclose(nll[i], want, rtol=1e-4)
    with pytest.raises(ValueError, match="candidates_per_item"):
        transcript_choice(model, vocab, shots, units, [["the cat"], ["a dog"]])
    with pytest.raises(ValueError, match="context"):  # a prompt past the model's context (256 here) is refused, not scored
        transcript_choice(model, vocab, [[(np.arange(K), "the cat")] * 20], units[:1], cands[:1])


def test_shared_prefix_nlls_match_reading_the_prefix_with_each_target(vocab):
    model = tiny_llm(vocab)
    prefix = vocab.encode([("speech", np.array([1, 2, 3])), ("text", "the cat")])
    targets = [vocab.text("a dog"), vocab.text("two red horses run"), [vocab.end_id]]  # different lengths: right-padded after the cache
    got = shared_prefix_nlls(model, prefix, targets, vocab.pad_id)
    want = target_nlls(model, [prefix] * 3, targets, vocab.pad_id)
    assert got.shape == (3,) and np.allclose(got, want, rtol=1e-4) and (got > 0).all()
    assert np.allclose(shared_prefix_nlls(model, prefix, targets[1:2], vocab.pad_id), want[1:2], rtol=1e-4)  # one target, no padding
    with pytest.raises(ValueError, match="targets: expected one or more non-empty"):
        shared_prefix_nlls(model, prefix, [vocab.text("a dog"), []], vocab.pad_id)
    with pytest.raises(ValueError, match="prefix: expected at least one token"):
        shared_prefix_nlls(model, [], targets, vocab.pad_id)
    with pytest.raises(ValueError, match="prefix: expected prefix \\+ target within the model's context"):
        shared_prefix_nlls(model, list(prefix) * 100, targets, vocab.pad_id)


def test_choice_sets_are_seeded_and_hold_the_truth():
    truths = ["a cat", "a dog", "a cat", "my lemon", "two dogs run"]
    sets, answer = candidate_sets(truths, n_choices=3, seed=1)
    again, again_answer = candidate_sets(truths, n_choices=3, seed=1)
    assert again == sets and again_answer.tolist() == answer.tolist()  # seeded
    for truth, cands, a in zip(truths, sets, answer):
        assert cands[a] == truth and len(set(cands)) == 3 and set(cands) <= set(truths)
    assert len({int(a) for a in candidate_sets(truths * 20, n_choices=3, seed=2)[1]}) == 3  # the answer's slot varies
    with pytest.raises(ValueError, match="n_choices: expected an int from 2 to the number of distinct answers"):
        candidate_sets(["a", "b"], n_choices=3)


def test_text_to_token_trains_and_reloads_identically(vocab, tmp_path):
    utts = [fake_utterance(t) for t in TEXTS]
    ex = text_to_token_examples(vocab, utts, spans_per_utterance=2, seed=0)
    assert len(ex) == len(TEXTS) * 3
    for e in ex:
        s = e["input_ids"].index(vocab.speech_id)
        assert e["labels"][: s + 1] == [-100] * (s + 1) and e["labels"][s + 1:] == e["input_ids"][s + 1:] and e["input_ids"][-1] == vocab.end_id
    batch = pad_examples(ex[:3], vocab.pad_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    model = new_text_to_token(vocab.tokenizer, hidden=32, layers=1, max_len=128)
    hist = train_text_to_token(model, vocab, ex, steps=40, batch_size=6, lr=1e-2, progress=False, log_every=10)
    assert hist.losses[-1] < 0.7 * hist.losses[0]
    out = text_to_token(model, vocab, TEXTS, units_per_word=2.5)
    model.save_pretrained(tmp_path); vocab.tokenizer.save_pretrained(tmp_path)
    again, tok = load_llm(str(tmp_path))
    assert [u.tolist() for u in text_to_token(again, SpeechTextVocab(tok, K), TEXTS, units_per_word=2.5)] == [u.tolist() for u in out]
    docs, counts = synthetic_documents(model, vocab, ["the red cat sleeps", "two dogs run"], 2.5, switch_prob=0.5, seed=1)
    assert len(docs) == 2 and counts["speech_spans"] >= 2 and all(d[0] in (vocab.text_id, vocab.speech_id) and d[-1] == vocab.end_id for d in docs)


def test_continued_pretraining_and_transfer_measure(tokenizer):
    tok = train_text_tokenizer([render(d) for d in text_documents(200, seed=2)], vocab_size=150)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=64))
    llm = speech_text_llm(llm, tok, K, max_len=128)
    v = SpeechTextVocab(tok, K)
    utts = [fake_utterance(t, by_word=True) for t in TEXTS]  # units that say which word was spoken
    blocks, _ = pack_mix(dict(inter=interleaved_documents(v, utts, 8, 0.5, seed=0)), block=32)
    hist = continue_pretraining(llm, blocks, steps=30, batch_size=4, lr=1e-2, progress=False, log_every=10)
    assert hist.losses[-1] < hist.losses[0]
    out = cross_modal_nll(llm, v, utts)
    assert all(np.isfinite(out[k]) for k in out if not k.startswith("transfer")) and {"transfer_s2t", "gain_t2s", "nll_text|speech"} <= set(out)
    assert out["gain_s2t"] == pytest.approx(out["nll_text|speech_other"] - out["nll_text|speech"])
    assert out["same_gain_t2s"] == pytest.approx(out["nll_speech|speech_other"] - out["nll_speech|speech"])
    for key in ("s2t", "t2s"):  # the share is defined only where the same modality helps
        same = out[f"same_gain_{key}"]
        assert np.isnan(out[f"transfer_{key}"]) if same <= 0.02 else out[f"transfer_{key}"] == pytest.approx(out[f"gain_{key}"] / same)
    h = utterance_halves(v, utts[0])  # "the red cat sleeps": heard or read up to "red", then "cat sleeps"
    assert h["tail"] == "cat sleeps" and h["tail_text"] == v.text("cat sleeps") and h["text"] == [v.text_id] + v.text("the red")
    assert h["speech"] == [v.speech_id] + v.units(dedup(utts[0]["units"][: utts[0]["bounds"][2][0]])[0])
    assert h["tail_units"] == v.units(dedup(utts[0]["units"][utts[0]["bounds"][2][0]:])[0])
    detailed = cross_modal_nll(llm, v, utts, per_item=True)
    for key, nlls in detailed["items"].items():  # per-utterance NLLs add up to the per-token averages
        assert len(nlls) == len(utts) and nlls.sum() / detailed["tokens"][key.split("|")[0][4:]] == pytest.approx(out[key], rel=1e-6)
    # a model trained on interleaved data of these four sentences predicts their text tails better after their own speech than another's
    assert out["nll_text|speech"] < out["nll_text|speech_other"]


def test_units_to_frames_and_unit_error_rate():
    mean = mean_run_lengths([np.array([0, 0, 1, 2, 2, 2, 0, 0, 0, 0])], 4)
    assert mean.tolist() == [3.0, 1.0, 3.0, 1.0]  # unit 3 never seen: 1
    assert expand_units([0, 1, 2], mean).tolist() == [0, 0, 0, 1, 2, 2, 2]
    frames = expand_units([0, 1, 0, 1], np.array([1.5, 1.5]))
    assert len(frames) == 6 and dedup(frames)[0].tolist() == [0, 1, 0, 1]  # fractions carried: 1.5 + 1.5 + 1.5 + 1.5 frames
    assert unit_error_rate([[1, 2, 3], [4]], [[1, 3], [4, 5]]) == pytest.approx(2 / 4)


def bad_calls(vocab, model):
    u = fake_utterance("the red cat")
    return [
        (lambda: add_speech_tokens(vocab.tokenizer, 0), "n_units"),
        (lambda: add_speech_tokens(vocab.tokenizer, 3, max_len=1), "max_len"),
        (lambda: SpeechTextVocab(vocab.tokenizer, K + 1), "tokenizer"),
        (lambda: vocab.units([0, K]), "units"),
        (lambda: vocab.text(" "), "text"),
        (lambda: vocab.encode([]), "spans"),
        (lambda: vocab.encode([("text", "a"), ("audio", [1])]), r"spans\[1\]"),
        (lambda: vocab.encode([("speech", [])]), r"spans\[0\]"),
        (lambda: vocab.mask("video"), "modality"),
        (lambda: word_frames([0.0], [0.1, 0.2], 10), "word_end"),
        (lambda: word_frames([0.2], [0.1], 10), r"word_end\[0\]"),
        (lambda: word_frames([0.0], [0.1], 0), "n_frames"),
        (lambda: interleave_plan(0), "n_words"),
        (lambda: interleave_plan(3, switch_prob=0), "switch_prob"),
        (lambda: interleave_plan(3, first="audio"), "first"),
        (lambda: utterance_spans(u["words"], u["bounds"][:2], u["units"], [("text", 0, 3)]), "bounds"),
        (lambda: utterance_spans(u["words"], u["bounds"], u["units"], [("text", 0, 1), ("speech", 2, 3)]), "plan"),
        (lambda: interleaved_documents(vocab, [u], 0), "n_per_utterance"),
        (lambda: transcription_documents(vocab, [u], 0), "repeats"),
        (lambda: transcription_documents(vocab, [u, dict(units=u["units"])]), r"utterances\[1\]"),
        (lambda: transcription_documents(vocab, ["the red cat"]), r"utterances\[0\]"),
        (lambda: pack_mix({}, 8), "sources"),
        (lambda: asr_prompt(vocab, [(np.array([1]), "")], np.array([2])), r"shots\[0\]"),
        (lambda: tts_prompt(vocab, [(np.array([1]), "a"), ("units", "b")], "c"), r"shots\[1\]"),
        (lambda: generate(model, vocab, [], "text", 3), "prompts"),
        (lambda: generate(model, vocab, [[1]], "speech", [3, 4]), "max_new_tokens"),
        (lambda: generate(model, vocab, [[1]], "speech", 3, temperature=-1), "temperature"),
        (lambda: generate(model, vocab, [[1]], "both", 3), "modality"),
        (lambda: generate(model, vocab, [[1] * 300], "text", 3), "prompts"),  # longer than the model's context (256)
        (lambda: few_shot_asr(model, vocab, [[]], [np.array([1]), np.array([2])]), "shots_per_item"),
        (lambda: few_shot_tts(model, vocab, [[], []], ["a"], 2.0), "shots_per_item"),
        (lambda: text_to_token(model, vocab, "a cat", 2.0), "texts"),
        (lambda: text_to_token(model, vocab, ["a cat"], 0.0), "units_per_word"),
        (lambda: text_to_token_examples(vocab, [], 1), "utterances"),
        (lambda: synthetic_documents(model, vocab, ["a cat", " "], 2.0), "sentences"),
        (lambda: cross_modal_nll(model, vocab, [fake_utterance("cat")]), "utterances"),
        (lambda: continue_pretraining(model, torch.tensor([[0, len(vocab) + 5]]), steps=1), "blocks"),
        (lambda: continue_pretraining(model, [[0, 1]], steps=1), "blocks"),
        (lambda: expand_units([1], np.array([0.5, 2.0])), "mean_run"),
        (lambda: expand_units([3], np.array([1.0, 2.0])), "units"),
        (lambda: mean_run_lengths([np.array([0, 7])], 4), "unit_seqs"),
        (lambda: unit_error_rate([[1]], [[1], [2]]), "hyps"),
        (lambda: unit_error_rate([[]], [[1]]), "refs"),
        (lambda: pad_examples([], 0), "examples"),
    ]


def test_bad_input_names_the_argument(vocab):
    model = tiny_llm(vocab)
    for call, name in bad_calls(vocab, model):
        with pytest.raises(ValueError, match=name): call()
