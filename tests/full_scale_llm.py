"""Full-scale cases of the LLM chapters (08-14): each model at its `full` configuration, trained through its chapter's own
train function on synthetic inputs of the full recipe's batch size and lengths (the contract is in full_scale.py).

Nothing here reads data/ or a cached model. The LLM is chapter 08's Llama at LM_SIZES['full'], freshly initialised, with a
BPE tokenizer trained on generated SpeechWorld text (enough of it to reach the full vocabulary). Texts come from
SpeechWorld's own generators (sentences, questions, instructions, captions), so prompts and replies have their real token
lengths; speech is random encoder features, unit ids and codec codes whose lengths follow SpeechWorld's voices.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from full_scale import FullScaleCase
from speechllm_course.adapters import ADAPTER_SIZES, REPEAT_PROMPT, SpeechLM, frame_mask
from speechllm_course.alignment import ALIGNMENT_SIZES, IMPLICIT_PROMPTS
from speechllm_course.audio_tokens import AUDIO_TOKEN_SIZES
from speechllm_course.capstone import CAPSTONE_SIZES
from speechllm_course.codec import CODEC_SIZES
from speechllm_course.generation import GENERATION_SIZES
from speechllm_course.interleaving import INTERLEAVING_SIZES
from speechllm_course.lm import AUDIO_TOKEN, LM_SIZES, render, sound_caption, text_documents, tiny_llama_config, train_text_tokenizer
from speechllm_course.preference import PREFERENCE_SIZES
from speechllm_course.resynth import RESYNTH_SIZES
from speechllm_course.sft import SFT_SIZES
from speechllm_course.supervised_tokens import TOKENIZER_SIZES, pad_features
from speechllm_course.units import dedup
from speechllm_course.world import WORLD_SIZES, Grammar, make_instruction, make_question

SEED = 0
LM = LM_SIZES["full"]
ASR_DIM = TOKENIZER_SIZES["full"].hidden  # chapter 05b's ASR encoder: the speech encoder of chapters 09-14
BEATS_DIM = AUDIO_TOKEN_SIZES["full"].hidden  # chapter 06c's audio encoder, beside it in 09b's dual encoder
N_UNITS = RESYNTH_SIZES["full"].units  # chapter 07's k-means units, the speech tokens of 10b and 11
# SpeechWorld's clips, measured with world.synthesize (30 of each kind): statements 1.8 s on average (calm voice 2.1, longest 3.5),
# questions 2.7 s (3.2, 6.9), instructions 3.2 s (3.8, 5.5). 20 frames (0.4 s) a word + 10 frames of silence gives 2.3, 3.1 and
# 4.0 s: the calm voice's lengths, a little over.
FRAMES_PER_WORD, SILENCE_FRAMES = 20, 10
UNIT_RUN = (1, 2)  # frames per run of one unit (mean 1.5): ~13 deduplicated units a word; chapter 10b measures 9.7 at course
TEXT_DOCS = 3000  # generated documents the tokenizer learns from: BPE reaches the full 2000 tokens from ~3000


# ---------------------------------------------------------------- shared pieces

@functools.lru_cache(maxsize=None)
def _text_and_tokenizer():
    texts = [render(d) for d in text_documents(TEXT_DOCS, seed=SEED)]
    tok = train_text_tokenizer(texts, LM.vocab_size)
    assert len(tok) == LM.vocab_size, f"the tokenizer has {len(tok)} tokens, not the full {LM.vocab_size}: train it on more text"
    return texts, tok


def full_tokenizer():
    "Chapter 08's tokenizer at full; a fresh copy each time, since chapters 10b-12 add tokens to theirs."
    return copy.deepcopy(_text_and_tokenizer()[1])


def full_llm(tokenizer):
    "Chapter 08's LLM at full, freshly initialised, built as build_tiny_llm builds it."
    from transformers import LlamaForCausalLM
    torch.manual_seed(SEED)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, LM.hidden, LM.layers, LM.heads, LM.kv_heads, max_len=4 * LM.block))


def frames_of(text: str) -> int:
    "50 Hz encoder frames of `text` said by a SpeechWorld voice."
    return FRAMES_PER_WORD * len(text.split()) + SILENCE_FRAMES


def features(n_frames: int, dim: int, g: torch.Generator) -> torch.Tensor: return torch.randn(n_frames, dim, generator=g)


def unit_frames(n_frames: int, rng: np.random.Generator) -> np.ndarray:
    "50 Hz unit ids in short runs, as k-means units of speech come."
    ids = rng.integers(0, N_UNITS, n_frames)
    return np.repeat(ids, rng.integers(UNIT_RUN[0], UNIT_RUN[1] + 1, n_frames))[:n_frames]


def utterance_texts(kind: str, rng: np.random.Generator, grammar: Grammar) -> dict:
    "What one SpeechWorld recording says ('transcript') and the reply it gets: a statement (its own words), a question, an instruction."
    if kind == "statement":
        s = grammar.sentence(rng)
        return dict(kind=kind, transcript=s.text, reply=s.text, translation=s.spanish)
    if kind == "question":
        q = make_question(rng)
        return dict(kind=kind, transcript=q["question"], reply=q["answer_text"], answer=q["answer"])
    ins = make_instruction(rng, grammar)
    return dict(kind=kind, transcript=ins["instruction"], reply=ins["response"], instruction_kind=ins["kind"])


def utterances(n: int, rng: np.random.Generator, mix: dict) -> list[dict]:
    "`n` recordings drawn from `mix` (kind -> weight)."
    grammar, kinds = Grammar(), list(mix)
    p = np.array([mix[k] for k in kinds], dtype=float)
    return [utterance_texts(k, rng, grammar) for k in rng.choice(kinds, n, p=p / p.sum())]


WORLD = WORLD_SIZES["full"]
ALIGNMENT_MIX = dict(statement=WORLD.asr, question=WORLD.qa, instruction=WORLD.instructions)  # chapter 10's training clips, in proportion


def generators(seed: int = SEED) -> tuple[np.random.Generator, torch.Generator]:
    return np.random.default_rng(seed), torch.Generator().manual_seed(seed)


@torch.no_grad()
def match_ctc_rate(ctc, clips: list[torch.Tensor], n_labels: list[int]) -> None:
    """Raise an untrained CTC head's blank bias until about one frame per label is non-blank, as the recipe's pre-trained head has it.

    Untrained, the head picks a different label on almost every frame, and a CTC compressor would hand the LLM one position per two
    frames (several times what a trained one gives): every LLM-side cost would be overstated."""
    feats, lengths = pad_features(clips)
    _, logits, n = ctc(feats, lengths)
    margin = (logits[..., 1:].max(-1).values - logits[..., 0])[frame_mask(n, logits.shape[1])]
    share = min(1.0, sum(n_labels) / int(n.sum()))
    ctc.head.bias[0] += torch.quantile(margin.float(), 1 - share)


def token_ctc_lm(tok, examples: list[dict]):
    "Chapter 10's speech LLM (frozen LLM + token-CTC compressor) whose CTC head segments like the pre-trained one (`match_ctc_rate`)."
    from speechllm_course.alignment import token_ctc_speech_lm
    model = token_ctc_speech_lm(full_llm(tok), tok, ASR_DIM)
    match_ctc_rate(model.adapter.ctc, [ex["features"] for ex in examples],
                   [len(tok(ex["transcript"], add_special_tokens=False)["input_ids"]) for ex in examples])
    return model


# ---------------------------------------------------------------- 08: the tiny LLM

def lm_pretraining():
    from speechllm_course.core import train
    from speechllm_course.lm import pack_documents
    texts, _ = _text_and_tokenizer()
    tok = full_tokenizer()
    llm = full_llm(tok)
    blocks = pack_documents(tok(texts, add_special_tokens=False)["input_ids"], LM.block)[: 2 * LM.batch_size]
    assert len(blocks) == 2 * LM.batch_size
    data = [dict(input_ids=b, labels=b) for b in blocks]
    return lambda steps: train(llm, data, steps=steps, lr=LM.lr, batch_size=LM.batch_size, seed=SEED, progress=False, desc="tiny LLM",
                               weight_decay=0.1)


# ---------------------------------------------------------------- 09: adapters

# the notebook's ADAPTER_ROWS: adapter -> options
ADAPTER_RUNS = {"stack_mlp": dict(stack=4), "conv_pool": {}, "conv_transformer": {}, "ctc_compress": {},
                "window_qformer": dict(window=8, queries=2), "alignformer": {}}


def adapter_training(adapter: str):
    def make():
        from speechllm_course.adapters import train_speech_lm, uses_ctc
        s = ADAPTER_SIZES["full"]
        rng, g = generators()
        tok = full_tokenizer()
        model = SpeechLM.from_llm(full_llm(tok), tok, adapter, ASR_DIM, adapter_kwargs=ADAPTER_RUNS[adapter]).freeze_llm()
        examples = [dict(features=features(frames_of(u["transcript"]), ASR_DIM, g), instruction=REPEAT_PROMPT, target=u["transcript"])
                    for u in utterances(2 * s.batch_size, rng, dict(statement=1))]
        if uses_ctc(model):  # character CTC: one label per character
            match_ctc_rate(model.adapter.ctc, [ex["features"] for ex in examples], [len(ex["target"]) for ex in examples])
        # ctc_steps=0: the CTC head's own warm-up steps never run the LLM, so they are not what is measured here
        return lambda steps: train_speech_lm(model, tok, examples, steps=steps, batch_size=s.batch_size, lr=s.lr, seed=SEED, progress=False,
                                             ctc_steps=0, min_lr_ratio=s.min_lr_ratio)
    return make


# ---------------------------------------------------------------- 09b: SALMONN's dual encoder

def sound_mix_training():
    from speechllm_course.adapters import train_speech_lm
    from speechllm_course.dual_encoder import sound_mix_adapter, sound_mix_examples
    s = ADAPTER_SIZES["full"]
    rng, g = generators()
    dim = ASR_DIM + BEATS_DIM
    adapter, options = sound_mix_adapter("full")
    tok = full_tokenizer()
    model = SpeechLM.from_llm(full_llm(tok), tok, adapter, dim, adapter_kwargs=options).freeze_llm().add_lora()
    # the chapter's mix: every ASR clip once, every scene event_repeats times as a caption and as an event question (~5:3)
    n_scenes = 2 * s.batch_size // 16
    asr = utterances(2 * s.batch_size - 2 * s.event_repeats * n_scenes, rng, dict(statement=1))
    scenes = []
    while len(scenes) < n_scenes:
        caption, events = sound_caption(rng)
        if events: scenes.append((caption, events, int(rng.integers(100, 201))))  # scenes last 2-4 s
    examples = sound_mix_examples([features(frames_of(u["transcript"]), dim, g) for u in asr], [u["transcript"] for u in asr],
                                  [features(n, dim, g) for _, _, n in scenes], [c for c, _, _ in scenes], [e for _, e, _ in scenes],
                                  s.event_repeats)
    return lambda steps: train_speech_lm(model, tok, examples, steps=steps, batch_size=s.batch_size, lr=s.lr, seed=SEED, progress=False,
                                         min_lr_ratio=s.min_lr_ratio)


# ---------------------------------------------------------------- 10: alignment

def alignment_training(objective: str, lora: bool = False):
    def make():
        from speechllm_course.alignment import train_alignment
        s = ALIGNMENT_SIZES["full"]
        rng, g = generators()
        tok = full_tokenizer()
        examples = [dict(features=features(frames_of(u["transcript"]), ASR_DIM, g), transcript=u["transcript"], kind=u["kind"], reply=u["reply"])
                    for u in utterances(2 * s.batch_size, rng, ALIGNMENT_MIX)]
        if objective == "implicit":  # a teacher prompt per clip (spoken questions never get the bare '{}'); the utterance's reply stands in for the teacher's
            for ex in examples:
                prompts = IMPLICIT_PROMPTS if ex["kind"] == "statement" else [p for p in IMPLICIT_PROMPTS if p != "{}"]
                ex["prompt"] = prompts[int(rng.integers(len(prompts)))]
        model = token_ctc_lm(tok, examples)
        if lora: model.add_lora()
        return lambda steps: train_alignment(model, tok, examples, objective, steps=steps, batch_size=s.batch_size, lr=s.lr, seed=SEED,
                                             progress=False, min_lr_ratio=s.min_lr_ratio)
    return make


# ---------------------------------------------------------------- 10b: interleaving

IL = INTERLEAVING_SIZES["full"]


def statement_utterances(n: int, rng: np.random.Generator) -> list[dict]:
    "Statements as chapter 10b reads them (`interleaving.utterance`): words with their times, and 50 Hz units."
    from speechllm_course.interleaving import utterance
    grammar, out = Grammar(), []
    for _ in range(n):
        text = grammar.sentence(rng).text
        words = text.split()
        start = SILENCE_FRAMES / 2 / 50 + np.arange(len(words)) * FRAMES_PER_WORD / 50
        row = dict(text=text, words=words, word_start=start.tolist(), word_end=(start + FRAMES_PER_WORD / 50).tolist())
        out.append(utterance(row, unit_frames(frames_of(text), rng)))
    return out


def interleaved_pretraining():
    from speechllm_course.interleaving import (SpeechTextVocab, continue_pretraining, interleaved_documents, pack_mix, speech_documents,
                                               speech_text_llm, text_documents_ids)
    rng, _ = generators()
    tok = full_tokenizer()
    llm = speech_text_llm(full_llm(tok), tok, N_UNITS, max_len=IL.block)
    vocab = SpeechTextVocab(tok, N_UNITS)
    utts = statement_utterances(300, rng)
    docs = dict(text=text_documents_ids(vocab, [render(d) for d in text_documents(300, seed=1)]),
                speech=speech_documents(vocab, [u["units"] for u in utts]),
                interleaved=interleaved_documents(vocab, utts, IL.interleavings, IL.switch_prob, seed=1))
    blocks, _ = pack_mix(docs, IL.block, seed=5)
    assert len(blocks) >= 2 * IL.batch_size, f"{len(blocks)} blocks: generate more documents"
    blocks = blocks[: 2 * IL.batch_size]
    return lambda steps: continue_pretraining(llm, blocks, steps, IL.batch_size, IL.lr, seed=SEED, progress=False)


def text_to_token_training():
    from speechllm_course.interleaving import add_speech_tokens, new_text_to_token, text_to_token_examples, train_text_to_token
    rng, _ = generators()
    tok = full_tokenizer()
    vocab = add_speech_tokens(tok, N_UNITS)
    model = new_text_to_token(tok, IL.t2t_hidden, IL.t2t_layers, seed=SEED)
    examples = text_to_token_examples(vocab, statement_utterances(2 * IL.t2t_batch_size, rng), IL.t2t_spans, seed=2)
    return lambda steps: train_text_to_token(model, vocab, examples, steps, IL.t2t_batch_size, IL.lr, seed=SEED, progress=False)


# ---------------------------------------------------------------- 11: generation

GEN = GENERATION_SIZES["full"]
CODEC = CODEC_SIZES["full"]  # chapter 06's RVQ codec, whose codes the RQ-Transformer speaks


def spoken_qa(n: int, rng: np.random.Generator) -> list[dict]:
    "Chapter 11's items (`load_spoken_qa`): question, answer, the spoken answer's 50 Hz units and RVQ codes, the question's units."
    out = []
    for _ in range(n):
        q = make_question(rng)
        frames = frames_of(q["answer_text"])
        out.append(dict(question=q["question"], answer_text=q["answer_text"], units=unit_frames(frames, rng),
                        codes=rng.integers(0, CODEC.codebook_size, (CODEC.levels, frames)), question_units=unit_frames(frames_of(q["question"]), rng)))
    return out


def question_audio(tok, question: str, g: torch.Generator) -> torch.Tensor:
    "What chapter 10's explicit adapter hands the LLM for a spoken question: about one position per token of its transcript."
    return features(len(tok(question, add_special_tokens=False)["input_ids"]), LM.hidden, g)


def speech_text_lm():
    "Chapter 11's make_lm: chapter 08's LLM with the unit tokens; every weight trains."
    from speechllm_course.generation import answer_prompt_ids
    from speechllm_course.interleaving import add_speech_tokens
    tok = full_tokenizer()
    llm = full_llm(tok)
    vocab = add_speech_tokens(tok, N_UNITS, llm, seed=0)
    return llm, tok, vocab, answer_prompt_ids(tok)


def sequence_scheme_training(scheme: str):
    def make():
        from speechllm_course.generation import scheme_target, train_scheme
        rng, g = generators()
        llm, tok, vocab, prompt = speech_text_lm()
        examples = [dict(audio=question_audio(tok, it["question"], g), target=scheme_target(
                        vocab, scheme, it["question"], it["answer_text"], dedup(it["units"])[0], GEN.text_chunk, GEN.speech_chunk))
                    for it in spoken_qa(2 * GEN.batch_size, rng)]
        return lambda steps: train_scheme(llm, scheme, examples, prompt, tok.pad_token_id, steps=steps, batch_size=GEN.batch_size, lr=GEN.lr,
                                          seed=SEED, progress=False)
    return make


def parallel_training():
    from speechllm_course.generation import ParallelSpeechLM, train_scheme
    rng, g = generators()
    llm, tok, vocab, prompt = speech_text_lm()
    model = ParallelSpeechLM(llm, N_UNITS, n_streams=2)
    examples = []
    for it in spoken_qa(2 * GEN.batch_size, rng):
        text, speech = model.streams(tok(it["answer_text"], add_special_tokens=False)["input_ids"], dedup(it["units"])[0], vocab.end_id,
                                     tok.pad_token_id, GEN.delay)
        examples.append(dict(audio=question_audio(tok, it["question"], g), text=text, speech=speech))
    return lambda steps: train_scheme(model, "parallel_2streams", examples, prompt, tok.pad_token_id, steps=steps, batch_size=GEN.batch_size,
                                      lr=GEN.lr, seed=SEED, progress=False)


def duplex_training():
    from speechllm_course.generation import ParallelSpeechLM, duplex_dialogue, train_scheme
    rng, _ = generators()
    llm, tok, _, _ = speech_text_lm()
    silence = N_UNITS  # one past the units
    model = ParallelSpeechLM(llm, N_UNITS + 1, n_streams=2)
    items, examples = spoken_qa(64, rng), []
    for _ in range(2 * GEN.batch_size):  # two-turn dialogues, a third of them with a barge-in, as the notebook's make_dialogues
        pair = [items[j] for j in rng.choice(len(items), size=2, replace=False)]
        d = duplex_dialogue([(p["question_units"], p["units"]) for p in pair], silence, rng, barge_in=bool(rng.random() < 1 / 3))
        examples.append(dict(audio=torch.zeros(0, LM.hidden), text=[tok.pad_token_id] * len(d["user"]), speech=[d["system"].tolist(), d["user"].tolist()]))
    return lambda steps: train_scheme(model, "parallel", examples, ([tok.bos_token_id], []), tok.pad_token_id, steps=steps,
                                      batch_size=GEN.batch_size, lr=GEN.lr, seed=SEED, progress=False, desc="full duplex")


def ctc_decoder_training():
    from speechllm_course.generation import CTCUnitDecoder, train_scheme
    rng, g = generators()
    tok = full_tokenizer()
    model = CTCUnitDecoder(LM.hidden, N_UNITS, GEN.upsample)
    # the frozen LLM's states at the answer's tokens (answer_hidden_states, computed once before training)
    examples = [dict(hidden=features(len(tok(it["answer_text"], add_special_tokens=False)["input_ids"]), LM.hidden, g), units=dedup(it["units"])[0])
                for it in spoken_qa(2 * GEN.batch_size, rng)]
    return lambda steps: train_scheme(model, "text_driven", examples, ([], []), tok.pad_token_id, steps=steps, batch_size=GEN.batch_size,
                                      lr=GEN.lr, seed=SEED, progress=False)


def rq_transformer_training():
    from speechllm_course.generation import RQTransformer, RQTransformerConfig, train_rq_transformer
    rng, _ = generators()
    torch.manual_seed(SEED)
    model = RQTransformer(RQTransformerConfig(n_units=N_UNITS, levels=CODEC.levels, codebook_size=CODEC.codebook_size,
                                              hidden_size=GEN.rq_hidden, max_frames=512))
    examples = [dict(units=torch.from_numpy(it["units"]).long(), codes=torch.from_numpy(it["codes"]).long())
                for it in spoken_qa(2 * GEN.batch_size, rng)]
    return lambda steps: train_rq_transformer(model, examples, steps, GEN.batch_size, GEN.lr, seed=SEED, progress=False, max_frames=GEN.rq_crop)


# ---------------------------------------------------------------- 12: SFT

SFT = SFT_SIZES["full"]


def sft_clips(n_per_task: int, rng: np.random.Generator, g: torch.Generator, dim: int) -> tuple[dict, dict]:
    "({task: rows}, {task: features}): synthetic clips of every SFT task with the columns `sft.task_target` reads."
    from speechllm_course.sft import GENDERS, STYLES, SFT_TASKS
    grammar, rows, feats = Grammar(), {}, {}
    for task in SFT_TASKS:
        rows[task], feats[task] = [], []
        for _ in range(n_per_task):
            if task in ("asr", "translation", "emotion", "gender"):
                u = utterance_texts("statement", rng, grammar)
                row = dict(text=u["transcript"], translation=u["translation"], style=str(rng.choice(STYLES)), gender=str(rng.choice(GENDERS)))
                frames = frames_of(u["transcript"])
            elif task == "qa":
                u = utterance_texts("question", rng, grammar)
                row, frames = dict(question=u["transcript"], answer_text=u["reply"]), frames_of(u["transcript"])
            elif task == "instructions":
                u = utterance_texts("instruction", rng, grammar)
                row, frames = dict(response=u["reply"]), frames_of(u["transcript"])
            elif task == "speaker_count":  # 1-3 speakers, one sentence each, 0.15-0.5 s apart
                n = int(rng.integers(1, 4))
                row = dict(n_speakers=n)
                frames = sum(frames_of(grammar.sentence(rng).text) + int(rng.integers(8, 26)) for _ in range(n))
            else:  # sound_events (2-4 s scenes) or music (3-5 s); sound_caption returns no event kinds for music
                music = task == "music"
                while True:
                    caption, events = sound_caption(rng)
                    if bool(events) != music: break
                row, frames = dict(caption=caption), int(rng.integers(150, 251) if music else rng.integers(100, 201))
            rows[task].append(row)
            feats[task].append(features(frames, dim, g))
    return rows, feats


def sft_training(method: str):
    def make():
        from speechllm_course.dual_encoder import sound_mix_adapter
        from speechllm_course.sft import SFT_TASKS, instruction_examples, make_sft_model, train_sft
        rng, g = generators()
        dim = ASR_DIM + BEATS_DIM
        adapter, options = sound_mix_adapter("full")
        tok = full_tokenizer()
        # the SFT base is chapter 09b's sound-mix model, its LoRA merged in: a plain LLM under the dual-encoder adapter
        base = lambda: (SpeechLM.from_llm(full_llm(tok), tok, adapter, dim, adapter_kwargs=options), tok)
        model, tok = make_sft_model(method, "natural", r=SFT.lora_r, base=base)
        rows, feats = sft_clips(-(-2 * SFT.batch_size // len(SFT_TASKS)), rng, g, dim)
        examples = instruction_examples(rows, feats, "natural", seed=SEED)
        lr = SFT.full_lr if method == "full" else SFT.lr
        return lambda steps: train_sft(model, tok, examples, steps, SFT.batch_size, lr, seed=SEED, progress=False, min_lr_ratio=0.1)
    return make


# ---------------------------------------------------------------- 13: preference

PREF = PREFERENCE_SIZES["full"]


def spoken_questions(n: int, rng: np.random.Generator, g: torch.Generator) -> list[dict]:
    return [dict(u, features=features(frames_of(u["transcript"]), ASR_DIM, g)) for u in utterances(n, rng, dict(question=1))]


def preference_start(tok, questions: list[dict]):
    "Chapter 13's starting policy: chapter 10's token-CTC speech LLM, everything frozen, LoRA on every projection of the LLM."
    from speechllm_course.preference import LORA_TARGETS, preference_policy
    return preference_policy(token_ctc_lm(tok, questions), r=PREF.lora_r, target_modules=LORA_TARGETS)


def dpo_training():
    from speechllm_course.preference import train_dpo
    rng, g = generators()
    tok = full_tokenizer()
    questions = spoken_questions(2 * PREF.questions_per_step, rng, g)
    policy = preference_start(tok, questions)
    # the recipe's pairs are the policy's own right and wrong samples: here the right answer, and another question's
    pairs = [dict(prompt=AUDIO_TOKEN, chosen=q["reply"], features=q["features"],
                  rejected=next(o["reply"] for o in questions[i + 1:] + questions[:i] if o["reply"].strip() != q["reply"].strip()))
             for i, q in enumerate(questions)]
    return lambda steps: train_dpo(policy, tok, pairs, steps=steps, batch_size=PREF.questions_per_step, lr=PREF.lr, beta=PREF.dpo_beta,
                                   seed=SEED, progress=False)


def grpo_training():
    from speechllm_course.preference import GRPOObjective, train_grpo
    rng, g = generators()
    tok = full_tokenizer()
    questions = spoken_questions(2 * PREF.questions_per_step, rng, g)
    policy = preference_start(tok, questions)
    objective = GRPOObjective(tok, group_size=PREF.group_size, beta=PREF.grpo_beta, max_new_tokens=PREF.max_new_tokens, seed=SEED)
    data = [dict(prompt=AUDIO_TOKEN, answer=q["answer"], features=q["features"]) for q in questions]
    return lambda steps: train_grpo(policy, tok, data, steps=steps, batch_size=PREF.questions_per_step, lr=PREF.lr, objective=objective,
                                    seed=SEED, progress=False)


# ---------------------------------------------------------------- 14: capstone

def instruction_tuning():
    from speechllm_course.capstone import SPOKEN_PROMPT, TUNED_KINDS, instruction_tune
    c = CAPSTONE_SIZES["full"]
    rng, g = generators()
    tok = full_tokenizer()
    # stage 2's mix: spoken instructions of the tuned kinds, then as many ASR clips replayed (replay = 1.0)
    n_tuned = round(2 * c.batch_size / (1 + c.replay))
    tuned = [u for u in utterances(8 * n_tuned, rng, dict(instruction=1)) if u["instruction_kind"] in TUNED_KINDS][:n_tuned]
    replay = utterances(2 * c.batch_size - len(tuned), rng, dict(statement=1))
    clip = lambda u, instruction: dict(features=features(frames_of(u["transcript"]), ASR_DIM, g), transcript=u["transcript"],
                                       instruction=instruction, target=u["reply"])
    examples = [clip(u, SPOKEN_PROMPT) for u in tuned] + [clip(u, REPEAT_PROMPT) for u in replay]
    model = token_ctc_lm(tok, examples)
    return lambda steps: instruction_tune(model, tok, examples, steps, c.batch_size, c.lr, seed=SEED, progress=False, min_lr_ratio=c.min_lr_ratio)


# ---------------------------------------------------------------- the cases

_SYNTH = "synthetic inputs at the full batch size; random-init weights"
_SPEECH = f"clips {FRAMES_PER_WORD} frames a word + {SILENCE_FRAMES} (SpeechWorld's calm voice), random {ASR_DIM}-dim ASR-encoder features"
_CTC = "CTC head's blank bias set so it emits ~one position per label, as a pre-trained head does"

CASES = [
    FullScaleCase("08", "tiny Llama pretraining", LM.steps, lm_pretraining,
                  note=f"{_SYNTH}; blocks packed from generated SpeechWorld text (tokenizer trained on {TEXT_DOCS} documents)"),
    *[FullScaleCase("09", f"adapter {name}", ADAPTER_SIZES["full"].steps, adapter_training(name),
                    note=f"steps per adapter (one of six); {_SYNTH}; ASR statements, {_SPEECH}" +
                         (f"; {_CTC}; its {ADAPTER_SIZES['full'].ctc_steps} CTC-head-only steps (no LLM) not included" if name in ("ctc_compress", "alignformer") else ""))
      for name in ADAPTER_RUNS],
    FullScaleCase("09b", "sound-mix window Q-Former with LoRA", 2 * ADAPTER_SIZES["full"].steps, sound_mix_training,
                  note=f"dual (768-dim) and speech-only runs; both timed as the dual one; ASR:scene examples 5:3; {_SYNTH}; "
                       "the HuBERT stack_mlp run (as chapter 09's) not included"),
    FullScaleCase("10", "token-CTC ASR alignment with LoRA", 2 * ALIGNMENT_SIZES["full"].steps, alignment_training("asr", lora=True),
                  note=f"the 'asr' and 'asr_lora' runs, both timed with LoRA; statements, questions, instructions 4:1:1; {_SPEECH}; {_CTC}; "
                       f"the {ALIGNMENT_SIZES['full'].ctc_steps} token-CTC pre-training steps (no LLM) not included"),
    FullScaleCase("10", "implicit alignment", ALIGNMENT_SIZES["full"].steps, alignment_training("implicit"),
                  note=f"teacher replies stood in by each utterance's own reply (transcript, answer or response); {_SPEECH}; {_CTC}"),
    FullScaleCase("10", "explicit alignment", ALIGNMENT_SIZES["full"].steps, alignment_training("explicit"), note=f"{_SPEECH}; {_CTC}"),
    FullScaleCase("10b", "speech-text LM continued pretraining", 4 * IL.steps, interleaved_pretraining,
                  note=f"four mixes of {IL.steps} steps, same block shape; blocks packed from generated text, speech and interleaved documents "
                       f"(random {N_UNITS} units in runs of 1-2 frames); {_SYNTH}"),
    FullScaleCase("10b", "text-to-token model", IL.t2t_steps, text_to_token_training,
                  note=f"pairs from generated statements with random units; {_SYNTH}"),
    FullScaleCase("11", "chain-of-modality LM", 3 * GEN.steps, sequence_scheme_training("chain_of_modality"),
                  note="the three sequence schemes' runs, timed as the longest-target one; question audio = one 512-dim position per "
                       f"transcript token; answers {FRAMES_PER_WORD} frames a word of random units; {_SYNTH}"),
    FullScaleCase("11", "parallel 2-stream LM", 2 * GEN.steps, parallel_training,
                  note=f"the 1- and 2-stream runs, timed as the 2-stream one; {_SYNTH}"),
    FullScaleCase("11", "full-duplex LM", GEN.steps, duplex_training, note=f"two-turn dialogues of synthetic units via duplex_dialogue; {_SYNTH}"),
    FullScaleCase("11", "CTC unit decoder", GEN.ctc_steps, ctc_decoder_training,
                  note=f"random LLM states (computed once in the recipe, not per step); {_SYNTH}"),
    FullScaleCase("11", "RQ-Transformer", GEN.rq_steps, rq_transformer_training,
                  note=f"answers of {FRAMES_PER_WORD} frames a word, shorter than the {GEN.rq_crop}-frame crop; random "
                       f"{CODEC.levels}x{CODEC.codebook_size} codes; {_SYNTH}"),
    FullScaleCase("12", "SFT full fine-tuning", 2 * SFT.steps, sft_training("full"),
                  note=f"the two 'full' runs (with and without text mix), timed on speech-only batches; 9 tasks in equal shares; "
                       f"dual-encoder (768-dim) window Q-Former; {_SYNTH}"),
    FullScaleCase("12", "SFT LoRA", 6 * SFT.steps, sft_training("lora"),
                  note=f"five LoRA r={SFT.lora_r} runs + the adapter-only one (cheaper), timed as LoRA; 9 tasks in equal shares; {_SYNTH}"),
    FullScaleCase("13", "DPO", PREF.steps, dpo_training,
                  note=f"pairs: right answer vs another question's; LoRA r={PREF.lora_r} on token-CTC speech LLM; {_CTC}; "
                       f"the SFT baseline's {PREF.steps} cheaper steps not included; {_SYNTH}"),
    FullScaleCase("13", "GRPO", 2 * PREF.steps, grpo_training,
                  note=f"GRPO and SFT->GRPO runs; G={PREF.group_size}; an untrained policy rarely stops, so replies run to "
                       f"{PREF.max_new_tokens} tokens (an upper bound); {_CTC}; {_SYNTH}"),
    FullScaleCase("14", "stage-2 instruction tuning", 4 * CAPSTONE_SIZES["full"].steps, instruction_tuning,
                  note=f"four stage-2 runs (tuned kinds, no stage 1, all kinds, explicit stage 1); stage 1 is chapter 10's; {_SPEECH}; {_CTC}; {_SYNTH}"),
]
