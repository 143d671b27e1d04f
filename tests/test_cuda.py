"CUDA checks for chapters 03-14 (`pytest -m cuda`): skipped cleanly on machines without a GPU."
import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speechllm_course.core import HOP

sys.path.insert(0, str(Path(__file__).parent))
from full_scale import FULL_SCALE_BUDGET_GIB, all_cases, measure, record  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_kmeans_on_gpu_matches_cpu():
    from speechllm_course.units import KMeans
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 64, generator=g) + 4 * torch.randn(50, 64, generator=g)[torch.randint(50, (20_000,), generator=g)]
    cpu = KMeans(50, 64).fit(x, seed=0, max_iter=30)
    gpu = KMeans(50, 64).to("cuda").fit(x.cuda(), seed=0, max_iter=30)
    assert gpu.centroids.device.type == "cuda"
    assert abs(gpu.score(x.cuda()) - cpu.score(x)) / cpu.score(x) < 0.02
    assert (gpu.predict(x.cuda()).cpu() == cpu.predict(x)).float().mean() > 0.95


def test_hubert_step_under_bf16_autocast():
    from speechllm_course.ssl import HubertForMaskedPrediction, MaskedPredictionCollator, hubert_config
    torch.manual_seed(0)
    model = HubertForMaskedPrediction(hubert_config(64, 2, 4, 16, 20, 16)).cuda().train()
    rng = np.random.default_rng(0)
    ex = [dict(wav=(0.1 * rng.standard_normal(HOP * 60)).astype(np.float32), units=rng.integers(0, 20, 60)) for _ in range(4)]
    batch = {k: v.cuda() for k, v in MaskedPredictionCollator(model.config, 50)(ex).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad and p.grad is not None)


def test_cpc_step_under_bf16_autocast():
    from speechllm_course.probing import CPCConfig, CPCModel, CropCollator
    torch.manual_seed(0)
    model = CPCModel(CPCConfig(conv_dim=32, hidden_size=32, context_size=32)).cuda().train()
    wavs = [np.random.default_rng(i).standard_normal(HOP * 80).astype(np.float32) * 0.1 for i in range(4)]
    batch = CropCollator(model, 60)(wavs)["input_values"].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.frames(torch.randn(16000)).shape == (50, 32)  # frames() moves input to the model's device


def _finite_grads(model) -> bool:
    return all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_codec_and_rvq_step_under_bf16_autocast():
    from speechllm_course.codec import Codec, CodecConfig, MultiScaleMelLoss
    torch.manual_seed(0)
    model = Codec(CodecConfig(channels=8, quantizer=dict(levels=4, codebook_size=64, kmeans_init=True, dead_code_threshold=0.1,
                                                         code_dim=8, l2_normalize=True, quantizer_dropout=0.5))).cuda().train()
    audio = 0.1 * torch.randn(4, HOP * 20, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(audio)
        loss = MultiScaleMelLoss().cuda()(out.audio.float(), audio) + out.vq_loss
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(model)
    assert out.codes.shape == (4, 4, 20) and int(out.codes.max()) < 64


def test_distilled_codec_and_audio_encoder_steps_on_gpu():
    from speechllm_course.audio_tokens import AudioEncoder, AudioEncoderConfig, random_patch_mask
    from speechllm_course.codec_semantics import DistilledCodec, DistilledCodecConfig
    torch.manual_seed(0)
    codec = DistilledCodec(DistilledCodecConfig(teacher_dim=16, channels=8, quantizer=dict(levels=2, codebook_size=32))).cuda().train()
    audio = 0.1 * torch.randn(2, HOP * 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = codec(audio)
        loss = out.vq_loss + codec.distillation_loss(out.semantic.float(), torch.randn(2, 16, 16, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(codec)
    enc = AudioEncoder(AudioEncoderConfig(hidden_size=32, num_layers=1, num_targets=16)).cuda().train()
    patches, mask = torch.randn(2, 10, enc.config.patch_dim, device="cuda"), torch.ones(2, 10, dtype=torch.bool, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res = enc(patches, mask, random_patch_mask(mask.cpu(), 0.6, torch.Generator().manual_seed(0)).cuda(), torch.randint(0, 16, (2, 10), device="cuda"))
    res["loss"].backward()
    assert torch.isfinite(res["loss"]) and _finite_grads(enc)


def test_unit_to_mel_flow_and_speaker_encoder_on_gpu():
    from speechllm_course.resynth import SpeakerEncoder, SpeakerEncoderConfig, UnitToMel, UnitToMelConfig
    torch.manual_seed(0)
    dec = UnitToMel(UnitToMelConfig(num_units=20, speaker_dim=8, hidden_size=32, num_heads=2, num_layers=2)).cuda().train()
    units, mels = torch.randint(0, 20, (3, 40), device="cuda"), torch.randn(3, 40, 80, device="cuda")
    mask, spk = torch.ones(3, 40, dtype=torch.bool, device="cuda"), torch.randn(3, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = dec(units, mels, mask, spk)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and _finite_grads(dec)
    gen = dec.generate(units.cpu(), spk.cpu(), steps=4, generator=torch.Generator().manual_seed(0))
    cpu = UnitToMel(dec.config); cpu.load_state_dict({k: v.cpu() for k, v in dec.state_dict().items()})
    ref = cpu.generate(units.cpu(), spk.cpu(), steps=4, generator=torch.Generator().manual_seed(0))
    assert gen.device.type == "cpu" and torch.allclose(gen, ref, atol=1e-3)  # same noise, same flow on either device
    enc = SpeakerEncoder(SpeakerEncoderConfig(hidden_size=16, embedding_dim=8, num_speakers=3)).cuda()
    e = enc.embed([np.random.default_rng(i).standard_normal(HOP * 30).astype(np.float32) * 0.1 for i in range(3)])
    assert e.shape == (3, 8) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-4)


def _tiny_speech_lm(adapter, dim=24):
    from transformers import LlamaForCausalLM
    from speechllm_course.adapters import SpeechLM
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=0)], vocab_size=200)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128))
    return SpeechLM.from_llm(llm, tok, adapter, dim), tok


@pytest.mark.parametrize("adapter", ["stack_mlp", "conv_transformer", "ctc_compress", "window_qformer", "alignformer"])
def test_speech_lm_step_under_bf16_autocast_and_generation_on_gpu(adapter):
    "Chapter 09: adapter + frozen LLM forward/backward under bf16 autocast; fp32 logits on GPU match the CPU's; generation runs on GPU."
    from speechllm_course.adapters import ASR_INSTRUCTION, SpeechLMCollator, speech_reply
    m, tok = _tiny_speech_lm(adapter)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, 24, generator=g) for n in (40, 27, 33)]
    ex = [dict(features=f, instruction=ASR_INSTRUCTION, target="a red cat") for f in feats]
    batch = SpeechLMCollator(tok, ctc=getattr(m.adapter, "uses_ctc", False))(ex)
    with torch.no_grad(): cpu_logits = m.eval()(**batch).logits
    m = m.cuda().freeze_llm()
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad(): gpu_logits = m.eval()(**batch).logits.cpu()
    assert (gpu_logits - cpu_logits).abs().max() < 1e-2
    m.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = m(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in m.llm.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.adapter.parameters())
    replies = speech_reply(m.eval(), tok, feats, ASR_INSTRUCTION, max_new_tokens=5)
    assert len(replies) == 3 and all(isinstance(r, str) for r in replies)


@pytest.mark.parametrize("objective", ["asr", "implicit", "explicit"])
def test_alignment_recipes_train_on_gpu(objective):
    "Chapter 10: each alignment recipe trains a token-CTC SpeechLM on the GPU through core.train (bf16 autocast); the LLM stays frozen."
    from speechllm_course.alignment import token_ctc_speech_lm, train_alignment
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    from transformers import LlamaForCausalLM
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=0)], vocab_size=200)
    torch.manual_seed(0)
    # placed on the GPU first: train() hands a model back on the device it came on
    m = token_ctc_speech_lm(LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128)), tok, 24).cuda()
    g = torch.Generator().manual_seed(0)
    ex = [dict(features=torch.randn(n, 24, generator=g), transcript=t, prompt="repeat after me: {}", reply=t)
          for n, t in zip((60, 44, 52, 70), ["the red cat sleeps", "two dogs run", "my horse eats", "the old bird has my lemon"])]
    frozen = {k: v.clone() for k, v in m.llm.state_dict().items()}
    hist = train_alignment(m, tok, ex, objective, steps=4, batch_size=4, progress=False, log_every=1)
    assert next(m.adapter.parameters()).is_cuda and all(np.isfinite(hist.losses))
    assert all(torch.equal(v.cpu(), m.llm.state_dict()[k].cpu()) for k, v in frozen.items())


@pytest.mark.parametrize("scheme", ["chain_of_modality", "streaming_thoughts", "parallel_2streams", "text_driven"])
def test_generation_schemes_train_and_answer_on_gpu(scheme):
    "Chapter 11: each scheme's model trains through core.train on the GPU and answers a spoken question there (KV-cache decoding)."
    from speechllm_course.generation import (GENERATION_SIZES, CTCUnitDecoder, ParallelSpeechLM, answer_prompt_ids, generate_sequence,
                                             prompt_embeds, scheme_target, split_output, train_scheme)
    from speechllm_course.interleaving import add_speech_tokens
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    from transformers import LlamaForCausalLM
    K, sizes = 12, GENERATION_SIZES["smoke"]
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=0)], vocab_size=200)
    vocab = add_speech_tokens(tok, K)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=256))
    add_speech_tokens(tok, K, llm)
    llm.cuda()  # placed on the GPU first: train() hands a model back on the device it came on
    prompt, g = answer_prompt_ids(tok), torch.Generator().manual_seed(0)
    audio = [torch.randn(n, 32, generator=g) for n in (5, 9, 7, 6)]
    answers = [("what is two plus two", "two plus two is four"), ("is one less than two", "yes, one is less than two")] * 2
    units = [np.arange(i, i + 40) % K for i in range(4)]  # streaming_thoughts needs a full speech chunk after each text chunk
    if scheme == "text_driven":
        model = CTCUnitDecoder(32, K, upsample=25).cuda()
        ex = [dict(hidden=torch.randn(6, 32, generator=g), units=u) for u in units]
        hist = train_scheme(model, scheme, ex, prompt, tok.pad_token_id, steps=4, batch_size=4, progress=False, log_every=1)
        assert next(model.parameters()).is_cuda and len(model.decode(torch.randn(6, 32).cuda())) >= 0
    elif scheme.startswith("parallel"):
        model = ParallelSpeechLM(llm, K, n_streams=2).cuda()
        ex = []
        for a, (q, t), u in zip(audio, answers, units):
            text, speech = model.streams(tok(t, add_special_tokens=False)["input_ids"], u, vocab.end_id, tok.pad_token_id, 2)
            ex.append(dict(audio=a, text=text, speech=speech))
        hist = train_scheme(model, scheme, ex, prompt, tok.pad_token_id, steps=4, batch_size=4, progress=False, log_every=1)
        out = model.generate([prompt_embeds(model.llm, *prompt, a.cuda()) for a in audio[:2]], vocab.mask("text", len(tok)), vocab.end_id,
                             tok.pad_token_id, 20, 16)
        assert next(model.parameters()).is_cuda and len(out) == 2
    else:
        ex = [dict(audio=a, target=scheme_target(vocab, scheme, q, t, u)) for a, (q, t), u in zip(audio, answers, units)]
        hist = train_scheme(llm, scheme, ex, prompt, tok.pad_token_id, steps=4, batch_size=4, progress=False, log_every=1)
        out = generate_sequence(llm, vocab, scheme, [a.cuda() for a in audio[:2]], prompt, sizes)
        assert next(llm.parameters()).is_cuda and all(len(split_output(vocab, scheme, o)["units"]) <= sizes.max_units for o in out)
    assert all(np.isfinite(hist.losses))


def test_rq_transformer_step_under_bf16_autocast_and_generation_on_gpu():
    "Chapter 11's RQ-Transformer: a bf16-autocast training step and frame-by-frame generation on the GPU."
    from speechllm_course.generation import RQTransformer, RQTransformerConfig
    torch.manual_seed(0)
    m = RQTransformer(RQTransformerConfig(n_units=20, levels=4, codebook_size=32, hidden_size=64, max_frames=128)).cuda()
    units, codes = torch.randint(0, 20, (3, 50)).cuda(), torch.randint(0, 32, (3, 4, 50)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16): loss = m(units, codes).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters() if p.requires_grad)
    out = m.generate(units[0])
    assert out.shape == (4, 50) and out.is_cuda


def test_full_duplex_listens_on_gpu():
    "Chapter 11's full-duplex miniature: the user's stream is fed step by step on the GPU and one system token comes back per step."
    from speechllm_course.generation import ParallelSpeechLM, duplex_listen, prompt_embeds
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    from transformers import LlamaForCausalLM
    K = 12
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=0)], vocab_size=200)
    torch.manual_seed(0)
    model = ParallelSpeechLM(LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=256)), K + 1, n_streams=2).cuda()
    start = prompt_embeds(model.llm, [tok.bos_token_id], [], torch.zeros(0, 32, device="cuda"))
    said = duplex_listen(model, start, np.r_[np.arange(20) % K, [K] * 10], K)
    assert said.shape == (30,) and said.min() >= 0 and said.max() <= K


def test_dpo_and_grpo_steps_on_gpu():
    "Chapter 13: a DPO and a GRPO step (sampling on the GPU) on a LoRA policy whose reference is the same model with LoRA off."
    from speechllm_course.lm import AUDIO_TOKEN
    from speechllm_course.preference import GRPOObjective, preference_policy, train_dpo, train_grpo
    m, tok = _tiny_speech_lm("stack_mlp")
    policy = preference_policy(m.cuda(), r=4)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, 24, generator=g) for n in (40, 27, 33, 30)]
    pairs = [dict(prompt=AUDIO_TOKEN, chosen=c, rejected=r, features=f) for (c, r), f in zip([("five", "six"), ("yes", "no")] * 2, feats)]
    hist = train_dpo(policy, tok, pairs, steps=3, batch_size=2, lr=1e-2, beta=0.5, progress=False, warmup=0)
    assert np.isfinite(hist.losses).all() and next(p for p in policy.parameters() if p.requires_grad).device.type == "cuda"
    questions = [dict(prompt=AUDIO_TOKEN, answer=a, features=f) for a, f in zip(["five", "yes", "two", "nine"], feats)]
    objective = GRPOObjective(tok, reward_fn=lambda reply, answer: float(len(reply) % 2), group_size=4, max_new_tokens=6)
    hist = train_grpo(policy, tok, questions, steps=2, batch_size=2, lr=1e-2, objective=objective, progress=False, warmup=0)
    assert np.isfinite(hist.losses).all() and "reward" in hist.extras


def test_capstone_stage_2_and_the_assistant_on_gpu(tmp_path):
    "Chapter 14: instruction tuning (frozen LLM, token-CTC adapter) steps on the GPU, then a Whisper-encoder assistant answering there."
    from transformers import LlamaForCausalLM, WhisperConfig, WhisperFeatureExtractor, WhisperModel
    from speechllm_course.adapters import WhisperSpeechEncoder
    from speechllm_course.alignment import token_ctc_speech_lm
    from speechllm_course.capstone import SPOKEN_PROMPT, SpokenAssistant, instruction_tune
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=1)], vocab_size=300)
    cfg = WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                        decoder_ffn_dim=128, num_mel_bins=80, vocab_size=64, max_target_positions=32, max_source_positions=150,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(cfg).save_pretrained(tmp_path)
    WhisperFeatureExtractor(feature_size=80, chunk_length=3).save_pretrained(tmp_path)
    encoder = WhisperSpeechEncoder.from_pretrained(str(tmp_path)).cuda()
    torch.manual_seed(0)
    model = token_ctc_speech_lm(LlamaForCausalLM(tiny_llama_config(tok, hidden=64, layers=1, heads=2, kv_heads=1)), tok, encoder.dim).cuda()
    rng = np.random.default_rng(0)
    wavs = [(0.1 * rng.standard_normal(16000 + 4000 * i)).astype(np.float32) for i in range(4)]
    feats = encoder.features(wavs)
    examples = [dict(features=f, transcript=t, instruction=SPOKEN_PROMPT, target=r)
                for f, (t, r) in zip(feats, [("what is the plural of cat", "cats"), ("repeat after me: a dog", "a dog")] * 2)]
    hist = instruction_tune(model, tok, examples, steps=3, batch_size=2, lr=1e-2, progress=False, log_every=1)
    assert np.isfinite(hist.losses).all() and not any(p.requires_grad for p in model.llm.parameters())
    assistant = SpokenAssistant(encoder, model, tok, str(tmp_path), "smoke")
    replies = assistant(wavs[:2], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies) and model.device.type == "cuda"


@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_full_scale_training_fits_in_one_24gb_gpu(case):
    "Each chapter's model at its `full` configuration trains through the chapter's own train function, with a finite loss and peak memory under the budget."
    row = measure(case, timed_steps=int(os.environ.get("SPEECHLLM_FULL_SCALE_STEPS", 4)))
    record(row)
    gc.collect(); torch.cuda.empty_cache()
    assert row["finite"], row
    assert row["peak_gib"] < FULL_SCALE_BUDGET_GIB, f"{case.id}: peak {row['peak_gib']:.1f} GiB over the {FULL_SCALE_BUDGET_GIB} GiB budget"
