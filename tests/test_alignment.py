"Chapter 10: token CTC labels, forced alignment, the three alignment recipes (batches, losses, what they train), cosine maps, zero-shot scoring, save/load, bad input."

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from speechllm_course.adapters import SpeechLM, pool_segments, speech_reply
from speechllm_course.alignment import (
    AlignmentCollator, AlignmentObjective, best_match_cosine, ctc_forced_align, normalize_reply, speech_instruction, speech_text_similarity, teacher_replies,
    token_ctc_labels, token_ctc_speech_lm, train_alignment, zero_shot_scores)
from speechllm_course.lm import AUDIO_TOKEN, tiny_llama_config

DIM = 24
TEXTS = ["the red cat sleeps", "my horse eats the apple", "two dogs run", "the old bird has my lemon"]


def tiny_llm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128)).eval()


def examples(n=4, seed=0, frames=(60, 44, 52, 70)):
    g = torch.Generator().manual_seed(seed)
    return [dict(features=torch.randn(frames[i % len(frames)], DIM, generator=g), transcript=TEXTS[i % len(TEXTS)]) for i in range(n)]


def brute_force_best_path(lp, labels):
    "Best CTC path through exactly `labels` by enumerating every frame labelling (tiny cases only)."
    import itertools
    T, best, best_path = lp.shape[0], -np.inf, None
    for path in itertools.product(range(lp.shape[1]), repeat=T):
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        if collapsed != list(labels): continue
        score = sum(lp[t, c] for t, c in enumerate(path))
        if score > best: best, best_path = score, path
    return best_path


def test_forced_alignment_is_the_best_path_spelling_exactly_the_labels():
    rng = np.random.default_rng(0)
    for trial in range(12):
        T, labels = int(rng.integers(3, 7)), [int(x) for x in rng.integers(1, 4, size=int(rng.integers(1, 4)))]
        lp = torch.tensor(rng.normal(size=(T, 4)), dtype=torch.float32).log_softmax(-1)
        path = brute_force_best_path(lp.numpy(), labels)
        got = ctc_forced_align(lp[None], torch.tensor([T]), torch.tensor([labels]), torch.tensor([len(labels)]))[0].tolist()
        if path is None:  # infeasible (too few frames for the repeats): frames shared out evenly, in order
            assert got == sorted(got) and min(got) >= 0
            continue
        assert [labels[i] if i >= 0 else 0 for i in got] == list(path), (trial, got, path)


def test_forced_alignment_handles_a_padded_batch():
    lp = torch.randn(2, 9, 5).log_softmax(-1)
    labels, lengths = torch.tensor([[1, 2, 3], [4, 4, 0]]), torch.tensor([3, 2])
    out = ctc_forced_align(lp, torch.tensor([9, 6]), labels, lengths)
    assert (out[1, 6:] == -1).all()
    for b in range(2):
        seen = [i for i in out[b].tolist() if i >= 0]
        assert sorted(set(seen)) == list(range(int(lengths[b]))) and seen == sorted(seen)  # every label, in order


def test_token_ctc_labels_are_token_ids_plus_one(tokenizer):
    labels, lengths = token_ctc_labels(tokenizer, TEXTS[:2])
    for k, t in enumerate(TEXTS[:2]):
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert labels[k, : lengths[k]].tolist() == [i + 1 for i in ids]
    with pytest.raises(ValueError, match="texts"): token_ctc_labels(tokenizer, "a cat")
    with pytest.raises(ValueError, match=r"texts\[1\]"): token_ctc_labels(tokenizer, ["a cat", " "])


def test_pool_segments_means_each_segment_and_skips_unassigned_frames():
    h = torch.arange(12, dtype=torch.float32).view(1, 6, 2)
    seg = torch.tensor([[0, 0, -1, 1, 1, 1]])
    pooled = pool_segments(h, seg, torch.tensor([2]))
    torch.testing.assert_close(pooled[0], torch.stack([h[0, :2].mean(0), h[0, 3:].mean(0)]))


@pytest.mark.parametrize("objective", ["asr", "implicit", "explicit"])
def test_each_recipe_trains_only_the_adapter_and_lowers_its_loss(tokenizer, objective):
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM)
    exs = examples(4)
    if objective == "implicit":
        exs = [dict(ex, prompt="repeat after me: {}", reply=ex["transcript"]) for ex in exs]
    frozen = {k: v.clone() for k, v in model.llm.state_dict().items()}
    hist = train_alignment(model, tokenizer, exs, objective, steps=25, batch_size=4, lr=3e-3, progress=False, log_every=1)
    assert np.mean(hist.losses[-5:]) < np.mean(hist.losses[:5])
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in frozen.items())  # the LLM never moved


def test_implicit_loss_is_zero_when_speech_reproduces_the_teacher(tokenizer):
    "If the adapter emitted exactly the transcript's token embeddings, student and teacher would see the same sequence: KL 0."
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM)
    ex = [dict(examples(1)[0], prompt="what is the last word of: {}", reply="sleeps")]
    batch = AlignmentCollator(tokenizer, "implicit")(ex)
    text = torch.tensor(tokenizer(ex[0]["transcript"], add_special_tokens=False)["input_ids"])
    emb = model.llm.get_input_embeddings()(text)

    class Exact(torch.nn.Module):  # stands in for a perfectly aligned adapter (its CTC module is the real one)
        def __init__(self, ctc): super().__init__(); self.ctc = ctc
        def forward(self, feats, lengths):
            from speechllm_course.adapters import AdapterOutput
            _, logits, n = self.ctc(feats, lengths)
            return AdapterOutput(emb[None], torch.tensor([len(text)]), logits, n)
    model.adapter = Exact(model.adapter.ctc)
    out = AlignmentObjective(model, "implicit", ctc_weight=0.0)
    logs = out(**batch)
    assert float(logs["kl"]) < 1e-5


def test_explicit_loss_is_zero_on_the_embeddings_themselves(tokenizer):
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM)
    obj = AlignmentObjective(model, "explicit", ctc_weight=0.0)
    batch = AlignmentCollator(tokenizer, "explicit")(examples(2))
    assert float(obj(**batch)["embed_distance"]) > 0.5  # an untrained projection is far from the embeddings
    proj = model.adapter.proj
    model.adapter.proj = torch.nn.Identity()
    emb = model.llm.get_input_embeddings()
    # make every pooled vector equal its token's embedding: feed frames that are the target embeddings themselves
    h_fn = model.adapter.ctc.forward
    labels, lengths = batch["ctc_labels"], batch["ctc_label_lengths"]

    def fake_ctc(feats, n):
        T = 2 * int(lengths.max()) + 1
        logits = torch.full((len(lengths), T, model.adapter.ctc.n_labels), -20.0)
        h = torch.zeros(len(lengths), T, emb.embedding_dim)
        for b in range(len(lengths)):
            for j in range(int(lengths[b])):
                logits[b, 2 * j + 1, labels[b, j]] = 0.0; logits[b, 2 * j, 0] = 0.0
                h[b, 2 * j + 1] = emb.weight[labels[b, j] - 1]
            logits[b, 2 * int(lengths[b]):, 0] = 0.0
        return h, logits, torch.full((len(lengths),), T)
    model.adapter.ctc.forward = fake_ctc
    assert float(obj(**batch)["embed_distance"]) < 1e-6
    model.adapter.ctc.forward, model.adapter.proj = h_fn, proj


def test_collator_shapes_and_teacher_reply_positions_line_up(tokenizer):
    exs = [dict(ex, prompt="how many words are in: {}", reply="four") for ex in examples(3)]
    b = AlignmentCollator(tokenizer, "implicit")(exs)
    student = (b["labels"] != -100).sum(1)
    teacher = (b["teacher_labels"] != -100).sum(1)
    assert torch.equal(student, teacher)  # the same reply tokens on both sides
    assert (b["input_ids"] == tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)).sum() == 3
    for objective in ("asr", "explicit"):
        b = AlignmentCollator(tokenizer, objective)(examples(3))
        assert b["speech_features"].shape[0] == 3 and b["ctc_labels"].shape[0] == 3


def test_teacher_replies_are_the_llms_own_and_deterministic(tokenizer):
    llm = tiny_llm(tokenizer)
    a = teacher_replies(llm, tokenizer, TEXTS, seed=3)
    assert a == teacher_replies(llm, tokenizer, TEXTS, seed=3)
    assert all(r["prompt"].count("{}") == 1 for r in a)
    from speechllm_course.lm import reply
    assert [r["reply"] for r in a] == reply(llm, tokenizer, [r["prompt"].format(t) for r, t in zip(a, TEXTS)], max_new_tokens=24)


def test_similarity_map_is_the_cosine_of_token_embeddings_and_adapter_outputs(tokenizer):
    from speechllm_course.supervised_tokens import pad_features
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM).eval()
    f = examples(1)[0]["features"]
    sim = speech_text_similarity(model, tokenizer, f, TEXTS[0])
    with torch.no_grad():
        audio = model.encode_audio(*pad_features([f]))
        speech = audio.embeds[0, : int(audio.lengths[0])]
        text = model.llm.get_input_embeddings()(torch.tensor(tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]))
    want = torch.stack([torch.stack([torch.nn.functional.cosine_similarity(t, v, dim=0) for v in speech]) for t in text])
    torch.testing.assert_close(sim, want, atol=1e-5, rtol=1e-4)
    feats = [e["features"] for e in examples(3)]
    per_clip = [speech_text_similarity(model, tokenizer, feats[(i + 1) % 3], t).max(1).values.mean().item() for i, t in enumerate(TEXTS[:3])]
    assert best_match_cosine(model, tokenizer, feats, TEXTS[:3], shift=1) == pytest.approx(np.mean(per_clip))  # the control pairs clip i+1 with text i
    np.testing.assert_allclose(best_match_cosine(model, tokenizer, feats, TEXTS[:3], shift=1, per_clip=True), per_clip, rtol=1e-6)


def test_speech_instruction_puts_audio_where_the_transcript_tokens_go(tokenizer):
    assert speech_instruction("what is the last word of: {}") == f"what is the last word of:{AUDIO_TOKEN}"
    assert speech_instruction("{}") == AUDIO_TOKEN
    text = tokenizer.tokenize("what is the last word of: the red cat")
    speech = tokenizer.tokenize(speech_instruction("what is the last word of: {}"))
    assert speech[:-1] == text[: len(speech) - 1] and speech[-1] == AUDIO_TOKEN  # no stray space token before the audio


def test_zero_shot_scores_and_reply_normalisation():
    assert normalize_reply("  Four. ") == "four"
    s = zero_shot_scores(["it is seven", "no", "blue"], ["seven", "yes", "no"], ["seven", "no", "blue"], "qa")
    assert s["accuracy"] == pytest.approx(1 / 3) and s["agreement"] == pytest.approx(2 / 3)
    s = zero_shot_scores(["Los gatos.", "four"], ["los gatos", "five"], ["los gatos", "four"], "instruction")
    assert s == dict(accuracy=0.5, agreement=1.0)
    items = zero_shot_scores(["it is seven", "no", "blue"], ["seven", "yes", "no"], ["seven", "no", "blue"], "qa", per_item=True)
    assert items["right"].tolist() == [1.0, 0.0, 0.0] and items["same"].tolist() == [0.0, 1.0, 1.0]  # each item's outcome, for paired gaps
    with pytest.raises(ValueError, match="kind"): zero_shot_scores(["a"], ["a"], ["a"], "essay")
    with pytest.raises(ValueError, match="replies"): zero_shot_scores(["a"], ["a", "b"], ["a"], "qa")


def test_trained_model_saves_loads_and_replies_the_same(tokenizer, tmp_path):
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM)
    train_alignment(model, tokenizer, examples(4), "explicit", steps=3, batch_size=4, progress=False)
    model.save_pretrained(tmp_path)
    again = SpeechLM.from_pretrained(tmp_path).eval()
    f = [e["features"] for e in examples(2, seed=5)]
    assert speech_reply(model.eval(), tokenizer, f, AUDIO_TOKEN, max_new_tokens=5) == speech_reply(again, tokenizer, f, AUDIO_TOKEN, max_new_tokens=5)
    assert again.adapter.ctc.n_labels == len(tokenizer) + 1


def test_bad_input_names_the_argument(tokenizer):
    model = token_ctc_speech_lm(tiny_llm(tokenizer), tokenizer, DIM)
    with pytest.raises(ValueError, match="objective"): AlignmentCollator(tokenizer, "telepathy")
    with pytest.raises(ValueError, match="objective"): AlignmentObjective(model, "telepathy")
    fixed = SpeechLM.from_llm(tiny_llm(tokenizer), tokenizer, "stack_mlp", DIM)
    with pytest.raises(ValueError, match="model"): AlignmentObjective(fixed, "explicit")
    with pytest.raises(ValueError, match=r"examples\[0\]"): AlignmentCollator(tokenizer, "implicit")(examples(1))
    with pytest.raises(ValueError, match="examples"): train_alignment(model, tokenizer, [], "asr", steps=1)
    with pytest.raises(ValueError, match="prompts"): teacher_replies(tiny_llm(tokenizer), tokenizer, ["a cat"], prompts=("{} and {}",))
    with pytest.raises(ValueError, match="log_probs"): ctc_forced_align(torch.zeros(3, 4), torch.tensor([3]), torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="labels"): ctc_forced_align(torch.zeros(2, 3, 4), torch.tensor([3, 3]), torch.tensor([[1]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="transcript"): speech_text_similarity(model, tokenizer, torch.randn(30, DIM), "")
    with pytest.raises(ValueError, match="template"): speech_instruction("no slot")
    with pytest.raises(ValueError, match="n_labels"):
        from speechllm_course.adapters import make_adapter
        make_adapter("ctc_compress", DIM, 16, n_labels=1)


def test_load_aligned_lm_knows_its_models():
    "Later chapters load chapter 10's models by name; an unknown name is refused before anything is built."
    from speechllm_course.alignment import ALIGNED_MODELS, ALIGNMENT_OBJECTIVES, load_aligned_lm
    with pytest.raises(ValueError, match="name"): load_aligned_lm("telepathic")
    assert {name.split("_")[0] for name in ALIGNED_MODELS} == set(ALIGNMENT_OBJECTIVES)
    assert [lora for _, lora in ALIGNED_MODELS.values()] == [False, True, False, False]  # only 'asr_lora' adds LoRA


def test_cached_token_ctc_depends_on_its_seed_and_not_on_what_ran_before_it(tokenizer, tmp_path, monkeypatch):
    "Every alignment model of chapter 10 starts from the cached token-CTC module: it must not change with what ran before it was built."
    from speechllm_course.alignment import cached_token_ctc
    base = tiny_llm(tokenizer)
    make = lambda: token_ctc_speech_lm(copy.deepcopy(base), tokenizer, DIM)  # the adapter's initial weights come from the global random state
    states = []
    for caller_seed, root, seed in ((1, "first", 0), (2, "second", 0), (1, "third", 1)):
        monkeypatch.setenv("SPEECHLLM_DATA", str(tmp_path / root))
        torch.manual_seed(caller_seed); expected_next = torch.rand(3)
        torch.manual_seed(caller_seed)
        states.append(cached_token_ctc(make, tokenizer, examples(), steps=2, batch_size=2, lr=1e-2, scale="smoke", seed=seed, progress=False))
        assert torch.equal(torch.rand(3), expected_next), "building the module must not move the caller's random stream"
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert states[0] and same(states[0], states[1]), "same seed, different caller: the module must be the same"
    assert not same(states[0], states[2]), "another seed must be another module"
