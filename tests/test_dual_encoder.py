"Chapter 09b: SALMONN's dual encoder (frame alignment, shapes), the event-kind reader of captions, event scores, bad input."
import numpy as np
import pytest
import torch

from speechllm_course.adapters import SpeechEncoder, SpeechLM
from speechllm_course.audio_tokens import AudioEncoder, AudioEncoderConfig
from speechllm_course.dual_encoder import DualSpeechEncoder, event_scores, events_named
from speechllm_course.world import EVENT_KINDS, caption_events, synth_sound_scene


class FakeSpeechEncoder(SpeechEncoder):
    "50 Hz frames whose first value is the frame index: alignment is visible."
    dim = 6

    def forward(self, wavs):
        n = torch.tensor([len(w) // 320 for w in wavs])
        f = torch.zeros(len(wavs), int(n.max()), self.dim)
        f[..., 0] = torch.arange(int(n.max())).float()
        return f, n


@pytest.fixture(scope="module")
def dual():
    torch.manual_seed(0)
    return DualSpeechEncoder(FakeSpeechEncoder(), AudioEncoder(AudioEncoderConfig(hidden_size=16, num_layers=1, num_heads=2, num_targets=8)))


def test_dual_features_are_frame_aligned_and_concatenated(dual):
    rng = np.random.default_rng(0)
    wavs = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9000, 700)]
    f = dual.features(wavs)
    assert [len(x) for x in f] == [50, 28, 2] and all(x.shape[1] == 6 + 16 for x in f)
    assert torch.equal(f[0][:, 0], torch.arange(50).float())  # the speech half is untouched
    audio = f[0][:, 6:]
    assert torch.equal(audio[0], audio[3]) and not torch.equal(audio[3], audio[4])  # one 80 ms patch spans four 20 ms frames
    alone = dual.features([wavs[1]])[0]
    torch.testing.assert_close(alone, f[1], atol=1e-5, rtol=1e-4)  # batching does not change a clip's frames
    assert dual.dim == 22 and dual.frame_rate == 50


def test_dual_features_feed_a_speech_lm(dual):
    from transformers import LlamaForCausalLM
    from speechllm_course.adapters import REPEAT_PROMPT, speech_reply
    from speechllm_course.lm import render, text_documents, tiny_llama_config, train_text_tokenizer
    tok = train_text_tokenizer([render(d) for d in text_documents(300, seed=0)], vocab_size=200)
    llm = LlamaForCausalLM(tiny_llama_config(tok, hidden=32, layers=1, heads=2, kv_heads=1, max_len=128))
    m = SpeechLM.from_llm(llm, tok, "window_qformer", dual.dim, adapter_kwargs=dict(window=8, queries=2))
    f = dual.features([np.zeros(12000, np.float32) + 0.01, np.zeros(5000, np.float32) + 0.01])
    padded = torch.nn.utils.rnn.pad_sequence(f, batch_first=True)
    out = m.encode_audio(padded, torch.tensor([len(x) for x in f]))
    assert out.lengths.tolist() == [2 * -(-37 // 8), 2 * -(-15 // 8)] and out.embeds.shape[-1] == 32  # 2 queries per 8-frame window
    replies = speech_reply(m, tok, f, REPEAT_PROMPT, max_new_tokens=3)
    assert replies == [speech_reply(m, tok, [x], REPEAT_PROMPT, max_new_tokens=3)[0] for x in f]  # fused frames batch like any others


def test_events_named_reads_every_caption_the_world_writes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        _, events, caption = synth_sound_scene(rng, duration=3.0, max_events=3)
        assert events_named(caption) == {e["label"] for e in events}, caption
    for kind in EVENT_KINDS:
        assert events_named(caption_events([dict(label=kind, onset=0.0, offset=0.5, count=2)], np.random.default_rng(1))) == {kind}
    assert events_named("a rising chirp and a falling chirp") == {"rising chirp", "falling chirp"}
    assert events_named("my horse falls near the blue apple") == set()


def test_event_scores():
    s = event_scores(["a bell rings", "a siren and a buzz", "nothing"], [["bell"], ["siren"], ["tone"]])
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3) and s["exact"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"): event_scores(["a"], [["bell"], ["buzz"]])
    with pytest.raises(ValueError, match="labels"): event_scores([], [])
    with pytest.raises(ValueError, match="text"): events_named(3)


def test_dual_encoder_rejects_bad_audio(dual):
    with pytest.raises(ValueError, match=r"wavs\[0\]"): dual.features([np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="wavs"): dual.features([])


def test_sound_mix_examples_and_loader_bad_input():
    from speechllm_course.adapters import REPEAT_PROMPT
    from speechllm_course.dual_encoder import CAPTION_PROMPT, EVENTS_PROMPT, load_sound_mix_lm, sound_mix_adapter, sound_mix_examples
    f = [torch.zeros(5, 3), torch.zeros(7, 3)]
    ex = sound_mix_examples(f, ["a cat", "two dogs"], f[:1], ["a bell rings, then beeps"], [["beeps", "bell", "bell"]], repeats=2)
    assert [e["instruction"] for e in ex] == [REPEAT_PROMPT] * 2 + [CAPTION_PROMPT, EVENTS_PROMPT] * 2
    assert ex[3]["target"] == "beeps and bell" and ex[0]["target"] == "a cat"
    assert sound_mix_adapter("full")[0] == "window_qformer" and sound_mix_adapter("course")[0] == "stack_mlp"
    with pytest.raises(ValueError, match="asr_texts"): sound_mix_examples(f, ["a cat"], f, ["x", "y"], [[], []])
    with pytest.raises(ValueError, match="event_labels"): sound_mix_examples(f, ["a", "b"], f, ["x", "y"], [[]])
    with pytest.raises(ValueError, match="which"): load_sound_mix_lm("stereo")
