"Chapter 08: text documents, tokenizer, packing, the tiny Llama, the loader on local checkpoints (the real-model path), bad input."
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

from speechllm_course.lm import (
    AUDIO_TOKEN, END_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS, cache_kwargs, chat, ensure_speech_tokens, load_llm, ngram_perplexity, pack_documents,
    perplexity, render, reply, returned_cache, sound_caption, text_documents, tiny_llama_config, train_text_tokenizer)
from speechllm_course.dual_encoder import events_named


@pytest.fixture(scope="module")
def docs():
    return text_documents(600, seed=0)


@pytest.fixture(scope="module")
def tokenizer(docs):
    return train_text_tokenizer([render(d) for d in docs], vocab_size=300)


@pytest.fixture(scope="module")
def trained(docs, tokenizer):
    "A tiny Llama that has learned one fixed conversation by heart."
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=64))
    text = tokenizer.apply_chat_template(chat("is two less than five", "yes"), tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]] * 8)
    opt = torch.optim.AdamW(model.parameters(), 1e-2)
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
    return model.eval()


def test_documents_are_deterministic_mixed_and_held_out(docs):
    assert text_documents(600, seed=0) == docs
    assert {d["kind"] for d in docs} == {"sentence", "translation", "question", "instruction", "caption"}
    held = text_documents(300, seed=5, heldout=True)
    first = lambda d: d.get("text") or d["messages"][0]["content"]
    open_set = lambda ds: {first(d) for d in ds if not first(d).startswith("what is the plural of")}  # a closed set, in every split
    assert not open_set(held) & open_set(docs)
    only_q = text_documents(50, seed=1, mix=dict(question=1.0))
    assert all(d["kind"] == "question" and d["messages"][1]["role"] == "assistant" for d in only_q)


def test_caption_documents_name_exactly_their_events():
    import numpy as np
    rng = np.random.default_rng(0)
    for _ in range(300):
        caption, events = sound_caption(rng)
        if events: assert events_named(caption) == set(events), caption  # chapter 09b scores captions by the kinds they name
        else: assert "beats per minute" in caption and not events_named(caption)
    docs = text_documents(200, seed=3, mix=dict(caption=1.0))
    questions = [d for d in docs if "messages" in d]
    assert 50 < len(questions) < 150
    for d in questions:
        named = d["messages"][0]["content"].removeprefix("which sounds are named in: ")
        assert events_named(named) == set(d["messages"][1]["content"].split(" and "))


def test_tokenizer_keeps_special_tokens_whole_and_round_trips(tokenizer, docs, tmp_path):
    for t in SPECIAL_TOKENS:
        assert len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = render(docs[0], tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).replace(" <|", "<|").replace("|> ", "|>").strip() == text
    assert tokenizer.eos_token == END_TOKEN and tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) != tokenizer.unk_token_id
    msgs = chat("say hi", "hi", system="be brief")
    assert tokenizer.apply_chat_template(msgs, tokenize=False) == "<|system|>be brief<|end|><|user|>say hi<|end|><|assistant|>hi<|end|>"
    assert render(dict(messages=msgs)) == render(dict(messages=msgs), tokenizer)  # the template and its fallback agree
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids and again.apply_chat_template(msgs, tokenize=False) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_packing_concatenates_and_drops_the_remainder():
    blocks = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], block=4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_config_and_training_lower_the_loss(trained, tokenizer):
    cfg = tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1)
    assert cfg.vocab_size == len(tokenizer) and cfg.tie_word_embeddings and cfg.eos_token_id == tokenizer.convert_tokens_to_ids(END_TOKEN)
    assert reply(trained, tokenizer, ["is two less than five"]) == ["yes"]  # greedy decoding stops at <|end|>


def test_perplexity_of_learned_text_is_low_and_ngram_baselines_are_sane(trained, tokenizer):
    learned = tokenizer.apply_chat_template(chat("is two less than five", "yes"), tokenize=False)
    other = tokenizer.apply_chat_template(chat("what is nine times two", "eighteen"), tokenize=False)
    assert perplexity(trained, tokenizer, [learned])["token_perplexity"] < perplexity(trained, tokenizer, [other])["token_perplexity"]
    p = perplexity(trained, tokenizer, [learned, other, learned])
    assert p["word_perplexity"] > 0 and p["tokens_per_word"] > 0
    # per-text NLL: one entry per text, the same text scores the same in any batch position, and they add up to the total
    assert len(p["text_nats"]) == len(p["text_tokens"]) == 3 and abs(p["text_nats"][0] - p["text_nats"][2]) < 1e-4
    assert p["text_nats"][0] / p["text_tokens"][0] < p["text_nats"][1] / p["text_tokens"][1], "the learned text scores better"
    assert abs(sum(p["text_nats"]) / sum(p["text_tokens"]) - p["nats_per_token"]) < 1e-5
    alone = perplexity(trained, tokenizer, [other])
    assert abs(alone["text_nats"][0] - p["text_nats"][1]) < 1e-3 and alone["text_tokens"][0] == p["text_tokens"][1]
    seq = [[1, 2, 3, 1, 2, 3, 1, 2, 3]] * 5
    assert ngram_perplexity(seq, seq, vocab=10, order=2) < ngram_perplexity(seq, seq, vocab=10, order=1)


def test_reply_restores_padding_side_and_batches_like_single_calls(trained, tokenizer):
    side = tokenizer.padding_side
    prompts = ["is two less than five", "what is the last word of: a red cat sleeps", "is two less than five"]
    batched = reply(trained, tokenizer, prompts, batch_size=3, max_new_tokens=6)
    assert tokenizer.padding_side == side
    assert batched == [reply(trained, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]  # left padding changes nothing


def test_cached_decoding_through_lora_matches_the_full_forward_without_deprecated_keywords(trained, tokenizer):
    "Chapters 10b-13 decode with the cache through PEFT-wrapped LLMs: the keyword is read off the base model."
    import warnings
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    lora = get_peft_model(LlamaForCausalLM(trained.config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    ids = torch.tensor([tokenizer("a red cat sleeps on the mat", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = lora(input_ids=ids[:, :2], **cache_kwargs(lora))
        steps = [out.logits[:, -1]]
        for t in range(2, ids.shape[1]):
            out = lora(input_ids=ids[:, t: t + 1], **cache_kwargs(lora, returned_cache(out)))
            steps.append(out.logits[:, -1])
        full = lora(input_ids=ids).logits[0, 1:]
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_cache_keywords_follow_the_models_own_signature():
    "transformers before the rename (the course allows >= 4.46) takes and returns the cache as past_key_values."
    from dataclasses import dataclass

    class OldStyleLM(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False): return input_ids

    @dataclass  # shaped like an old ModelOutput (today's ModelOutput renames the field as it is built)
    class OldStyleOutput:
        logits: torch.Tensor = None
        past_key_values: tuple = None

    marker = object()
    assert cache_kwargs(OldStyleLM(), marker) == {"past_key_values": marker, "use_cache": True}
    assert cache_kwargs(OldStyleLM()) == {"use_cache": True}
    assert returned_cache(OldStyleOutput(logits=torch.zeros(1), past_key_values=(marker,))) == (marker,)
    with pytest.raises(ValueError, match="^output: expected a transformers model output"):
        returned_cache(torch.zeros(1))


def test_load_llm_round_trips_a_local_checkpoint(trained, tokenizer, tmp_path):
    trained.save_pretrained(tmp_path); tokenizer.save_pretrained(tmp_path)
    model, tok = load_llm(str(tmp_path))
    x = torch.tensor([tokenizer("a red cat sleeps", add_special_tokens=False)["input_ids"]])
    assert torch.allclose(model(x).logits, trained(x).logits, atol=1e-6)
    assert len(tok) == len(tokenizer) and not model.training


def test_load_llm_adds_the_course_tokens_to_a_foreign_checkpoint(tmp_path):
    words = ["<unk>", "</s>", "a", "red", "cat", "sleeps"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    foreign = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(foreign, hidden=16, layers=1, heads=2, kv_heads=1))
    model.save_pretrained(tmp_path); foreign.save_pretrained(tmp_path)
    x = torch.tensor([[2, 3, 4, 5]])
    before = model(x).logits[..., :6]
    m2, t2 = load_llm(str(tmp_path))
    added = [*ROLE_TOKENS.values(), END_TOKEN, AUDIO_TOKEN]
    assert all(t2.convert_tokens_to_ids(t) not in (None, t2.unk_token_id) for t in added)
    assert m2.get_input_embeddings().weight.shape[0] == len(t2) == len(words) + len(added)
    assert torch.allclose(m2(x).logits[..., :6], before, atol=1e-5)  # the old vocabulary's predictions are unchanged
    assert t2.apply_chat_template(chat("a cat"), tokenize=False, add_generation_prompt=True) == "<|user|>a cat<|end|><|assistant|>"
    assert ensure_speech_tokens(t2, m2) == []  # idempotent


@pytest.mark.parametrize("call, words", [
    (lambda tok, m: text_documents(0), "n"),
    (lambda tok, m: text_documents(5, mix=dict(poem=1.0)), "mix"),
    (lambda tok, m: chat("  "), "user"),
    (lambda tok, m: render(dict(title="x")), "doc"),
    (lambda tok, m: train_text_tokenizer(["a"], vocab_size=4), "vocab_size"),
    (lambda tok, m: pack_documents([[1]], block=4), "token_ids"),
    (lambda tok, m: tiny_llama_config(tok, hidden=30, heads=4), "heads"),
    (lambda tok, m: tiny_llama_config(tok, hidden=32, heads=4, kv_heads=3), "kv_heads"),
    (lambda tok, m: load_llm(3.5), "name_or_path"),
    (lambda tok, m: reply(m, tok, "not a list"), "prompts"),
    (lambda tok, m: reply(m, tok, ["word " * 200]), "prompts"),
    (lambda tok, m: perplexity(m, tok, []), "texts"),
    (lambda tok, m: perplexity(m, tok, ["word " * 200]), "texts"),
])
def test_bad_input_names_the_argument(tokenizer, trained, call, words):
    with pytest.raises(ValueError, match=words):
        call(tokenizer, trained)
