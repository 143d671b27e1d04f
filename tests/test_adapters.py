"Chapter 09: adapters (shapes, lengths, padding), CTC segments, splicing audio into an LLM, SpeechLM save/load and generation, the Whisper path, bad input."

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from speechllm_course.adapters import (
    ADAPTERS, ASR_INSTRUCTION, AdapterOutput, SpeechLM, SpeechLMCollator, WhisperSpeechEncoder, ctc_segments, load_speech_encoder,
    make_adapter, speech_prompt, speech_reply, train_speech_lm)
from speechllm_course.lm import AUDIO_TOKEN, chat, tiny_llama_config
from speechllm_course.supervised_tokens import BLANK, CHARS, error_rate

DIM = 24


def tiny_llm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, hidden=32, layers=1, heads=2, kv_heads=1, max_len=96)).eval()


def speech_lm(tokenizer, adapter="stack_mlp", **kw):
    torch.manual_seed(1)
    return SpeechLM.from_llm(tiny_llm(tokenizer), tokenizer, adapter, DIM, **kw).eval()


def feats(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, DIM, generator=g) for n in lengths]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_maps_frames_to_llm_width_and_ignores_padding(name):
    torch.manual_seed(0)
    a = make_adapter(name, DIM, 16).eval()
    x = feats([37, 20, 9])
    padded = torch.nn.utils.rnn.pad_sequence(x, batch_first=True)
    out = a(padded, torch.tensor([37, 20, 9]))
    assert isinstance(out, AdapterOutput) and out.embeds.shape[0] == 3 and out.embeds.shape[-1] == 16
    assert (out.lengths >= 1).all() and int(out.lengths.max()) <= out.embeds.shape[1]
    for k, f in enumerate(x):  # the same clip alone gives the same embeddings: padding never leaks in
        alone = a(f[None], torch.tensor([len(f)]))
        n = int(alone.lengths[0])
        assert n == int(out.lengths[k])
        torch.testing.assert_close(alone.embeds[0, :n], out.embeds[k, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,kw,frames,expected", [("stack_mlp", dict(stack=4), 37, 10), ("stack_mlp", dict(stack=1), 37, 37),
                                                     ("conv_pool", dict(pool=2), 37, 10), ("conv_transformer", {}, 37, 10),
                                                     ("window_qformer", dict(window=8, queries=2), 37, 10)])
def test_fixed_rate_adapters_output_the_documented_number_of_vectors(name, kw, frames, expected):
    a = make_adapter(name, DIM, 16, **kw).eval()
    assert int(a(torch.randn(1, frames, DIM), torch.tensor([frames])).lengths[0]) == expected


def test_ctc_segments_are_runs_of_one_non_blank_label():
    path = torch.tensor([[BLANK, 3, 3, BLANK, 3, 5, 5, BLANK, 7, 9, 9]])
    logits = torch.nn.functional.one_hot(path, 12).float()
    seg, n = ctc_segments(logits, torch.tensor([10]))  # the last frame is padding
    assert seg[0].tolist() == [-1, 0, 0, -1, 1, 2, 2, -1, 3, 4, -1] and n.tolist() == [5]


def test_ctc_compression_gives_one_vector_per_run_and_alignformer_one_query_per_run():
    for name in ("ctc_compress", "alignformer"):
        torch.manual_seed(0)
        a = make_adapter(name, DIM, 16).eval()
        x = torch.randn(2, 30, DIM)
        out = a(x, torch.tensor([30, 18]))
        assert out.ctc_lengths.tolist() == [15, 9] and out.ctc_logits.shape == (2, 15, len(CHARS) + 1)  # CTC at half the frame rate
        _, n = ctc_segments(out.ctc_logits, out.ctc_lengths)
        assert out.lengths.tolist() == n.clamp(min=1).tolist()


def test_make_adapter_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="adapter"): make_adapter("mlp9000", DIM, 16)
    with pytest.raises(ValueError, match="adapter_kwargs"): make_adapter("stack_mlp", DIM, 16, window=3)
    with pytest.raises(ValueError, match="in_dim"): make_adapter("stack_mlp", 0, 16)


def test_splice_puts_each_clip_at_its_placeholder_and_masks_its_labels(tokenizer):
    m = speech_lm(tokenizer)
    col = SpeechLMCollator(tokenizer)
    ex = [dict(features=f, instruction=ASR_INSTRUCTION, target=t) for f, t in zip(feats([16, 8]), ["a red cat", "the dog sleeps"])]
    b = col(ex)
    audio = m.encode_audio(b["speech_features"], b["speech_lengths"])
    embeds, mask, labels, n_audio = m.splice(b["input_ids"], b["attention_mask"], audio, b["labels"])
    assert n_audio.tolist() == audio.lengths.tolist() == [4, 2]
    tid = m.config.audio_token_id
    for k in range(2):
        ids = b["input_ids"][k][b["attention_mask"][k].bool()]
        p = int((ids == tid).nonzero())
        n = int(audio.lengths[k])
        torch.testing.assert_close(embeds[k, p: p + n], audio.embeds[k, :n])  # right padding: the sequence starts at 0
        assert (labels[k, p: p + n] == -100).all() and int(mask[k].sum()) == len(ids) - 1 + n
        kept = labels[k][labels[k] != -100]
        assert tokenizer.decode(kept).strip().startswith(ex[k]["target"])  # only the reply is learned
    left, lmask, _, _ = m.splice(b["input_ids"], b["attention_mask"], audio, padding_side="left")
    torch.testing.assert_close(left[1, -int(lmask[1].sum()):], embeds[1, : int(mask[1].sum())])


def test_bad_batches_get_clear_errors(tokenizer):
    m = speech_lm(tokenizer)
    col = SpeechLMCollator(tokenizer)
    b = col([dict(features=f, instruction=ASR_INSTRUCTION, target="a cat") for f in feats([12, 12])])
    with pytest.raises(ValueError, match="speech_features.*2 clips"):  # audio given, one placeholder missing
        ids = b["input_ids"].clone(); ids[ids == m.config.audio_token_id] = tokenizer.pad_token_id
        ids[0, 1] = m.config.audio_token_id
        m(ids, b["attention_mask"], b["speech_features"], b["speech_lengths"])
    two = tokenizer([speech_prompt(tokenizer, f"{AUDIO_TOKEN} and {AUDIO_TOKEN} compare")], return_tensors="pt", add_special_tokens=False)
    with pytest.raises(ValueError, match="2 clips"):  # two placeholders, one clip
        m(two["input_ids"], two["attention_mask"], b["speech_features"][:1], b["speech_lengths"][:1])
    with pytest.raises(ValueError, match="speech_lengths"):  # mismatched batch sizes
        m(b["input_ids"], b["attention_mask"], b["speech_features"], b["speech_lengths"][:1])
    with pytest.raises(ValueError, match="speech_features"):
        m(b["input_ids"], b["attention_mask"], b["speech_features"][..., :5], b["speech_lengths"])
    with pytest.raises(ValueError, match="labels"):
        m(b["input_ids"], b["attention_mask"], b["speech_features"], b["speech_lengths"], labels=b["labels"][:1])
    with pytest.raises(ValueError, match="context"):  # prompt + audio longer than the context (96)
        long = [torch.randn(500, DIM)]
        m.generate(b["input_ids"][:1], b["attention_mask"][:1], *(torch.nn.utils.rnn.pad_sequence(long, batch_first=True), torch.tensor([500])))
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(b["input_ids"][:1], b["attention_mask"][:1], b["speech_features"][:1], b["speech_lengths"][:1], max_new_tokens=200)
    with pytest.raises(ValueError, match="examples"):
        col([dict(features=torch.randn(3, DIM), target="x")])
    with pytest.raises(ValueError, match="instructions"):
        speech_reply(m, tokenizer, feats([10, 10]), ["a", "b", "c"])


def test_frozen_llm_gets_no_gradient_and_adapter_does(tokenizer):
    m = speech_lm(tokenizer, "conv_transformer").freeze_llm().train()
    b = SpeechLMCollator(tokenizer)([dict(features=f, instruction=ASR_INSTRUCTION, target="a cat") for f in feats([20, 14])])
    m(**b).loss.backward()
    assert all(p.grad is None for p in m.llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())
    assert m.trainable_parameters() == sum(p.numel() for p in m.adapter.parameters())


def test_ctc_adapters_add_their_ctc_loss(tokenizer):
    m = speech_lm(tokenizer, "ctc_compress", ctc_weight=0.5).train()
    b = SpeechLMCollator(tokenizer, ctc=True)([dict(features=f, instruction=ASR_INSTRUCTION, target="a cat") for f in feats([20, 14])])
    out = m(**b)
    assert out.ctc_loss is not None and torch.isclose(out.loss, out.lm_loss + 0.5 * out.ctc_loss)


def test_training_learns_to_transcribe_a_toy_code_and_resumes(tokenizer, tmp_path):
    "Each word is a fixed random 'sound' (a frame pattern); the adapter must learn to spell it through the frozen LLM."
    words = ["cat", "dog", "red", "big", "sees", "the"]
    g = torch.Generator().manual_seed(0)
    sound = {w: torch.randn(4, DIM, generator=g) for w in words}
    rng = np.random.default_rng(0)
    sents = [" ".join(rng.choice(words, 3)) for _ in range(64)]
    ex = [dict(features=torch.cat([sound[w] for w in s.split()]), instruction=ASR_INSTRUCTION, target=s) for s in sents]
    m = speech_lm(tokenizer, "stack_mlp", adapter_kwargs=dict(stack=4, hidden=64)).freeze_llm()
    m.llm.requires_grad_(True)  # a 1-layer random LLM cannot follow anything frozen: this test is about the plumbing
    with torch.no_grad(): before = float(m(**SpeechLMCollator(tokenizer)(ex[:16])).loss)
    train_speech_lm(m, tokenizer, ex, steps=300, batch_size=16, lr=1e-2, progress=False, ckpt_dir=str(tmp_path / "ck"), ckpt_every=150)
    with torch.no_grad(): after = float(m(**SpeechLMCollator(tokenizer)(ex[:16])).loss)
    assert after < 0.3 * before
    hyp = speech_reply(m, tokenizer, [e["features"] for e in ex[:16]], ASR_INSTRUCTION, max_new_tokens=12)
    assert error_rate([e["target"] for e in ex[:16]], hyp) < 0.15
    h2 = train_speech_lm(m, tokenizer, ex, steps=300, batch_size=16, lr=1e-2, progress=False, ckpt_dir=str(tmp_path / "ck"), ckpt_every=150)
    assert h2.resumed_from == 300  # a finished run resumes at its end instead of training again


def test_batched_generation_equals_one_at_a_time(tokenizer):
    m = speech_lm(tokenizer, "window_qformer")
    f = feats([30, 11, 22], seed=3)
    batched = speech_reply(m, tokenizer, f, ASR_INSTRUCTION, max_new_tokens=6, batch_size=3)
    single = [speech_reply(m, tokenizer, [x], ASR_INSTRUCTION, max_new_tokens=6)[0] for x in f]
    assert batched == single


def test_save_pretrained_round_trip_keeps_llm_adapter_and_config(tokenizer, tmp_path):
    m = speech_lm(tokenizer, "alignformer", adapter_kwargs=dict(context=1))
    b = SpeechLMCollator(tokenizer, ctc=True)([dict(features=f, instruction=ASR_INSTRUCTION, target="a cat") for f in feats([20, 14])])
    m.save_pretrained(tmp_path)
    again = SpeechLM.from_pretrained(tmp_path).eval()
    assert again.config.adapter == "alignformer" and again.config.adapter_kwargs == dict(context=1)
    with torch.no_grad():
        torch.testing.assert_close(again(**b).logits, m(**b).logits)
    emb, head = again.llm.get_input_embeddings().weight, again.llm.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # tied embeddings stay tied


def test_prompt_places_audio_first_last_or_where_written(tokenizer):
    assert speech_prompt(tokenizer, "transcribe") == f"<|user|>{AUDIO_TOKEN}transcribe<|end|><|assistant|>"
    assert speech_prompt(tokenizer, "transcribe", audio_first=False) == f"<|user|>transcribe{AUDIO_TOKEN}<|end|><|assistant|>"
    assert speech_prompt(tokenizer, f"say {AUDIO_TOKEN} again", "x") == tokenizer.apply_chat_template(chat(f"say {AUDIO_TOKEN} again", "x"), tokenize=False)


def test_whisper_encoder_from_a_local_checkpoint_feeds_a_speech_lm(tokenizer, tmp_path):
    "The real-model path offline: a tiny WhisperConfig model saved locally, loaded by id/path like openai/whisper-small."
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    cfg = WhisperConfig(d_model=DIM, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=150, max_target_positions=32, vocab_size=100,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    WhisperModel(cfg).save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=3).save_pretrained(tmp_path)
    enc = load_speech_encoder(str(tmp_path))
    assert isinstance(enc, WhisperSpeechEncoder) and enc.dim == DIM and enc.frame_rate == 50
    wavs = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, np.zeros(8000, np.float32)]
    f = enc.features(wavs)
    assert [len(x) for x in f] == [50, 25] and f[0].shape[1] == DIM
    m = speech_lm(tokenizer, "stack_mlp")
    assert len(speech_reply(m, tokenizer, f, ASR_INSTRUCTION, max_new_tokens=3)) == 2
    with pytest.raises(ValueError, match="3 s"): enc.features([np.zeros(16000 * 4, np.float32)])
    llama_dir = tmp_path / "llama"
    tiny_llm(tokenizer).save_pretrained(llama_dir)
    with pytest.raises(ValueError, match="Whisper"): load_speech_encoder(str(llama_dir))
    with pytest.raises(ValueError, match="wavs"): enc.features([])
    with pytest.raises(ValueError, match=r"wavs\[0\]"): enc.features([np.full(800, np.nan, np.float32)])


def _peft_wrap_warnings():
    "Warnings from wrapping a Llama with peft directly, without quiet_peft_notice."
    import warnings
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(llm, LoraConfig(r=2, target_modules=["q_proj"]))
    return caught


def test_add_lora_keeps_peft_s_own_deprecation_notice_out_of_the_learner_s_output(tokenizer):
    import warnings
    notice = lambda ws: [w for w in ws if "is_gradient_checkpointing" in str(w.message)]
    if not notice(_peft_wrap_warnings()): pytest.skip("this peft no longer raises the notice: quiet_peft_notice can go")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        speech_lm(tokenizer, "stack_mlp").freeze_llm().add_lora(r=4, alpha=8)
    assert not notice(caught)


def test_lora_trains_low_rank_updates_only_and_merges_into_a_plain_llm(tokenizer, tmp_path):
    m = speech_lm(tokenizer, "stack_mlp").freeze_llm().add_lora(r=4, alpha=8)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("adapter.") for n in names) and any("lora_" in n for n in names)
    b = SpeechLMCollator(tokenizer)([dict(features=f, instruction=ASR_INSTRUCTION, target="a red cat") for f in feats([20, 14])])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-2)
    for _ in range(3):
        loss = m(**b).loss; opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad(): before = m(**b).logits
    m.merge_lora()
    assert type(m.llm).__name__ == "LlamaForCausalLM"
    with torch.no_grad(): torch.testing.assert_close(m(**b).logits, before, atol=1e-4, rtol=1e-4)
    m.save_pretrained(tmp_path)
    with torch.no_grad(): torch.testing.assert_close(SpeechLM.from_pretrained(tmp_path).eval()(**b).logits, before, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="target_modules"): speech_lm(tokenizer).add_lora(target_modules=("query_key_value",))


def test_cached_speech_lm_rebuilds_when_the_budget_changes(tokenizer, tmp_path, monkeypatch):
    from speechllm_course.adapters import cached_speech_lm, trained_budget_problem
    monkeypatch.setenv("SPEECHLLM_DATA", str(tmp_path))
    examples = [dict(features=f, instruction="repeat", target=t) for f, t in zip(feats([12, 9, 15, 7]), ["a b", "b", "a", "b a"])]
    make = lambda: speech_lm(tokenizer).freeze_llm()
    kw = dict(lr=1e-2, scale="smoke", progress=False)
    _, info = cached_speech_lm("toy_speech_lm", make, tokenizer, examples, steps=3, batch_size=2, **kw)
    path = tmp_path / "smoke" / "toy_speech_lm"
    assert (info["steps"], info["batch_size"], info["examples"]) == (3, 2, 4)
    assert trained_budget_problem(path, 3, 2, 4) is None
    assert trained_budget_problem(path, 3, 4) == "batch_size 2 != 4"
    built = path.joinpath("manifest.json").stat().st_mtime_ns
    _, again = cached_speech_lm("toy_speech_lm", make, tokenizer, examples, steps=3, batch_size=2, **kw)
    assert path.joinpath("manifest.json").stat().st_mtime_ns == built, "the same budget loads the cached model"
    # the version names the recipe, not the sizes: a cached model trained with another budget must not be returned
    _, other = cached_speech_lm("toy_speech_lm", make, tokenizer, examples, steps=3, batch_size=4, **kw)
    assert other["batch_size"] == 4 and path.joinpath("manifest.json").stat().st_mtime_ns != built
    _, fewer = cached_speech_lm("toy_speech_lm", make, tokenizer, examples[:2], steps=3, batch_size=4, **kw)
    assert fewer["examples"] == 2
    rebuilt = path.joinpath("manifest.json").stat().st_mtime_ns
    _, loaded = cached_speech_lm("toy_speech_lm", make, tokenizer, [], steps=3, batch_size=4, **kw)  # a caller that only loads
    assert loaded["examples"] == 2 and path.joinpath("manifest.json").stat().st_mtime_ns == rebuilt
    with pytest.raises(ValueError, match=r"examples: expected the training examples: the cached toy_speech_lm was trained with another budget \(steps 3 != 5\)"):
        cached_speech_lm("toy_speech_lm", make, tokenizer, [], steps=5, batch_size=4, **kw)


def test_cached_speech_lm_is_the_same_whatever_ran_before_it_and_leaves_the_caller_s_rng_alone(tokenizer, tmp_path, monkeypatch):
    from speechllm_course.adapters import cached_speech_lm
    examples = [dict(features=f, instruction="repeat", target=t) for f, t in zip(feats([12, 9, 15, 7]), ["a b", "b", "a", "b a"])]
    make = lambda: speech_lm(tokenizer).freeze_llm()
    weights = []
    for caller_seed, root in ((1, tmp_path / "first"), (2, tmp_path / "second")):  # two chapters, each building it first after other work
        monkeypatch.setenv("SPEECHLLM_DATA", str(root))
        torch.manual_seed(caller_seed); expected_next = torch.rand(4)
        torch.manual_seed(caller_seed)
        model, _ = cached_speech_lm("toy_speech_lm", make, tokenizer, examples, steps=2, batch_size=2, lr=1e-2, scale="smoke", progress=False)
        assert torch.equal(torch.rand(4), expected_next), "building a model must not move the caller's random stream"
        weights.append(model.adapter.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]: assert torch.equal(weights[0][k], weights[1][k]), k
