"Chapter 11: answer formats of the sequence schemes and their grammar, batched KV-cache generation, the parallel LM, the CTC unit decoder, the RQ-Transformer, full duplex, bad input."

import dataclasses
import re

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from speechllm_course.generation import (
    GENERATION_SIZES, SCHEMES, SEQUENCE_SCHEMES, CTCUnitDecoder, ParallelCollator, ParallelSpeechLM, RQTransformer, RQTransformerConfig,
    SchemeGrammar, answer_hidden_states, answer_prompt_ids, check_scheme, duplex_dialogue, duplex_frames, duplex_listen, generate_sequence,
    load_parallel, parallel_loss, prompt_embeds, rq_collate, save_parallel, scheme_target, split_output, text_driven_answer,
    train_rq_transformer, train_scheme, turn_taking)
from speechllm_course.interleaving import add_speech_tokens
from speechllm_course.lm import AUDIO_TOKEN, END_TOKEN, ROLE_TOKENS, chat, tiny_llama_config

K, H = 12, 32  # units; hidden size of every tiny model (the "adapter output" is random (n, H) vectors)
# (spoken question, text answer, deduplicated units of the spoken answer)
QA = [("what does the red cat eat", "the red apple", [1, 5, 2, 7, 3, 9, 4, 0, 2, 6, 11, 8]),
      ("how many dogs run", "two dogs", [8, 0, 11, 6, 10, 4, 1])]
SIZES = dataclasses.replace(GENERATION_SIZES["smoke"], text_chunk=2, speech_chunk=3, max_text=16, max_units=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

@pytest.fixture(scope="module")
def vocab(tokenizer):
    return add_speech_tokens(tokenizer, K)


@pytest.fixture(scope="module")
def prompt(vocab):
    return answer_prompt_ids(vocab.tokenizer)


def tiny_llm(vocab, seed=0, hidden=H, layers=1):
    "A random text LM over the text tokens only, then grown by the unit tokens and markers (as the chapter grows chapter 08's LLM)."
    torch.manual_seed(seed)
    cfg = tiny_llama_config(vocab.tokenizer, hidden=hidden, layers=layers, heads=2, kv_heads=1, max_len=256)
    cfg.vocab_size = len(vocab.tokenizer) - K - 2
    model = LlamaForCausalLM(cfg)
    assert add_speech_tokens(vocab.tokenizer, K, model).unit_ids.tolist() == vocab.unit_ids.tolist()
    assert model.get_input_embeddings().weight.shape[0] == len(vocab.tokenizer)
    return model.eval()


def random_audio(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, generator=g) for n in lengths]


def only(vocab, *ids):
    m = torch.zeros(len(vocab), dtype=torch.bool)
    m[list(ids)] = True
    return m


# ---------------------------------------------------------------- answer formats

def test_check_scheme_and_prompt_split(vocab):
    assert check_scheme("parallel") == "parallel" and all(check_scheme(s, SEQUENCE_SCHEMES) == s for s in SEQUENCE_SCHEMES)
    assert set(SEQUENCE_SCHEMES) < set(SCHEMES)
    for call in (lambda: check_scheme("telepathy"), lambda: check_scheme("parallel", SEQUENCE_SCHEMES)):
        with pytest.raises(ValueError, match="scheme"): call()
    tok = vocab.tokenizer
    before, after = answer_prompt_ids(tok)
    whole = tok(tok.apply_chat_template(chat(AUDIO_TOKEN), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert before + [tok.convert_tokens_to_ids(AUDIO_TOKEN)] + after == whole
    assert before == [tok.convert_tokens_to_ids(ROLE_TOKENS["user"])]
    assert after == tok.convert_tokens_to_ids([END_TOKEN, ROLE_TOKENS["assistant"]])


@pytest.mark.parametrize("scheme", SEQUENCE_SCHEMES)
def test_scheme_target_round_trips_through_split_output(vocab, scheme):
    for question, answer, units in QA:
        ids = scheme_target(vocab, scheme, question, answer, units, text_chunk=2, speech_chunk=3)
        assert ids[-1] == vocab.end_id and ids.count(vocab.end_id) == 1 and ids.count(vocab.speech_id) == 1
        for out in (split_output(vocab, scheme, ids), split_output(vocab, scheme, ids[:-1])):  # with or without the end token
            assert out["text"] == answer and out["units"].tolist() == units
            assert out["transcript"] == (question if scheme == "chain_of_modality" else "")
            assert ids[out["first_unit"]] == vocab.unit_ids[units[0]] and all(t not in vocab._unit_of for t in ids[: out["first_unit"]])
        text = vocab.text(answer)
        if scheme == "chain_of_modality":  # the transcript, [TEXT], the answer, [SPEECH], the units
            q = vocab.text(question)
            assert ids == q + [vocab.text_id] + text + [vocab.speech_id] + vocab.units(units) + [vocab.end_id]
        elif scheme == "text_first":
            assert ids == text + [vocab.speech_id] + vocab.units(units) + [vocab.end_id]


def test_streaming_thoughts_layout(vocab):
    S, E, u = vocab.speech_id, vocab.end_id, vocab.units
    units = list(range(K))
    t = vocab.text("the red apple")
    assert len(t) == 7  # 3 full chunks of 2, then 1
    got = scheme_target(vocab, "streaming_thoughts", "q", "the red apple", units, text_chunk=2, speech_chunk=3)
    assert got == t[0:2] + u([0, 1, 2]) + t[2:4] + u([3, 4, 5]) + t[4:6] + u([6, 7, 8]) + t[6:7] + [S] + u([9, 10, 11]) + [E]
    t = vocab.text("two dogs")
    assert len(t) == 4  # exactly 2 chunks of 2: [SPEECH] comes right after the last text token, before that chunk's units
    got = scheme_target(vocab, "streaming_thoughts", "q", "two dogs", units[:10], text_chunk=2, speech_chunk=3)
    assert got == t[0:2] + u([0, 1, 2]) + t[2:4] + [S] + u([3, 4, 5]) + u([6, 7, 8, 9]) + [E]
    got = scheme_target(vocab, "streaming_thoughts", "q", "two dogs", units[:10], text_chunk=4, speech_chunk=3)  # one chunk only
    assert got == t + [S] + u(units[:10]) + [E]
    assert split_output(vocab, "streaming_thoughts", got)["first_unit"] == len(t) + 1


def test_scheme_target_bad_input(vocab):
    calls = [(lambda: scheme_target(vocab, "parallel", "q", "a", [1, 2]), "scheme"),
             (lambda: scheme_target(vocab, "text_first", "what", "", [1, 2]), "answer_text"),
             (lambda: scheme_target(vocab, "text_first", "what", " ", [1, 2]), "answer_text"),
             (lambda: scheme_target(vocab, "text_first", "what", "two", [K + 3]), "units"),
             (lambda: scheme_target(vocab, "text_first", "what", "two", []), "units"),
             (lambda: split_output(vocab, "text_driven", [1, 2]), "scheme"),
             (lambda: SchemeGrammar(vocab, "parallel", len(vocab)), "scheme"),
             (lambda: train_scheme(torch.nn.Linear(1, 1), "coarse_to_fine", [{}], ([], []), 0, steps=1, progress=False), "scheme")]
    for call, name in calls:
        with pytest.raises(ValueError, match=name): call()


# ---------------------------------------------------------------- the grammar

@pytest.mark.parametrize("scheme", SEQUENCE_SCHEMES)
def test_grammar_accepts_every_target(vocab, scheme):
    g = SchemeGrammar(vocab, scheme, len(vocab), text_chunk=2, speech_chunk=3, max_text=100, max_units=100)
    for question, answer, units in QA:
        for tc, sc in ((2, 3), (4, 3)) if scheme == "streaming_thoughts" else ((2, 3),):
            g.text_chunk, g.speech_chunk = tc, sc
            ids = scheme_target(vocab, scheme, question, answer, units, text_chunk=tc, speech_chunk=sc)
            assert all(g.allowed(ids[:i])[t] for i, t in enumerate(ids)), (scheme, answer, tc)


def test_grammar_forbids_what_does_not_belong(vocab):
    g = SchemeGrammar(vocab, "text_first", len(vocab), max_text=5, max_units=4)
    S, E, u, t = vocab.speech_id, vocab.end_id, vocab.units, vocab.text("two dogs")
    units, text = torch.from_numpy(vocab.unit_ids), g.text
    start = g.allowed([])
    assert torch.equal(start, text) and not start[units].any() and not start[E] and not start[S]  # text first; no empty text
    after_text = g.allowed(t[:2])
    assert not after_text[units].any() and not after_text[E] and after_text[S] and after_text[t[2]]  # no units before [SPEECH]
    assert not text[[vocab.text_id, S, E, vocab.pad_id, *units.tolist()]].any()
    after_speech = g.allowed(t[:2] + [S])
    assert torch.equal(after_speech, g.units) and not after_speech[E]  # the end only once a unit is written
    m = g.allowed(t[:2] + [S] + u([3]))
    assert not m[u([3])[0]] and m[u([4])[0]] and m[E] and not m[t[0]] and not m[S]  # no repeat, no text after [SPEECH]
    assert m.sum() == K  # the K - 1 other units and the end
    assert torch.equal(g.allowed(t[:2] + [S] + u([3, 4, 3, 4])), only(vocab, E))  # max_units: the end is forced
    assert torch.equal(g.allowed(t[:2] + [S] + u([3, 4, 3])), (g.units | only(vocab, E)) & ~only(vocab, u([3])[0]))
    assert torch.equal(g.allowed(vocab.text("the red apple")[:5]), only(vocab, S))  # max_text: [SPEECH] is forced
    assert g.allowed(vocab.text("the red apple")[:4])[vocab.text("the red apple")[4]]

    com = SchemeGrammar(vocab, "chain_of_modality", len(vocab), max_text=3, max_units=4)
    q = vocab.text("how many dogs run")
    assert torch.equal(com.allowed([]), com.text)  # the transcript starts with text: no [TEXT], [SPEECH], units or end
    m = com.allowed(q[:1])
    assert m[vocab.text_id] and not m[S] and not m[E] and not m[units].any()
    assert torch.equal(com.allowed(q[:3]), only(vocab, vocab.text_id))  # the transcript is capped too
    assert torch.equal(com.allowed(q[:3] + [vocab.text_id]), com.text)  # after [TEXT]: the answer text, not empty
    assert torch.equal(com.allowed(q[:3] + [vocab.text_id] + t[:3]), only(vocab, S))  # the answer's own max_text, transcript not counted
    assert torch.equal(com.allowed(q[:2] + [vocab.text_id] + t[:1] + [S]), com.units)


def test_streaming_grammar_follows_the_chunk_schedule(vocab):
    g = SchemeGrammar(vocab, "streaming_thoughts", len(vocab), text_chunk=2, speech_chunk=3, max_text=5, max_units=20)
    S, E, u = vocab.speech_id, vocab.end_id, vocab.units
    t = vocab.text("the red apple")
    units = torch.from_numpy(vocab.unit_ids)
    m = g.allowed(t[:1])
    assert torch.equal(m, g.text | only(vocab, S))  # inside a chunk: text, or end the text early
    m = g.allowed(t[:2])  # a full chunk: its units next (or [SPEECH], if that was all the text)
    assert torch.equal(m, g.units | only(vocab, S))
    m = g.allowed(t[:2] + u([4]))
    assert torch.equal(m, g.units & ~only(vocab, u([4])[0]))  # the chunk's units continue: no text, no [SPEECH], no end
    assert torch.equal(g.allowed(t[:2] + u([4, 5, 6])), g.text | only(vocab, S))  # the chunk's units are done: text again
    assert torch.equal(g.allowed(t[:2] + u([4, 5, 6]) + t[2:4]), (g.units & ~only(vocab, u([6])[0])) | only(vocab, S))  # no repeat of unit 6
    assert torch.equal(g.allowed(t[:2] + u([4, 5, 6]) + t[2:4] + u([1])), g.units & ~only(vocab, u([1])[0]))
    assert torch.equal(g.allowed(t[:2] + u([4, 5, 6]) + t[2:4] + u([1, 2, 3]) + t[4:5]), only(vocab, S))  # max_text=5: [SPEECH]
    m = g.allowed(t[:2] + u([4, 5, 6]) + t[2:3] + [S])
    assert m[units[5]] and m[E] and not m[g.text].any() and not m[S]  # after [SPEECH]: units and the end
    assert not g.allowed(t[:2] + u([4, 5, 6]) + t[2:3] + [S] + u([2]))[u([2])[0]]


def test_streaming_grammar_never_repeats_a_unit_across_a_text_chunk(vocab):
    g = SchemeGrammar(vocab, "streaming_thoughts", len(vocab), text_chunk=2, speech_chunk=3, max_text=5, max_units=20)
    t, u = vocab.text("the red apple"), vocab.units
    assert not g.allowed(t[:2] + u([4, 5, 6]) + t[2:4])[u([6])[0]]  # the next chunk's first unit would repeat the last one
    assert not g.allowed(t[:2] + u([4, 5, 6]) + t[2:3] + [vocab.speech_id])[u([6])[0]]  # ... and so would the first after [SPEECH]


def test_streaming_target_needs_a_full_speech_chunk_after_every_text_chunk_but_the_last(vocab):
    "The grammar cannot know how many units are coming, so a target with too few units for its schedule is refused up front."
    with pytest.raises(ValueError, match="units"):
        scheme_target(vocab, "streaming_thoughts", "q", "the red apple", [1, 2], text_chunk=2, speech_chunk=3)
    g = SchemeGrammar(vocab, "streaming_thoughts", len(vocab), text_chunk=2, speech_chunk=3, max_text=100, max_units=100)
    n_text = len(vocab.text("the red apple"))
    ids = scheme_target(vocab, "streaming_thoughts", "q", "the red apple", list(range(1, 3 * ((n_text + 1) // 2 - 1) + 2)), text_chunk=2, speech_chunk=3)
    assert all(g.allowed(ids[:i])[t] for i, t in enumerate(ids))


@pytest.mark.parametrize("scheme", SEQUENCE_SCHEMES)
def test_grammar_never_allows_chat_control_tokens_as_text(vocab, scheme):
    g = SchemeGrammar(vocab, scheme, len(vocab), text_chunk=2, speech_chunk=3)
    control = vocab.tokenizer.convert_tokens_to_ids([*ROLE_TOKENS.values(), AUDIO_TOKEN])
    for written in ([], vocab.text("two")):
        assert not g.allowed(written)[control].any()


# ---------------------------------------------------------------- sequence generation

class FreeGrammar:
    "Every token allowed: plain greedy decoding with `naive_greedy`."
    def __init__(self, n): self.n = n
    def allowed(self, written): return torch.ones(self.n, dtype=torch.bool)


def naive_greedy(llm, vocab, grammar, prompt, audio, limit):
    "Greedy decoding the slow way: the whole sequence re-read at every step (no cache, no padding, default positions)."
    emb = llm.get_input_embeddings()
    ids = lambda x: emb(torch.tensor(list(x), dtype=torch.long))
    written = []
    with torch.no_grad():
        while len(written) < limit:
            logits = llm(inputs_embeds=torch.cat([ids(prompt[0]), audio, ids(prompt[1] + written)])[None]).logits[0, -1]
            t = int(logits.masked_fill(~grammar.allowed(written), float("-inf")).argmax())
            if t == vocab.end_id: break
            written.append(t)
    return written


@pytest.mark.parametrize("scheme", SEQUENCE_SCHEMES)
def test_generate_sequence_obeys_the_grammar_and_batches(vocab, prompt, scheme):
    llm = tiny_llm(vocab)
    sizes = dataclasses.replace(SIZES, max_text=5, max_units=8)
    g = SchemeGrammar(vocab, scheme, len(vocab), sizes.text_chunk, sizes.speech_chunk, sizes.max_text, sizes.max_units)
    limit = sizes.max_units + 2 * sizes.max_text + 4
    audio = random_audio([5, 9, 2])
    calls = []
    out = generate_sequence(llm, vocab, scheme, audio, prompt, sizes, batch_size=2, on_token=lambda step, ids: calls.append((step, ids)))
    assert len(out) == 3
    for o in out:
        assert 0 < len(o) < limit and vocab.end_id not in o
        assert all(g.allowed(o[:i])[t] for i, t in enumerate(o)) and g.allowed(o)[vocab.end_id]  # every token legal, the end too
        parts = split_output(vocab, scheme, o)
        u = parts["units"]
        assert 1 <= len(u) <= sizes.max_units
        runs, run = [], []  # the runs of consecutive unit tokens (one run, except in streaming thoughts)
        for x in o + [None]:
            if x in vocab._unit_of: run.append(x)
            elif run: runs.append(run); run = []
        assert all(a != b for r in runs for a, b in zip(r, r[1:])) and sum(map(len, runs)) == len(u)  # deduplicated
        assert len(runs) == 1 or scheme == "streaming_thoughts"
        assert parts["first_unit"] is not None and o[parts["first_unit"]] in vocab._unit_of
        sep = o.index(vocab.text_id) + 1 if scheme == "chain_of_modality" else 0
        answer_text = [t for t in o[sep:] if t not in vocab._unit_of and t != vocab.speech_id]
        assert 1 <= len(answer_text) <= sizes.max_text and sep <= sizes.max_text + 1
        assert o.count(vocab.speech_id) == 1
    # batched with left padding == one at a time == the slow, uncached greedy decode
    assert out == [generate_sequence(llm, vocab, scheme, [a], prompt, sizes, batch_size=1)[0] for a in audio]
    assert out == generate_sequence(llm, vocab, scheme, audio, prompt, sizes, batch_size=3)
    assert out[0] == naive_greedy(llm, vocab, g, prompt, audio[0], limit)
    # on_token: once per step, per batch, every row's token of that step
    n0, n1 = max(len(out[0]), len(out[1])) + 1, len(out[2]) + 1
    assert [s for s, _ in calls] == list(range(n0)) + list(range(n1))
    assert all(len(ids) == 2 for _, ids in calls[:n0]) and all(len(ids) == 1 for _, ids in calls[n0:])
    assert [ids[0] for _, ids in calls[n0:]] == out[2] + [vocab.end_id]
    assert [ids[0] for _, ids in calls[: len(out[0]) + 1]] == out[0] + [vocab.end_id]


def test_generate_sequence_matches_naive_decoding_across_schemes_with_short_caps(vocab, prompt):
    llm = tiny_llm(vocab, seed=3, layers=2)
    audio = random_audio([3, 11], seed=5)
    for scheme in SEQUENCE_SCHEMES:
        sizes = dataclasses.replace(SIZES, max_text=3, max_units=4)
        g = SchemeGrammar(vocab, scheme, len(vocab), sizes.text_chunk, sizes.speech_chunk, sizes.max_text, sizes.max_units)
        out = generate_sequence(llm, vocab, scheme, audio, prompt, sizes)
        assert out == [naive_greedy(llm, vocab, g, prompt, a, 100) for a in audio]


@pytest.mark.parametrize("scheme", SEQUENCE_SCHEMES)
def test_sequence_scheme_learns_two_answers(vocab, prompt, scheme):
    llm = tiny_llm(vocab)
    audio = random_audio([4, 7])
    examples = [dict(audio=a, target=scheme_target(vocab, scheme, q, t, u, SIZES.text_chunk, SIZES.speech_chunk)) for a, (q, t, u) in zip(audio, QA)]
    hist = train_scheme(llm, scheme, examples, prompt, vocab.pad_id, steps=60, batch_size=2, lr=1e-2, progress=False, log_every=10)
    assert hist.losses[-1] < 0.1 * hist.losses[0]
    out = generate_sequence(llm, vocab, scheme, audio, prompt, SIZES)
    assert [o + [vocab.end_id] for o in out] == [e["target"] for e in examples]


def test_generate_sequence_bad_input(vocab, prompt):
    llm = tiny_llm(vocab)
    for audio in ([], torch.zeros(2, 3, H)):
        with pytest.raises(ValueError, match="audio"): generate_sequence(llm, vocab, "text_first", audio, prompt, SIZES)
    with pytest.raises(ValueError, match="scheme"): generate_sequence(llm, vocab, "parallel", random_audio([2]), prompt, SIZES)


# ---------------------------------------------------------------- parallel text and speech heads

def test_parallel_streams_layout(vocab):
    two = ParallelSpeechLM(tiny_llm(vocab), K, n_streams=2)
    one = ParallelSpeechLM(tiny_llm(vocab), K, n_streams=1)
    P, X = K, K + 1  # speech pad, speech end
    assert (two.speech_pad, two.speech_end) == (P, X)
    text, speech = two.streams([50, 51, 52], [1, 2, 3, 4, 5], text_end=3, text_pad=1, delay=2)
    assert text == [50, 51, 52, 3, 1, 1]
    assert speech == [[P, P, 1, 3, 5, X], [P, P, 2, 4, X, P]]  # dealt round-robin, each stream ended, all one length
    text, speech = one.streams([50, 51, 52, 53, 54, 55], np.array([4]), text_end=3, text_pad=1, delay=0)
    assert text == [50, 51, 52, 53, 54, 55, 3] and speech == [[4, X, P, P, P, P, P]]  # the text is longer: speech padded
    text, speech = one.streams([50], [1, 2, 3], text_end=3, text_pad=1, delay=3)
    assert text == [50, 3, 1, 1, 1, 1, 1] and speech == [[P, P, P, 1, 2, 3, X]]  # the speech is longer: text padded
    text, speech = two.streams([50, 51], [7], text_end=3, text_pad=1, delay=1)
    assert text == [50, 51, 3] and speech == [[P, 7, X], [P, X, P]]  # a stream with no unit still ends
    calls = [(lambda: two.streams([5], [K], 3, 1, 2), "units"), (lambda: two.streams([5], [], 3, 1, 2), "units"),
             (lambda: two.streams([5], [-1, 2], 3, 1, 2), "units"), (lambda: two.streams([5], [1.0, 2.0], 3, 1, 2), "units"),
             (lambda: two.streams([5], [1, 2], 3, 1, -1), "delay"), (lambda: two.streams([5], [1, 2], 3, 1, 1.5), "delay"),
             (lambda: ParallelSpeechLM(tiny_llm(vocab), K, n_streams=0), "n_streams"),
             (lambda: ParallelSpeechLM(tiny_llm(vocab), 0), "n_units")]
    for call, name in calls:
        with pytest.raises(ValueError, match=name): call()


def parallel_examples(model, vocab, audio, delay=2):
    out = []
    for a, (_, answer, units) in zip(audio, QA):
        text, speech = model.streams(vocab.text(answer), units, vocab.end_id, vocab.pad_id, delay)
        out.append(dict(audio=a, text=text, speech=speech))
    return out


@pytest.mark.parametrize("n_streams", [1, 2])
def test_parallel_lm_learns_two_answers_and_reloads(vocab, prompt, tmp_path, n_streams):
    torch.manual_seed(0)
    model = ParallelSpeechLM(tiny_llm(vocab), K, n_streams=n_streams)
    audio = random_audio([4, 7])
    examples = parallel_examples(model, vocab, audio)
    batch = ParallelCollator()(examples)
    assert batch["text"].shape == (2, batch["speech"].shape[2]) and batch["speech"].shape[1] == n_streams
    assert (batch["text"][1, len(examples[1]["text"]):] == -100).all() and (batch["speech"][1, :, len(examples[1]["text"]):] == -100).all()
    with torch.no_grad(): before = parallel_loss(model, batch, *prompt)
    assert set(before) == {"loss", "text_loss", "speech_loss"} and all(torch.isfinite(v) for v in before.values())
    assert before["loss"].item() == pytest.approx(before["text_loss"].item() + before["speech_loss"].item(), rel=1e-5)
    assert before["text_loss"] > 1.0 and before["speech_loss"] > 1.0  # untrained: far from the answers
    hist = train_scheme(model, "parallel", examples, prompt, vocab.pad_id, steps=60, batch_size=2, lr=1e-2, progress=False, log_every=10)
    assert hist.losses[-1] < 0.05 * hist.losses[0]
    with torch.no_grad(): after = parallel_loss(model, batch, *prompt)
    assert after["text_loss"] < 0.1 and after["speech_loss"] < 0.1
    text_mask = vocab.mask("text", len(vocab))
    prefixes = [prompt_embeds(model.llm, *prompt, a) for a in audio]
    steps = []
    out = model.generate(prefixes, text_mask, vocab.end_id, vocab.pad_id, max_steps=20, on_step=lambda s, flags: steps.append((s, flags)))
    for o, e, (_, answer, units) in zip(out, examples, QA):
        assert o["text_ids"] == vocab.text(answer) and o["units"].tolist() == units and o["first_unit"] == 2  # the delay
        assert o["steps"] == len(e["text"])  # every stream ended exactly where its training streams end
    assert [s for s, _ in steps] == list(range(max(o["steps"] for o in out))) and steps[1][1] == [False, False] and steps[2][1] == [True, True]
    for p, o in zip(prefixes, out):  # batched (left padding) == one at a time
        one = model.generate([p], text_mask, vocab.end_id, vocab.pad_id, max_steps=20)[0]
        assert one["text_ids"] == o["text_ids"] and one["units"].tolist() == o["units"].tolist()
    capped = model.generate(prefixes, text_mask, vocab.end_id, vocab.pad_id, max_steps=20, max_units=3)
    assert [c["units"].tolist() for c in capped] == [o["units"][:3].tolist() for o in out]
    short = model.generate(prefixes, text_mask, vocab.end_id, vocab.pad_id, max_steps=3)
    assert [s["text_ids"] for s in short] == [o["text_ids"][:3] for o in out]  # max_steps bounds the text too
    save_parallel(model, tmp_path)
    again = load_parallel(tmp_path)
    assert (again.n_units, again.n_streams) == (K, n_streams)
    sd = model.state_dict()
    assert set(again.state_dict()) == set(sd) and all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())
    back = again.generate([prompt_embeds(again.llm, *prompt, a) for a in audio], text_mask, vocab.end_id, vocab.pad_id, max_steps=20)
    assert [(b["text_ids"], b["units"].tolist()) for b in back] == [(o["text_ids"], o["units"].tolist()) for o in out]


# ---------------------------------------------------------------- text-driven: the CTC unit decoder

def tiny_decoder(seed=0):
    torch.manual_seed(seed)
    return CTCUnitDecoder(H, K, upsample=4, width=32, layers=1, heads=2).eval()


def test_ctc_decoder_is_causal_and_pads_safely():
    dec = tiny_decoder()
    hid = torch.randn(10, H)
    with torch.no_grad():
        full, m = dec(hid[None], torch.ones(1, 10, dtype=torch.bool))
        assert full.shape == (1, 40, K + 1) and m.shape == (1, 40) and m.all()
        assert torch.allclose(full.exp().sum(-1), torch.ones(1, 40), atol=1e-5)
        for k in (1, 4, 7):
            changed = torch.cat([hid[:k], torch.randn(10 - k, H)])
            out = dec(changed[None], torch.ones(1, 10, dtype=torch.bool))[0]
            assert torch.allclose(out[0, : 4 * k], full[0, : 4 * k], atol=1e-5)  # the first k states' units never wait for later text
            assert not torch.allclose(out[0, 4 * k:], full[0, 4 * k:], atol=1e-3)
        batch = torch.zeros(2, 10, H)
        batch[0], batch[1, :6] = hid, hid[:6] * 2
        mask = torch.arange(10)[None] < torch.tensor([[10], [6]])
        out, m = dec(batch, mask)
        assert m[1].sum() == 24 and torch.allclose(out[0], full[0], atol=1e-5)
        assert torch.allclose(out[1, :24], dec((hid[:6] * 2)[None], torch.ones(1, 6, dtype=torch.bool))[0][0], atol=1e-5)
    with pytest.raises(ValueError, match="upsample"): CTCUnitDecoder(H, K, upsample=0)
    hidden, ones = torch.zeros(2, 3, H), torch.ones(2, 3, dtype=torch.bool)
    for units, name in (([[1]], "units"), ([[1], [K]], r"units\[1\]"), ([[], [1]], r"units\[0\]"), ([[1], [-1]], r"units\[1\]")):
        with pytest.raises(ValueError, match=name): dec.loss(hidden, ones, units)


def test_ctc_decoder_learns_units():
    dec = tiny_decoder()
    g = torch.Generator().manual_seed(2)
    examples = [dict(hidden=torch.randn(n, H, generator=g), units=np.array(u)) for n, u in [(4, [1, 5, 2, 7]), (6, [3, 9, 4, 0, 11, 6, 10]), (3, [8, 2])]]
    hist = train_scheme(dec, "text_driven", examples, ([1], [2]), 0, steps=80, batch_size=3, lr=1e-2, progress=False, log_every=10)
    assert hist.losses[-1] < 0.01 * hist.losses[0]
    dec.eval()
    for e in examples: assert dec.decode(e["hidden"]).tolist() == e["units"].tolist()


def test_text_driven_answer_reads_the_same_states_as_teacher_forcing(vocab, prompt):
    llm, dec = tiny_llm(vocab, seed=1), tiny_decoder(seed=1)
    audio = random_audio([5, 8], seed=4)
    stop = [vocab.end_id]
    res = [text_driven_answer(llm, dec, a, prompt, stop, max_text=6, chunk=2) for a in audio]
    for r, a in zip(res, audio):
        assert 0 < len(r["text_ids"]) <= 6 and vocab.end_id not in r["text_ids"]
        assert r["text_ids"] == naive_greedy(llm, vocab, FreeGrammar(len(vocab)), prompt, a, 6)
    states = answer_hidden_states(llm, audio, [r["text_ids"] for r in res], prompt, batch_size=2)  # right padding in one batch
    for r, s, a in zip(res, states, audio):
        assert s.shape == (len(r["text_ids"]), H)
        assert torch.allclose(s, answer_hidden_states(llm, [a], [r["text_ids"]], prompt)[0], atol=1e-5)
        assert r["units"].tolist() == dec.decode(s).tolist()
        assert r["first_unit"] == (min(2, len(r["text_ids"])) if len(r["units"]) else None)


# ---------------------------------------------------------------- coarse-to-fine: the RQ-Transformer

RK, RL, RC = 8, 3, 16
rule = lambda u: torch.stack([(u * (l + 3) + l) % RC for l in range(RL)])  # (L, T): codes a deterministic function of units


def rq_examples(n, seed, lo=10, hi=30):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        u = torch.randint(0, RK, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g)
        out.append(dict(units=u, codes=rule(u)))
    return out


def tiny_rq(seed=0, levels=RL, hidden=32, max_frames=64):
    torch.manual_seed(seed)
    return RQTransformer(RQTransformerConfig(n_units=RK, levels=levels, codebook_size=RC, hidden_size=hidden, temporal_layers=1,
                                             depth_layers=1, heads=2, max_frames=max_frames))


@pytest.fixture(scope="module")
def trained_rq():
    model = tiny_rq()
    hist = train_rq_transformer(model, rq_examples(64, 0), steps=80, batch_size=16, lr=5e-3, seed=0, progress=False, max_frames=24, log_every=20)
    return model.eval(), hist


def test_rq_transformer_learns_and_generates_consistently(trained_rq, tmp_path):
    model, hist = trained_rq
    assert hist.losses[-1] < 0.1 * hist.losses[0] and set(hist.extras) == {f"level_{l}_loss" for l in range(RL)}
    held_out = rq_examples(5, 1)
    batch = rq_collate(held_out)
    m = batch["frame_mask"]
    assert batch["units"].shape == m.shape and batch["codes"].shape == (5, RL, m.shape[1]) and m.sum(1).tolist() == [len(e["units"]) for e in held_out]
    frames = []
    gen = model.generate(batch["units"], frame_mask=m, on_frame=lambda t, c: frames.append((t, tuple(c.shape))))
    acc = (gen == batch["codes"]).transpose(1, 2)[m].float().mean()
    assert acc >= 0.9
    assert frames == [(t, (5, RL)) for t in range(m.shape[1])] and (gen[~m[:, None].expand_as(gen)] == 0).all()
    for i in (0, 3):  # batched + padded == one at a time
        one = model.generate(held_out[i]["units"])
        assert one.shape == (RL, len(held_out[i]["units"])) and torch.equal(one, gen[i, :, : len(held_out[i]["units"])])
    with torch.no_grad():
        out = model(batch["units"], gen, m)
        tf = out.logits.argmax(-1).transpose(1, 2)
    assert out.logits.shape == (5, m.shape[1], RL, RC) and out.level_losses.shape == (RL,)
    assert torch.equal(tf * m[:, None], gen)  # generate agrees with the teacher-forced argmax of its own output
    model.save_pretrained(tmp_path)
    back = RQTransformer.from_pretrained(tmp_path)
    assert type(back.config) is RQTransformerConfig and back.config.levels == RL
    assert torch.equal(back.generate(batch["units"], frame_mask=m), gen)


def test_rq_transformer_sampling_repeats_from_its_seed():
    model = tiny_rq(seed=5).eval()  # untrained: sampling has room to differ
    u = rq_examples(1, 2)[0]["units"]
    s1, s2, s3 = (model.generate(u, temperature=1.0, seed=s) for s in (7, 7, 8))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, model.generate(u))


def test_rq_transformer_is_causal_over_frames_and_levels():
    L, T = 3, 7
    fresh = tiny_rq(seed=1, levels=L, hidden=16).eval()
    units, codes = torch.randint(0, RK, (1, T)), torch.randint(0, RC, (1, L, T))
    logits = lambda u_, c_: fresh(u_, c_).logits[0]  # (T, L, C)
    with torch.no_grad():
        base = logits(units, codes)
        for t in range(T - 1):
            u2, c2 = units.clone(), codes.clone()
            u2[:, t + 1:], c2[..., t + 1:] = (u2[:, t + 1:] + 5) % RK, (c2[..., t + 1:] + 9) % RC
            new = logits(u2, c2)
            assert torch.allclose(new[: t + 1], base[: t + 1], atol=1e-5), f"frame {t} sees the future"
            assert not torch.allclose(new[t + 1], base[t + 1], atol=1e-3)
            for lvl in range(L):
                c3 = codes.clone()
                c3[0, lvl:, t] = (c3[0, lvl:, t] + 9) % RC
                new = logits(units, c3)
                assert torch.allclose(new[t, : lvl + 1], base[t, : lvl + 1], atol=1e-5), f"level {lvl} of frame {t} sees its own or later levels"
                if lvl < L - 1: assert not torch.allclose(new[t, lvl + 1], base[t, lvl + 1], atol=1e-3), "the lower level's code is not used"
                assert not torch.allclose(new[t + 1], base[t + 1], atol=1e-3), "frame t's codes do not reach frame t+1"


def test_rq_transformer_bad_input():
    model = tiny_rq(hidden=16)
    held_out = rq_examples(2, 3)
    u, c = held_out[0]["units"][None], held_out[0]["codes"][None]
    T = u.shape[1]
    bad = {
        "units": [lambda: model(u + RK, c), lambda: model(u - 100, c), lambda: model(u.float(), c), lambda: model(u[:, :0], c[..., :0]),
                  lambda: model.generate(torch.zeros(0, dtype=torch.long)), lambda: model.generate(torch.zeros(1, 65, dtype=torch.long)),
                  lambda: model.generate(torch.full((5,), RK))],
        "codes": [lambda: model(u, c + RC), lambda: model(u, c - RC), lambda: model(u, c[:, :2]), lambda: model(u, c[..., :-1]), lambda: model(u, c[0])],
        "temperature": [lambda: model.generate(u, temperature=-0.5)],
        "frame_mask": [lambda: model(u, c, torch.ones(1, T - 1, dtype=torch.bool)), lambda: model(u, c, torch.ones(1, T))],
        "seed": [lambda: model.generate(u, seed=1.5)],
        "levels": [lambda: RQTransformerConfig(n_units=RK, levels=0, codebook_size=RC)],
        "hidden_size": [lambda: RQTransformerConfig(n_units=RK, levels=RL, codebook_size=RC, hidden_size=30, heads=4)],
        "dropout": [lambda: RQTransformerConfig(dropout=1.5)],
        "examples": [lambda: rq_collate([]), lambda: train_rq_transformer(model, [], steps=1)],
        "examples[1]['codes']": [lambda: rq_collate([held_out[0], dict(units=held_out[1]["units"], codes=held_out[1]["codes"][:, :-1])]),
                                 lambda: train_rq_transformer(model, [held_out[0], dict(units=held_out[1]["units"], codes=held_out[1]["codes"][:2])], steps=1)],
        "max_frames": [lambda: train_rq_transformer(model, held_out, steps=1, max_frames=1000)],
    }
    for name, calls in bad.items():
        for call in calls:
            with pytest.raises(ValueError, match="^" + re.escape(name) + ":"): call()


# ---------------------------------------------------------------- full duplex

def test_duplex_frames():
    assert duplex_frames(np.arange(12)).tolist() == [2, 6, 10]  # 50 Hz -> 12.5 Hz: the middle frame of each 4
    assert duplex_frames(list(range(11))).tolist() == [2, 6, 10] and duplex_frames(range(3, 6)).tolist() == [5]
    assert duplex_frames([7, 8]).tolist() == [7] and duplex_frames([4]).tolist() == [4]  # too short for a middle: the first
    for bad in ([], [[1, 2], [3, 4]]):
        with pytest.raises(ValueError, match="units"): duplex_frames(bad)


def exchanges(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, K, int(rng.integers(12, 30))), rng.integers(0, K, int(rng.integers(20, 60)))) for _ in range(n)]


def test_duplex_dialogue_turns():
    SIL = K
    turns = exchanges()
    for seed in range(5):
        d = duplex_dialogue(turns, SIL, np.random.default_rng(seed))
        user, system, events = d["user"], d["system"], d["events"]
        assert len(user) == len(system) and len(events) == 2 and "interrupt" not in events[-1]
        assert user.max() <= SIL and system.max() <= SIL
        prev_end = 0
        for e, (q, a) in zip(events, turns):
            q, a = duplex_frames(q), duplex_frames(a)
            assert e["user_start"] == prev_end and e["user_end"] == e["user_start"] + len(q) and 2 <= e["system_start"] - e["user_end"] < 6
            assert user[e["user_start"]: e["user_end"]].tolist() == q.tolist()
            assert (user[e["user_end"]: e["system_start"] + len(a)] == SIL).all()  # the user is silent in the gap and the answer
            assert (system[e["user_start"]: e["system_start"]] == SIL).all()  # the system is silent while asked and in the gap
            assert system[e["system_start"]: e["system_start"] + len(a)].tolist() == a.tolist()
            prev_end = e["system_start"] + len(a)
        assert 2 <= len(user) - prev_end < 6 and (user[prev_end:] == SIL).all() and (system[prev_end:] == SIL).all()
        assert d["user"].tolist() == duplex_dialogue(turns, SIL, np.random.default_rng(seed))["user"].tolist()  # the rng decides


def test_duplex_dialogue_barge_in():
    SIL = K
    turns = exchanges(1)
    for seed in range(5):
        calm = duplex_dialogue(turns, SIL, np.random.default_rng(seed))
        d = duplex_dialogue(turns, SIL, np.random.default_rng(seed), barge_in=True, stop_within=2)
        user, system, e = d["user"], d["system"], d["events"][-1]
        assert len(user) == len(system) and "interrupt" not in d["events"][0]
        a, q = duplex_frames(turns[-1][1]), duplex_frames(turns[-1][0])
        start = e["interrupt"]
        assert e["system_start"] + 2 <= start < e["system_start"] + max(3, len(a) // 2)  # the user cuts in during the answer
        assert (system[start + 2:] == SIL).all()  # ... and the system stops within stop_within steps
        assert system[: start + 2].tolist() == calm["system"][: start + 2].tolist()  # until then, the same conversation
        assert user[:start].tolist() == calm["user"][:start].tolist()
        assert user[start: start + len(q)].tolist() == q.tolist()  # the user's new words, all of them
        assert d["events"][0] == calm["events"][0] and {k: e[k] for k in calm["events"][-1]} == calm["events"][-1]


def test_duplex_listen_writes_one_token_per_step(vocab):
    SIL = K
    torch.manual_seed(0)
    model = ParallelSpeechLM(tiny_llm(vocab, seed=2), K + 1, n_streams=2)
    start = prompt_embeds(model.llm, [vocab.tokenizer.bos_token_id], [], torch.zeros(0, H))
    user = duplex_dialogue(exchanges(2, n=1), SIL, np.random.default_rng(0))["user"]
    said = duplex_listen(model, start, user, SIL)
    assert said.shape == user.shape and said.min() >= 0 and said.max() <= SIL
    assert duplex_listen(model, start, user.tolist(), SIL).tolist() == said.tolist()
    # the same tokens as a teacher-forced read of both streams (what the forward trains), so the cache and positions are right
    pad = model.llm.config.pad_token_id
    speech = torch.tensor(np.stack([said, user]))[None]
    with torch.no_grad():
        x = torch.cat([start[None], model.step_embeds(torch.full((1, len(user) - 1), pad), speech[:, :, :-1])], 1)
        h = model.llm.model(inputs_embeds=x).last_hidden_state[0, start.shape[0] - 1:]
        logits = model.speech_heads[0](h)
    logits[:, SIL + 1:] = float("-inf")
    assert logits.argmax(-1).tolist() == said.tolist()
    for bad in ([], [SIL + 1], [-1, 2], [[1, 2]]):
        with pytest.raises(ValueError, match="user"): duplex_listen(model, start, bad, SIL)


def test_turn_taking_numbers():
    S = 9
    system = [S, S, S, S, S, 1, 2, S, 7, S, S, 3, 4, 5, S, S]
    events = [dict(user_start=0, user_end=3, system_start=5), dict(user_start=7, user_end=10, system_start=11)]
    rows = turn_taking(system, events, S)
    assert rows == [dict(response_steps=2.0, talks_over_user=0.0), dict(response_steps=1.0, talks_over_user=pytest.approx(1 / 3))]
    assert turn_taking(system, events, S, probe=6)[-1]["talking_after_probe"] == 0.75  # steps 10..13
    assert "talking_after_probe" not in turn_taking(system, events, S, probe=6)[0]
    interrupted = [events[0], dict(events[1], interrupt=2)]
    assert turn_taking(system, interrupted, S)[-1]["talking_after_probe"] == 0.5  # steps 6..9
    assert turn_taking(system, interrupted, S, probe=6)[-1]["talking_after_probe"] == 0.75  # the probe wins
    assert np.isnan(turn_taking(system, events, S, probe=12)[-1]["talking_after_probe"])  # nothing left to look at
    quiet = turn_taking([S] * 16, events, S)
    assert all(np.isnan(r["response_steps"]) and r["talks_over_user"] == 0.0 for r in quiet)


def test_snap_to_lexicon_and_answer_lexicon():
    "Heard words snap to the nearest answer word when close (by character edit distance), and stay as heard when far."
    from speechllm_course.generation import answer_lexicon, snap_to_lexicon
    lex = answer_lexicon(["Three plus four is seven", "yes, two is less than five"])
    assert lex == sorted(["three", "plus", "four", "is", "seven", "yes", "two", "less", "than", "five"])
    assert snap_to_lexicon("threecklowse foure sevven", lex) == "threecklowse four seven"
    assert snap_to_lexicon("yes, tw is lesss", lex) == "yes two is less"
    assert snap_to_lexicon("yess", lex) == "less"  # a tie (distance 1 to both) goes to the word of the closer length
    assert snap_to_lexicon("", lex) == ""
    with pytest.raises(ValueError, match="lexicon"): snap_to_lexicon("seven", [])
    with pytest.raises(ValueError, match="text"): snap_to_lexicon(7, lex)
    with pytest.raises(ValueError, match="texts"): answer_lexicon(["!!"])


def test_cached_model_depends_on_its_seed_and_not_on_what_ran_before_it(tmp_path, monkeypatch):
    "Chapter 11 builds its nine models through cached_model: a model must not change with what a chapter ran before building it."
    from speechllm_course.core import train
    from speechllm_course.generation import cached_model
    data = [dict(x=torch.linspace(-1, 1, 3) * i) for i in range(1, 5)]

    def train_fn(ckpt_dir):
        model = torch.nn.Linear(3, 2)  # initial weights from the global random state, as every chapter model's are
        hist = train(model, data, steps=2, batch_size=2, lr=1e-2, loss_fn=lambda m, b: m(b["x"]).pow(2).mean(), progress=False, ckpt_dir=ckpt_dir)
        return model, hist

    def load_fn(path):
        model = torch.nn.Linear(3, 2)
        model.load_state_dict(torch.load(path / "weights.pt", weights_only=True))
        return model

    built, next_draws = [], []
    for caller_seed, root, seed in ((1, "first", 0), (2, "second", 0), (1, "third", 1), (1, "first", 0)):  # the last one loads the first
        monkeypatch.setenv("SPEECHLLM_DATA", str(tmp_path / root))
        torch.manual_seed(caller_seed)
        model, info = cached_model("toy_generation_model", train_fn, lambda m, folder: torch.save(m.state_dict(), f"{folder}/weights.pt"),
                                   load_fn, version="test", scale="smoke", seed=seed)
        assert info["final_loss"] >= 0 and info["trainable_parameters"] == 8
        built.append(model.state_dict()); next_draws.append(torch.rand(3))
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)
    assert same(built[0], built[1]), "same seed, different caller: the model must be the same"
    assert same(built[0], built[3]), "loaded from the cache: the model that was built"
    assert not same(built[0], built[2]), "another seed must be another model"
    # building or loading leaves the caller's random stream alone: its next draws are those the caller seed alone gives
    for caller_seed, draws in zip((1, 2, 1, 1), next_draws):
        torch.manual_seed(caller_seed); assert torch.equal(draws, torch.rand(3))
