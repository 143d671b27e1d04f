"Chapter 14: the assistant's spec, ASR data from LibriSpeech-shaped folders, stage 2's batches and training, save/load, the real-checkpoint path, bad input."

import io
import shutil

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel

from speechllm_course.adapters import WhisperSpeechEncoder
from speechllm_course.alignment import AlignmentSizes, token_ctc_labels, token_ctc_speech_lm
from speechllm_course.capstone import (
    HELDOUT_KINDS, INSTRUCTION_KINDS, SPOKEN_PROMPT, TRANSLATE_PROMPT, TUNED_KINDS, AssistantSpec, CapstoneSizes, InstructionCollator, SpokenAssistant,
    asr_clips, assistant_artifacts, assistant_widget, ask, build_assistant, example_requests, instruction_examples, instruction_tune,
    normalize_transcript, read_audio, translation_scores)
from speechllm_course.core import data_root
from speechllm_course.lm import AUDIO_TOKEN, tiny_llama_config, train_text_tokenizer, render, text_documents
from speechllm_course.world import synthesize

SENTENCES = ["THE CAT SLEEPS.", "MY DOG EATS, AND THE DUCK SINGS!", "FOUR BLUE HORSES CARRY THE CHAIRS", "A SMALL FISH JUMPS"]


def flac_bytes(wav, rate, channels=1):
    buf = io.BytesIO()
    sf.write(buf, np.stack([wav] * channels, 1) if channels > 1 else wav, rate, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def librispeech_folder(tmp_path_factory):
    "A LibriSpeech-shaped DatasetDict on disk: upper-case punctuated text, 8 kHz stereo FLAC in a decodable Audio column, one 3 s clip of silence too long for max_seconds=2."
    folder = tmp_path_factory.mktemp("librispeech")
    audio = [{"bytes": flac_bytes(synthesize(t.lower(), "spk05", sample_rate=8000).wav, 8000, channels=2), "path": None} for t in SENTENCES]
    audio.append({"bytes": flac_bytes(np.zeros(24000, dtype=np.float32), 8000), "path": None})
    ds = datasets.Dataset.from_dict({"audio": audio, "text": SENTENCES + ["SILENCE"], "speaker_id": [5] * 5}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train.100": ds}).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def local_parts(tmp_path_factory):
    "A small random Whisper encoder and a small random Llama with its own 300-token vocabulary, saved as Hub-style folders."
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, num_mel_bins=80, vocab_size=64, max_target_positions=32,
                        max_source_positions=500, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(folder / "whisper")
    WhisperFeatureExtractor(feature_size=80, chunk_length=10).save_pretrained(folder / "whisper")
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=1)], vocab_size=300)
    LlamaForCausalLM(tiny_llama_config(tok, hidden=64, layers=1, heads=2, kv_heads=1)).save_pretrained(folder / "llama")
    tok.save_pretrained(folder / "llama")
    return str(folder / "whisper"), str(folder / "llama")


def tiny_assistant(local_parts, seed=0):
    from speechllm_course.lm import load_llm
    whisper, llama = local_parts
    llm, tok = load_llm(llama)
    torch.manual_seed(seed)
    encoder = WhisperSpeechEncoder.from_pretrained(whisper)
    return SpokenAssistant(encoder, token_ctc_speech_lm(llm, tok, encoder.dim), tok, whisper, "smoke")


# ---------------------------------------------------------------------------------------------------------------------
# the spec and the ASR data
# ---------------------------------------------------------------------------------------------------------------------

def test_spec_defaults_share_chapter_10s_stage_1_and_other_specs_get_their_own_names():
    assert AssistantSpec().is_default and AssistantSpec().slug == "speechworld"
    assert assistant_artifacts()[:2] == ["alignment_token_ctc", "aligned_asr"]
    a, b = AssistantSpec(encoder="openai/whisper-small"), AssistantSpec(encoder="openai/whisper-base")
    assert a.slug != b.slug and a.slug == AssistantSpec(encoder="openai/whisper-small").slug and len(a.slug) == 12
    names = assistant_artifacts(a) + assistant_artifacts(a, INSTRUCTION_KINDS) + assistant_artifacts(a, stage1=False)
    assert len(set(names)) == 5 and all(a.slug in n for n in names)  # stage 1 shared, three different stage 2s
    # chapter 10's explicit alignment as stage 1: its artifact with the course's parts, its own names otherwise
    assert assistant_artifacts(AssistantSpec(stage1="explicit")) == ["alignment_token_ctc", "aligned_explicit", "capstone_speechworld_explicit_tuned"]
    e = AssistantSpec(encoder="openai/whisper-small", stage1="explicit")
    assert assistant_artifacts(e)[0] == assistant_artifacts(a)[0] and assistant_artifacts(e)[1] == f"capstone_explicit_{a.slug}"
    assert assistant_artifacts(e)[2] != assistant_artifacts(a)[2]


@pytest.mark.parametrize("kwargs, name", [(dict(encoder=""), "encoder"), (dict(llm=3), "llm"), (dict(asr_items=0), "asr_items"),
                                          (dict(asr_split=None), "asr_split"), (dict(max_seconds=-1), "max_seconds"),
                                          (dict(stage1="implicit"), "stage1")])
def test_spec_rejects_bad_fields(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AssistantSpec(**kwargs)


def test_normalize_transcript_writes_librispeech_text_the_speechworld_way():
    assert normalize_transcript("HELLO, WORLD!  IT'S 3 O'CLOCK.") == "hello world it's 3 o'clock"
    assert normalize_transcript("---") == ""
    with pytest.raises(ValueError, match="text"):
        normalize_transcript(None)


def test_read_audio_mixes_down_and_resamples_every_cell_form(tmp_path):
    t = np.arange(8000) / 8000
    wav = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = flac_bytes(wav, 8000, channels=2)
    (tmp_path / "a.flac").write_bytes(data)
    for cell in ({"bytes": data, "path": None}, {"bytes": None, "path": str(tmp_path / "a.flac")}, data, str(tmp_path / "a.flac"),
                 {"array": wav, "sampling_rate": 8000}):
        out = read_audio(cell)
        assert out.dtype == np.float32 and out.ndim == 1 and len(out) == 16000
        spectrum = np.abs(np.fft.rfft(out))
        assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) < 2  # the same tone, at the new rate
    with pytest.raises(ValueError, match="cell"):
        read_audio(3.5)


def test_asr_clips_read_a_local_librispeech_folder(librispeech_folder):
    spec = AssistantSpec(asr_data=librispeech_folder, asr_split="train.100")
    wavs, texts = asr_clips(spec)
    assert texts == [normalize_transcript(s) for s in SENTENCES] + ["silence"]
    assert all(w.dtype == np.float32 and w.ndim == 1 for w in wavs)
    direct = synthesize("the cat sleeps", "spk05").wav  # the 8 kHz copy, read back at 16 kHz, is about as long as the original
    assert abs(len(wavs[0]) - len(direct)) < 0.01 * len(direct) + 320
    assert asr_clips(spec, n=2)[1] == texts[:2]
    short = AssistantSpec(asr_data=librispeech_folder, asr_split="train.100", max_seconds=2.9)
    assert "silence" not in asr_clips(short)[1]  # the 3 s clip is skipped
    with pytest.raises(ValueError, match="asr_split"):
        asr_clips(AssistantSpec(asr_data=librispeech_folder, asr_split="validation"))


def test_asr_clips_name_the_missing_column(tmp_path):
    datasets.Dataset.from_dict({"audio": [b"x"], "sentence": ["a"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match="'audio' and 'text' columns"):
        asr_clips(AssistantSpec(asr_data=str(tmp_path / "d")))


# ---------------------------------------------------------------------------------------------------------------------
# stage 2: batches, training, examples
# ---------------------------------------------------------------------------------------------------------------------

def stage2_examples(n=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = [("what is the plural of cat", "cats"), ("repeat after me: the dog runs", "the dog runs"), ("how many words are in: a cat", "two"),
             ("what is the last word of: my duck sings", "sings")]
    return [dict(features=torch.randn(30 + 7 * i, dim, generator=g), transcript=pairs[i % 4][0], instruction=SPOKEN_PROMPT, target=pairs[i % 4][1])
            for i in range(n)]


def test_instruction_collator_learns_the_reply_only_and_ctc_reads_the_transcript(tokenizer):
    exs = stage2_examples()
    batch = InstructionCollator(tokenizer)(exs)
    for i, ex in enumerate(exs):
        learned = batch["labels"][i][batch["labels"][i] != -100].tolist()
        reply_ids = tokenizer(ex["target"], add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(learned[: len(reply_ids)]).strip() == ex["target"]
        assert len(learned) <= len(reply_ids) + 2  # the reply and its end token(s), nothing of the prompt
    labels, lengths = token_ctc_labels(tokenizer, [ex["transcript"] for ex in exs])
    assert torch.equal(batch["ctc_labels"], labels) and torch.equal(batch["ctc_label_lengths"], lengths)
    assert batch["speech_features"].shape[:2] == (4, max(len(ex["features"]) for ex in exs))
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        InstructionCollator(tokenizer)([exs[0], dict(features=exs[1]["features"], instruction=SPOKEN_PROMPT, target="x")])


def test_instruction_tune_trains_the_adapter_and_leaves_the_llm_alone(tokenizer, one_thread):
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=256))
    model = token_ctc_speech_lm(llm, tokenizer, 16)
    llm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    hist = instruction_tune(model, tokenizer, stage2_examples(8), steps=4, batch_size=4, lr=1e-2, progress=False, log_every=1)
    assert len(hist.losses) == 4 and np.isfinite(hist.losses).all()
    assert all(torch.equal(v, llm_before[k]) for k, v in model.llm.state_dict().items())
    assert any(not torch.equal(v, adapter_before[k]) for k, v in model.adapter.state_dict().items() if v.is_floating_point())
    model.llm.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        instruction_tune(model, tokenizer, stage2_examples(2), steps=1, progress=False)
    model.freeze_llm()
    with pytest.raises(ValueError, match="examples"):
        instruction_tune(model, tokenizer, [], steps=1, progress=False)


def test_instruction_examples_keep_only_the_asked_kinds():
    rows = [dict(instruction=f"request {i}", response=f"reply {i}", kind=k) for i, k in enumerate(INSTRUCTION_KINDS)]
    feats = [torch.zeros(10, 4) for _ in rows]
    tuned = instruction_examples(rows, feats)
    assert [ex["kind"] for ex in tuned] == list(TUNED_KINDS) and not {ex["kind"] for ex in tuned} & set(HELDOUT_KINDS)
    assert all(ex["instruction"] == SPOKEN_PROMPT and ex["target"] == ex["transcript"].replace("request", "reply") for ex in tuned)
    ds = datasets.Dataset.from_list(rows)
    assert [ex["transcript"] for ex in instruction_examples(ds, feats, ("translate",))] == ["request 5"]
    with pytest.raises(ValueError, match="kinds"):
        instruction_examples(rows, feats, ("telepathy",))
    with pytest.raises(ValueError, match="kinds"):
        instruction_examples(rows, feats, "repeat")
    with pytest.raises(ValueError, match="features"):
        instruction_examples(rows, feats[:3])


def test_translation_scores():
    s = translation_scores(["el gato duerme", "un perro come."], ["el gato duerme", "el perro come"])
    assert s["exact"] == 0.5 and abs(s["word_accuracy"] - (1 - 1 / 6)) < 1e-9
    assert translation_scores(["x y z w v u"], ["hola"])["word_accuracy"] == 0.0  # floored: more errors than words
    with pytest.raises(ValueError, match="predictions"):
        translation_scores(["hola"], ["hola", "adios"])


# ---------------------------------------------------------------------------------------------------------------------
# the assistant: calls, save/load, ask and the widget
# ---------------------------------------------------------------------------------------------------------------------

def test_assistant_answers_one_or_many_and_round_trips_through_save_pretrained(local_parts, tmp_path, one_thread):
    assistant = tiny_assistant(local_parts)
    wavs = [synthesize(t, "spk30").wav for t in ("what is the plural of goat", "repeat after me: the cat sleeps")]
    one = assistant(wavs[0], max_new_tokens=5)
    many = assistant(wavs, max_new_tokens=5)
    assert isinstance(one, str) and isinstance(many, list) and many[0] == one
    assert len(assistant(wavs, [SPOKEN_PROMPT, TRANSLATE_PROMPT], max_new_tokens=3)) == 2
    assistant.save_pretrained(tmp_path / "saved")
    assert not list(tmp_path.glob(".saved.tmp-*"))  # written aside, then moved into place
    again = SpokenAssistant.from_pretrained(tmp_path / "saved")
    assert again(wavs, max_new_tokens=5) == many and again.encoder_name == local_parts[0]
    assistant.save_pretrained(tmp_path / "saved")  # overwriting a saved assistant works too
    with pytest.raises(ValueError, match="prompt"):
        assistant(wavs[0], prompt="no placeholder")
    with pytest.raises(ValueError, match="prompt"):
        assistant(wavs[0], prompt=f"{AUDIO_TOKEN} and {AUDIO_TOKEN}")
    with pytest.raises(ValueError, match="folder"):
        SpokenAssistant.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder"):
        SpokenAssistant(assistant.encoder, token_ctc_speech_lm(assistant.model.llm, assistant.tokenizer, 32), assistant.tokenizer)


def test_ask_and_the_widget_speak_a_request_and_show_the_answer(local_parts, capsys, one_thread):
    assistant = tiny_assistant(local_parts)
    res = ask(assistant, "what is the plural of goat", "spk31", "calm")
    assert res["wav"].ndim == 1 and len(res["wav"]) > 8000 and isinstance(res["heard"], str) and isinstance(res["reply"], str)
    requests = example_requests(6)
    assert len(requests) == 6 and len(set(requests)) == 6
    ui = assistant_widget(assistant, requests)
    button = ui.children[2].children[1]
    button.click()
    assert "answer:" in capsys.readouterr().out  # outside a kernel the Output widget passes prints through
    ui.children[1].value = ""  # an empty request is refused with the synthesizer's message, not a traceback
    button.click()
    assert "ValueError: text" in capsys.readouterr().out
    with pytest.raises(ValueError, match="assistant"):
        ask("not an assistant", "hello")


# ---------------------------------------------------------------------------------------------------------------------
# the online path, offline: Whisper + a Llama with another vocabulary + LibriSpeech-shaped data, through build_assistant
# ---------------------------------------------------------------------------------------------------------------------

def test_build_assistant_takes_real_checkpoints_and_datasets(local_parts, librispeech_folder, tmp_path, one_thread):
    whisper, llama = local_parts
    spec = AssistantSpec(encoder=whisper, llm=llama, asr_data=librispeech_folder, asr_split="train.100", max_seconds=2.9)
    tiny1 = AlignmentSizes(train_items=None, spoken_items=4, ctc_steps=2, steps=2, batch_size=4, lr=3e-3, test_items=4, min_lr_ratio=1.0)
    tiny2 = CapstoneSizes(tune_items=6, replay=0.5, steps=2, batch_size=4, lr=3e-3, min_lr_ratio=1.0, test_items=4)
    base = data_root() / "smoke"
    try:
        assistant, info = build_assistant(spec, scale="smoke", stage1_sizes=tiny1, sizes=tiny2, progress=False)
        assert info["stage1"]["examples"] == 4 + 4 + 4  # 4 LibriSpeech-shaped clips (the silence is too long) + 4 questions + 4 instructions
        assert info["examples"] == 6 + 3 and info["steps"] == 2 and info["artifact"] == assistant_artifacts(spec)[-1]
        assert all((base / name / "manifest.json").is_file() for name in assistant_artifacts(spec))
        saved_llm = LlamaForCausalLM.from_pretrained(llama).state_dict()
        own = assistant.model.llm.state_dict()
        assert all(torch.equal(own[k], v) for k, v in saved_llm.items() if k in own and own[k].shape == v.shape)  # frozen throughout
        wav = synthesize("what is the plural of goat", "spk31").wav
        first = assistant(wav, max_new_tokens=4)
        again, _ = build_assistant(spec, scale="smoke", stage1_sizes=tiny1, sizes=tiny2, progress=False)  # cached: loaded, not retrained
        assert again(wav, max_new_tokens=4) == first
        with pytest.raises(ValueError, match="kinds"):
            build_assistant(spec, kinds=(), scale="smoke")
    finally:
        for name in assistant_artifacts(spec):
            shutil.rmtree(base / name, ignore_errors=True)
            (base / f".{name}.lock").unlink(missing_ok=True)


def test_the_default_stage_1_data_is_chapter_10s_so_sharing_its_artifacts_is_sound(one_thread):
    from speechllm_course.adapters import load_speech_encoder
    from speechllm_course.alignment import alignment_training_examples
    from speechllm_course.capstone import asr_pretraining_examples
    ours = asr_pretraining_examples(AssistantSpec(), load_speech_encoder("asr", scale="smoke", progress=False), scale="smoke", progress=False)
    theirs = alignment_training_examples("smoke", progress=False)
    assert [(ex["kind"], ex["transcript"]) for ex in ours] == [(ex["kind"], ex["transcript"]) for ex in theirs]
    assert all(torch.equal(a["features"], b["features"]) for a, b in zip(ours, theirs))
