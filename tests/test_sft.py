"Chapter 12: instruction examples (tags and natural language), scoring, the SFT collator, the per-modality LoRA's bit-identical text path, save/load of fine-tuned models, bad input."

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from speechllm_course.adapters import SpeechLM, speech_reply
from speechllm_course.core import artifact_problem, data_root
from speechllm_course.lm import AUDIO_TOKEN, tiny_llama_config
from speechllm_course.sft import (
    COT_SEPARATOR, INSTRUCTION_PHRASINGS, SFT_TASKS, TASK_TAGS, ModalityLoRA, SftCollator, add_task_tags, answer_part, check_task,
    instruction_examples, load_sft_model, make_sft_model, music_attributes, save_sft_model, score_task, tag_tokens, task_instruction,
    task_target, text_ability, text_examples, train_sft)

DIM = 16
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

ROWS = [dict(text="a cat runs", translation="un gato corre", question="what is two plus two", answer="four", answer_text="two plus two is four",
             response="dogs", n_speakers=2, style="calm", gender="female", caption="a bell rings", labels=["bell"], key="C#", mode="major",
             tempo_bpm=104, instrument="pluck"),
        dict(text="my dog sleeps", translation="mi perro duerme", question="is five less than two", answer="no", answer_text="no, five is not less",
             response="three", n_speakers=3, style="excited", gender="male", caption="a siren wails, then beeps", labels=["siren", "beeps"], key="A",
             mode="minor", tempo_bpm=70, instrument="organ")]


def speech_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128)).eval()
    return SpeechLM.from_llm(llm, tokenizer, "stack_mlp", DIM, adapter_kwargs=dict(stack=2)).eval()


def feats(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, DIM, generator=g) for n in lengths]


def with_trained_lora(model, seed=0):
    "LoRA on the LLM with random (non-zero) B matrices, as after training: the LoRA changes what the LLM computes."
    model.freeze_llm().add_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n: p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


# ---------------------------------------------------------------- instruction examples

def test_tag_and_natural_examples_name_the_task_differently_with_the_same_targets():
    rows, fs = {t: ROWS for t in SFT_TASKS}, {t: feats([10, 12]) for t in SFT_TASKS}
    tags = instruction_examples(rows, fs, "tags")
    natural = instruction_examples(rows, fs, "natural", seed=3)
    assert len(tags) == len(natural) == 2 * len(SFT_TASKS)
    assert [e["target"] for e in tags] == [e["target"] for e in natural]
    assert all(e["instruction"] == TASK_TAGS[e["task"]] for e in tags)
    assert all(e["instruction"] in INSTRUCTION_PHRASINGS[e["task"]]["train"] for e in natural)
    held = instruction_examples(rows, fs, "natural", phrasings="heldout")
    assert all(e["instruction"] in INSTRUCTION_PHRASINGS[e["task"]]["heldout"] for e in held)
    assert natural[0]["features"] is fs[SFT_TASKS[0]][0]


def test_heldout_phrasings_are_never_training_phrasings_and_tags_are_hierarchical():
    for task, p in INSTRUCTION_PHRASINGS.items():
        assert p["train"] and p["heldout"] and not set(p["train"]) & set(p["heldout"]), task
        assert AUDIO_TOKEN not in " ".join(p["train"] + p["heldout"])
    assert set(INSTRUCTION_PHRASINGS) == set(TASK_TAGS) == set(SFT_TASKS)
    assert TASK_TAGS["asr"] == "<|speech|><|transcribe|><|en|>" and TASK_TAGS["translation"].endswith("<|es|>")
    assert tag_tokens()[:3] == ["<|speech|>", "<|transcribe|>", "<|en|>"] and len(tag_tokens()) == len(set(tag_tokens()))
    assert [task_instruction("asr", "natural", "train", i) for i in range(5)][4] == INSTRUCTION_PHRASINGS["asr"]["train"][0]  # cycles


def test_targets_and_transcribe_first_targets():
    r = ROWS[0]
    assert [task_target(t, r) for t in SFT_TASKS] == ["a cat runs", "un gato corre", "two plus two is four", "dogs", "two", "calm", "female",
                                                      "a bell rings", "a bell rings"]
    cot = task_target("qa", r, cot=True)
    assert cot == f"what is two plus two{COT_SEPARATOR}two plus two is four" and answer_part(cot) == "two plus two is four"
    assert answer_part("four") == "four"


def test_text_examples_are_text_only_conversations():
    ex = text_examples(7, seed=1)
    assert len(ex) == 7 and all(e["features"] is None and e["instruction"] and e["target"] and e["task"] == "text" for e in ex)
    assert text_examples(7, seed=1) == ex  # deterministic


# ---------------------------------------------------------------- scoring

def test_scores_on_hand_made_replies():
    assert score_task("asr", ["a cat runs", "my dog"], ROWS) == dict(score=1 - 1 / 6, wer=1 / 6)
    assert score_task("translation", ["un gato corre", "mi perro duerme"], ROWS)["score"] == 1.0
    assert score_task("asr", ["x y z w v u t", "q r s t u v"], ROWS)["score"] == 0.0  # clipped at 0 when WER > 1
    assert score_task("qa", ["two plus two is 4", "no it is not"], ROWS)["score"] == 1.0
    assert score_task("qa", ["what is two plus two: five", "is five less than two: no"], ROWS)["score"] == 0.5  # only the answer part counts
    assert score_task("instructions", ["Dogs", "three  "], ROWS)["score"] == 1.0
    assert score_task("speaker_count", ["two speakers", "one"], ROWS)["score"] == 0.5
    assert score_task("emotion", ["calm", "neutral and excited"], ROWS)["score"] == 0.5
    assert score_task("gender", ["a female voice", "female"], ROWS)["score"] == 0.5
    s = score_task("sound_events", ["a bell rings", "a siren"], ROWS)
    assert s["precision"] == 1.0 and s["recall"] == 2 / 3 and s["exact"] == 0.5
    m = score_task("music", ["a plucked tune in the key of C# major, played at a fast 112 beats per minute", "an organ melody in A major"], ROWS)
    assert (m["key"], m["mode"], m["tempo_bpm"], m["instrument"]) == (1.0, 0.5, 0.5, 1.0) and m["score"] == 0.75


def test_music_attributes_read_every_caption_template():
    assert music_attributes("a slow A major melody played on a sine wave at 70 beats per minute") == dict(key="A", mode="major", tempo_bpm=70, instrument="sine")
    assert music_attributes("a buzzy square-wave tune in the key of G# minor, played at a fast 150 beats per minute")["instrument"] == "square"
    assert music_attributes("a cat runs") == dict(key=None, mode=None, tempo_bpm=None, instrument=None)


# ---------------------------------------------------------------- collator and training

def test_collator_learns_only_replies_and_batches_text_only_examples(tokenizer):
    c = SftCollator(tokenizer)
    ex = [dict(features=feats([9])[0], instruction="transcribe the audio", target="a cat"),
          dict(features=None, instruction="what is two plus two", target="four")]
    b = c(ex)
    assert b["speech_features"].shape == (1, 9, DIM) and b["speech_lengths"].tolist() == [9]
    for i, target in enumerate(["a cat", "four"]):
        learned = b["labels"][i][b["labels"][i] != -100].tolist()
        assert tokenizer.decode(learned, skip_special_tokens=True).strip() == target
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert (b["input_ids"][0] == audio_id).sum() == 1 and (b["input_ids"][1] == audio_id).sum() == 0
    assert "speech_features" not in c(ex[1:])
    first = SftCollator(tokenizer, audio_first=False).prompt("transcribe", None, True)
    assert first.index("transcribe") < first.index(AUDIO_TOKEN) and c.prompt("transcribe", None, True).index(AUDIO_TOKEN) < c.prompt("transcribe", None, True).index("transcribe")


def test_train_on_a_speech_and_text_mix_lowers_the_loss(tokenizer):
    m = speech_lm(tokenizer).freeze_llm().add_lora(r=4, alpha=8)
    ex = [dict(features=f, instruction="transcribe the audio", target="a red cat") for f in feats([12, 16, 10, 14])] + text_examples(4)
    h = train_sft(m, tokenizer, ex, steps=12, batch_size=4, lr=1e-2, progress=False, log_every=3, min_lr_ratio=1.0)
    assert h.losses[-1] < h.losses[0]


# ---------------------------------------------------------------- per-modality LoRA

def test_text_ability_gives_each_typed_questions_outcome_only_on_request(tokenizer):
    llm = speech_lm(tokenizer).llm
    questions, answers, texts = [r["question"] for r in ROWS] * 2, [r["answer"] for r in ROWS] * 2, [r["answer_text"] for r in ROWS]
    plain = text_ability(llm, tokenizer, questions, answers, texts, max_new_tokens=4)
    detailed = text_ability(llm, tokenizer, questions, answers, texts, max_new_tokens=4, per_item=True)
    assert set(plain) == {"text_qa_accuracy", "text_perplexity"} and set(detailed) == set(plain) | {"text_qa_right"}
    right = detailed.pop("text_qa_right")
    assert right.shape == (4,) and set(right.tolist()) <= {0.0, 1.0} and right.mean() == plain["text_qa_accuracy"] and detailed == plain
    with pytest.raises(ValueError, match="answers"):
        text_ability(llm, tokenizer, questions, answers[:1], texts)


def test_per_modality_lora_text_path_is_the_base_llm_bit_for_bit(tokenizer):
    base = speech_lm(tokenizer)
    base_llm = copy.deepcopy(base.llm)
    m = ModalityLoRA(with_trained_lora(base))
    text = tokenizer(["<|user|>what is two plus two<|end|><|assistant|>", "<|user|>say a cat<|end|><|assistant|>"], add_special_tokens=False,
                     return_tensors="pt", padding=True)
    with torch.no_grad():
        want = base_llm(**text).logits
        assert torch.equal(m(text["input_ids"], text["attention_mask"]).logits, want)
        assert torch.equal(m.text_lm()(**text).logits, want)
        assert not torch.equal(m.speech_lm(text["input_ids"], text["attention_mask"]).logits, want)  # the LoRA itself does change text
    # audio inputs run with the LoRA: the same replies as the LoRA model, different from the base LLM's
    clips = feats([12, 8])
    assert speech_reply(m, tokenizer, clips, "transcribe the audio", max_new_tokens=6) == speech_reply(m.speech_lm, tokenizer, clips, "transcribe the audio", max_new_tokens=6)
    audio = SftCollator(tokenizer)([dict(features=f, instruction="transcribe", target="a cat") for f in clips])
    with torch.no_grad():
        on = m(**{k: v for k, v in audio.items() if k != "labels"}).logits
        with m.speech_lm.llm.disable_adapter(): off = m.speech_lm(**{k: v for k, v in audio.items() if k != "labels"}).logits
    assert not torch.equal(on, off)


def test_per_modality_lora_refuses_mixed_batches_and_models_without_lora(tokenizer):
    with pytest.raises(ValueError, match="speech_lm"): ModalityLoRA(speech_lm(tokenizer))
    m = ModalityLoRA(with_trained_lora(speech_lm(tokenizer)))
    ids = tokenizer(["a cat runs", "a dog runs"], add_special_tokens=False, return_tensors="pt", padding=True)["input_ids"]
    ids[1, 0] = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    with pytest.raises(ValueError, match="input_ids"): m(ids)


# ---------------------------------------------------------------- save / load

def test_fine_tuned_model_with_lora_and_tags_saves_and_loads(tokenizer, tmp_path, recwarn):
    tok = copy.deepcopy(tokenizer)
    m = speech_lm(tok)
    m.llm.config.save_pretrained(tmp_path / "base")  # an LLM read from a folder, as chapter 12's is, which peft compares the resized vocabulary with
    m.llm.name_or_path = str(tmp_path / "base")
    added = add_task_tags(m, tok)
    assert added == tag_tokens() and len(tok) == m.llm.get_input_embeddings().weight.shape[0] == m.config.text_config["vocab_size"]
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) == 1 for t in added)
    emb = m.llm.get_input_embeddings().weight
    assert not torch.equal(emb[tok.convert_tokens_to_ids("<|transcribe|>")], emb[tok.convert_tokens_to_ids("<|translate|>")])  # tags start apart
    assert add_task_tags(m, tok) == []  # idempotent
    m = with_trained_lora(m)
    save_sft_model(m, tok, tmp_path / "sft")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "sft" / "lora" / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all("lora_" in k for k in f.keys()), list(f.keys())  # the LoRA only: the embeddings live in the SpeechLM's own file
    assert not [w for w in recwarn if "save_embedding_layers" in str(w.message)]
    again, again_tok = load_sft_model(tmp_path / "sft")
    assert hasattr(again.llm, "disable_adapter") and len(again_tok) == len(tok)  # the LoRA is still separate, the tags still there
    b = SftCollator(tok)([dict(features=f, instruction=TASK_TAGS["asr"], target="a cat") for f in feats([12, 8])])
    with torch.no_grad(): assert torch.equal(again(**b).logits, m(**b).logits)
    plain = speech_lm(tokenizer)
    save_sft_model(plain, tokenizer, tmp_path / "plain")
    assert type(load_sft_model(tmp_path / "plain")[0].llm).__name__ == "LlamaForCausalLM"


def test_sft_methods_on_the_smoke_sound_mix_model_train_what_they_say():
    if artifact_problem(data_root() / "smoke" / "speech_lm_salmonn_dual") is not None: pytest.skip("chapter 09b's smoke model is not built")
    counts = {}
    for method in ("frozen", "lora", "full"):
        m, _ = make_sft_model(method, scale="smoke", r=4)
        counts[method] = m.trainable_parameters()
        assert all(p.requires_grad for p in m.adapter.parameters())
    assert counts["frozen"] < counts["lora"] < counts["full"]
    with pytest.raises(ValueError, match="target_modules"): make_sft_model("lora", scale="smoke", target_modules=("q_proj", "attention_q"))


# ---------------------------------------------------------------- bad input

def test_bad_input_names_the_argument(tokenizer):
    for call, name in [(lambda: check_task("telepathy"), "task"), (lambda: task_target("telepathy", {}), "task"),
                       (lambda: task_instruction("asr", spec="emoji"), "spec"), (lambda: task_instruction("asr", phrasings="secret"), "phrasings"),
                       (lambda: instruction_examples({"asr": ROWS}, {"asr": feats([4])}), "features"),
                       (lambda: instruction_examples({"asr": ROWS}, {"asr": feats([4, 4])}, spec="emoji"), "spec"),
                       (lambda: score_task("asr", ["a cat"], ROWS), "predictions"), (lambda: score_task("asr", "a cat", ROWS), "predictions"),
                       (lambda: music_attributes(None), "caption"), (lambda: text_examples(0), "n"),
                       (lambda: make_sft_model("half"), "method"), (lambda: make_sft_model("lora", spec="emoji"), "spec"),
                       (lambda: make_sft_model("lora", target_modules="q_proj"), "target_modules"),
                       (lambda: SftCollator(tokenizer)([dict(features=None, instruction=f"{AUDIO_TOKEN}hi", target="a")]), "instruction"),
                       (lambda: SftCollator(tokenizer)([dict(instruction="hi", target="a")]), "examples"),
                       (lambda: train_sft(speech_lm(tokenizer), tokenizer, [], 1), "examples"),
                       (lambda: load_sft_model("/nonexistent/folder"), "folder")]:
        with pytest.raises(ValueError, match=name): call()


# ---------------------------------------------------------------- cached runs and their seed

def test_cached_sft_model_depends_on_its_seed_and_not_on_what_ran_before_it(tokenizer, tmp_path, monkeypatch):
    "Chapter 12 repeats runs over training seeds: the same seed must give the same run whatever the caller did first, another seed another run."
    from speechllm_course.sft import cached_sft_model
    tasks = ("asr", "qa")
    examples = instruction_examples({t: ROWS for t in tasks}, {t: feats([10, 12]) for t in tasks}, "natural")
    base = speech_lm(tokenizer)

    def make():  # no seeding of its own: LoRA's initial weights come from whatever random state the builder sets
        return copy.deepcopy(base).freeze_llm().add_lora(r=4, alpha=8, target_modules=("q_proj", "v_proj")), tokenizer

    def lora_weights(model): return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    built, next_draws = [], []
    for caller_seed, root, seed in ((1, "first", 0), (2, "second", 0), (1, "third", 1), (1, "first", 0)):  # the last one loads the first
        monkeypatch.setenv("SPEECHLLM_DATA", str(tmp_path / root))
        torch.manual_seed(caller_seed)
        model, _, info = cached_sft_model("sft_toy", make, examples, steps=2, batch_size=2, lr=1e-2, scale="smoke", seed=seed, progress=False)
        assert info["steps"] == 2 and info["examples"] == len(examples)
        built.append(lora_weights(model)); next_draws.append(torch.rand(3))
    assert built[0] and all(b.keys() == built[0].keys() for b in built)
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0]), "same seed, different caller: the run must be the same"
    assert all(torch.equal(built[0][k], built[3][k]) for k in built[0]), "loaded from the cache: the run that was built"
    assert not all(torch.equal(built[0][k], built[2][k]) for k in built[0]), "another seed must be another run"
    # building or loading leaves the caller's random stream alone: its next draws are those the caller seed alone gives
    for caller_seed, draws in zip((1, 2, 1, 1), next_draws):
        torch.manual_seed(caller_seed); assert torch.equal(draws, torch.rand(3))
