"Chapter 06b: phone recognizer, distilled codec (alignment of teacher crops, gradient path, save/load), level probes' inputs, bad input."
import numpy as np
import pytest
import torch

from speechllm_course.codec import Codec, CodecConfig
from speechllm_course.codec_semantics import (
    COURSE_CODECS, DistilledCodec, DistilledCodecConfig, PhoneRecognizer, PhoneRecognizerConfig, TeacherCrops,
    first_level_output, level_vectors, load_course_codec, train_distilled_codec, with_quantizer_dropout)
from speechllm_course.core import HOP, SAMPLE_RATE
from speechllm_course.supervised_tokens import train_asr

PHONES = ["sil", "a", "s", "m"]


def tiny_recognizer():
    torch.manual_seed(0)
    return PhoneRecognizer(PhoneRecognizerConfig(phones=PHONES, hidden_size=32, num_heads=2, layers_below=1, layers_above=1)).eval()


def tiny_distilled(teacher_dim=6):
    torch.manual_seed(0)
    return DistilledCodec(DistilledCodecConfig(teacher_dim=teacher_dim, channels=4, latent_dim=16,
                                               quantizer=dict(levels=3, codebook_size=16))).eval()


def tone(freq, seconds=0.4):
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---- phone recognizer -------------------------------------------------------------------------------------------
def test_recognizer_config_keeps_its_phones_and_forces_a_continuous_ctc_model():
    cfg = PhoneRecognizerConfig(phones=PHONES, quantize=True, pool=4, vocab_size=99)
    assert cfg.phones == PHONES and cfg.vocab_size == len(PHONES) and not cfg.quantize and cfg.pool == 1


def test_recognizer_learns_to_tell_two_sounds_apart_through_train_asr():
    # 'a' = a low tone, 's' = noise: CTC labels are phone ids, read back as phone names
    rng = np.random.default_rng(0)
    noise = lambda: (0.1 * rng.standard_normal(int(0.4 * SAMPLE_RATE))).astype(np.float32)
    model = tiny_recognizer().train()
    wavs = [np.concatenate([tone(200), noise()]), np.concatenate([noise(), tone(200)])] * 8
    labels = [[1, 2], [2, 1]] * 8
    feats, lengths = model.features(wavs)
    model.feature_mean.copy_(feats.reshape(-1, 80).mean(0)); model.feature_std.copy_(feats.reshape(-1, 80).std(0) + 1e-5)
    examples = [dict(features=f[:n], labels=l) for f, n, l in zip(feats, lengths, labels)]
    hist = train_asr(model, examples, steps=120, batch_size=8, lr=3e-3, progress=False)
    assert hist.losses[-1] < hist.losses[0] / 3
    model.eval()
    assert model.recognize(wavs[:2]) == [["a", "s"], ["s", "a"]]
    assert model.phone_error_rate(wavs[:2], [["sil", "a", "s", "sil"], ["s", "a"]]) == 0.0
    errors, total = model.phone_errors(wavs[:2], [["a", "s", "a"], ["a", "a"]])  # a phone left out; a phone misread
    assert total == 5 and errors.tolist() == [1.0, 1.0]
    assert model.phone_error_rate(wavs[:2], [["a", "s", "a"], ["a", "a"]]) == errors.sum() / total


def test_recognizer_output_types_and_save_load(tmp_path):
    model = tiny_recognizer()
    one = model.recognize(tone(300))
    many = model.recognize([tone(300), tone(500, 0.2)])
    assert isinstance(one, list) and all(p in PHONES[1:] for p in one)
    assert len(many) == 2 and many[0] == one
    model.save_pretrained(tmp_path)
    again = PhoneRecognizer.from_pretrained(tmp_path).eval()
    assert again.config.phones == PHONES and again.recognize(tone(300)) == one


@pytest.mark.parametrize("fn, words", [
    (lambda: PhoneRecognizerConfig(phones=["a", "sil"]), ["phones", "sil"]),
    (lambda: tiny_recognizer().phone_error_rate([tone(200)], []), ["references", "1 phone sequences"]),
    (lambda: tiny_recognizer().phone_error_rate([tone(200)], [["sil"]]), ["references", "non-silence"]),
    (lambda: tiny_recognizer().recognize([]), ["wavs"]),
    (lambda: train_asr(tiny_recognizer(), [dict(features=torch.zeros(10, 80), labels=[0, 1])], steps=1), ["labels", "blank"]),
    (lambda: train_asr(tiny_recognizer(), [dict(features=torch.zeros(10, 80), labels=[4])], steps=1), ["labels", "[1, 4)"]),
    (lambda: train_asr(tiny_recognizer(), [dict(features=torch.zeros(10, 80))], steps=1), ["examples", "labels"]),
])
def test_recognizer_bad_input(fn, words):
    with pytest.raises(ValueError) as e: fn()
    assert all(w in str(e.value) for w in words), str(e.value)


# ---- distillation -----------------------------------------------------------------------------------------------
def test_teacher_crops_keep_audio_and_teacher_frames_aligned():
    # each sample's value is its frame index, each teacher row holds its frame index: a crop must pair them exactly
    frames = 20
    wav = np.repeat(np.arange(frames, dtype=np.float32), HOP)
    teacher = np.repeat(np.arange(frames, dtype=np.float32)[:, None], 3, 1)
    batch = TeacherCrops(6, seed=0)([dict(wav=wav, teacher=teacher)] * 4)
    assert batch["audio"].shape == (4, 6 * HOP) and batch["teacher"].shape == (4, 6, 3) and batch["mask"].all()
    audio_frames = batch["audio"].reshape(4, 6, HOP)
    assert torch.equal(audio_frames[..., 0], batch["teacher"][..., 0])
    assert (audio_frames == audio_frames[..., :1]).all()
    short = TeacherCrops(30)([dict(wav=wav, teacher=teacher)])
    assert int(short["mask"].sum()) == frames and torch.equal(short["teacher"][0, frames:], torch.zeros(10, 3))


def test_first_level_output_matches_the_quantizer_and_routes_gradient_to_the_encoder():
    model = tiny_distilled()
    audio = torch.from_numpy(tone(300)).requires_grad_(False)
    out = model.train()(audio[None], n_levels=1)
    level1 = first_level_output(model, out.latents, out.codes[:, 0])
    assert torch.allclose(level1, model.quantizer.decode(out.codes[:, :1]), atol=1e-5)
    teacher = torch.randn_like(out.semantic)
    model.zero_grad()
    model.distillation_loss(out.semantic, teacher).backward()
    enc = sum(float(p.grad.abs().sum()) for p in model.encoder.parameters() if p.grad is not None)
    dec = [p.grad for p in model.decoder.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert enc > 0 and not dec


def test_distillation_loss_is_zero_for_a_perfect_prediction_and_respects_the_mask():
    model = tiny_distilled(teacher_dim=4)
    model.teacher_mean.fill_(1.0); model.teacher_std.fill_(2.0)
    teacher = torch.randn(2, 5, 4)
    perfect = (teacher - 1.0) / 2.0
    assert float(model.distillation_loss(perfect, teacher)) < 1e-6
    wrong = perfect.clone(); wrong[:, 3:] *= -1
    mask = torch.zeros(2, 5, dtype=torch.bool); mask[:, :3] = True
    assert float(model.distillation_loss(wrong, teacher, mask)) < 1e-6
    assert float(model.distillation_loss(wrong, teacher)) == pytest.approx(2 * 2 / 5, rel=1e-5)


def test_distilled_training_pulls_level_one_towards_the_teacher_and_resumes(tmp_path):
    rng = np.random.default_rng(0)
    wavs = [tone(f, 0.64) for f in (150, 300, 600, 1200)]
    # a teacher feature the audio determines: which of the four tones is playing
    examples = [dict(wav=w, teacher=np.tile(np.eye(4, dtype=np.float32)[i] + 0.01 * rng.standard_normal(4).astype(np.float32),
                                            (len(w) // HOP, 1))) for i, w in enumerate(wavs)]
    model = tiny_distilled(teacher_dim=4).train()
    hist = train_distilled_codec(model, examples, steps=60, batch_size=4, crop_seconds=0.2, lr=3e-3, progress=False,
                                 ckpt_dir=str(tmp_path / "ck"), ckpt_every=30)
    distill = hist.extras["distill"]
    assert distill[-1] < distill[0]
    again = tiny_distilled(teacher_dim=4).train()
    resumed = train_distilled_codec(again, examples, steps=62, batch_size=4, crop_seconds=0.2, lr=3e-3, progress=False,
                                    ckpt_dir=str(tmp_path / "ck"), ckpt_every=30)
    assert resumed.resumed_from == 60


def test_distilled_codec_save_load_round_trip(tmp_path):
    model = tiny_distilled()
    model.teacher_mean.fill_(0.5); model.teacher_std.fill_(3.0)
    with_quantizer_dropout(model, 0.5)
    model.save_pretrained(tmp_path)
    again = DistilledCodec.from_pretrained(tmp_path).eval()
    assert again.config.quantizer["quantizer_dropout"] == 0.5 and again.quantizer.cfg.quantizer_dropout == 0.5
    x = torch.from_numpy(tone(400))
    assert torch.equal(again.encode(x), model.encode(x))
    assert torch.allclose(again.semantic_features(x), model.semantic_features(x))
    assert float(again.teacher_std[0]) == 3.0


def test_level_vectors_add_up_to_the_quantized_latent():
    model = Codec(CodecConfig(channels=4, latent_dim=16, quantizer=dict(levels=3, codebook_size=16))).eval()
    x = tone(300)
    v = level_vectors(model, x)
    codes = model.encode(torch.from_numpy(x))
    assert v.shape == (3, codes.shape[-1], 16)
    assert torch.allclose(v.sum(0), model.quantizer.decode(codes)[0], atol=1e-5)


def test_level_probes_names_a_speaker_missing_from_the_list():
    from speechllm_course.codec_semantics import level_probes
    model = Codec(CodecConfig(channels=4, latent_dim=16, quantizer=dict(levels=2, codebook_size=16))).eval()
    rows = [dict(speaker="spk01"), dict(speaker="spk02")]
    with pytest.raises(ValueError) as e: level_probes(model, rows, rows, n_phones=4, speakers=["spk01"], progress=False)
    assert "speakers" in str(e.value) and "spk02" in str(e.value) and "train_rows" in str(e.value)


def test_level_probes_per_utterance_record_adds_up_to_the_table():
    import io
    import soundfile as sf
    from speechllm_course.codec_semantics import level_probes
    torch.manual_seed(0)
    model = Codec(CodecConfig(channels=4, latent_dim=16, quantizer=dict(levels=2, codebook_size=16))).eval()
    rng = np.random.default_rng(0)

    def row(i):
        buf = io.BytesIO(); sf.write(buf, (0.1 * rng.standard_normal(SAMPLE_RATE // 2)).astype(np.float32), SAMPLE_RATE, format="WAV")
        return dict(audio={"bytes": buf.getvalue()}, frame_phones=list(rng.integers(0, 3, 25 + i)), speaker=f"spk0{i % 2}")
    rows = [row(i) for i in range(6)]
    table, record = level_probes(model, rows, rows[:4], n_phones=3, speakers=["spk00", "spk01"], steps=20, progress=False, per_utterance=True)
    assert record["frames"].shape == (4,) and set(record) == {"frames"} | {(p, l) for p in ("phone", "speaker") for l in (1, 2)}
    for (probe, level), correct in ((k, v) for k, v in record.items() if k != "frames"):
        assert correct.shape == (4,) and (0 <= correct).all() and (correct <= record["frames"]).all()
        assert correct.sum() / record["frames"].sum() == pytest.approx(table.loc[level, probe])
    assert table.equals(level_probes(model, rows, rows[:4], n_phones=3, speakers=["spk00", "spk01"], steps=20, progress=False))


@pytest.mark.parametrize("fn, words", [
    (lambda: load_course_codec("wavtokenizer"), ["kind", "rvq"]),
    (lambda: DistilledCodecConfig(teacher_dim=0), ["teacher_dim"]),
    (lambda: DistilledCodecConfig(distill_weight=-0.1), ["distill_weight"]),
    (lambda: tiny_distilled().distillation_loss(torch.zeros(1, 4, 6), torch.zeros(1, 5, 6)), ["teacher", "(1, 4, 6)"]),
    (lambda: train_distilled_codec(tiny_distilled(), [], steps=1), ["examples", "non-empty"]),
    (lambda: train_distilled_codec(tiny_distilled(), [dict(wav=tone(200), teacher=np.zeros((3, 6), np.float32))], steps=1),
     ["teacher", "one row per 20 ms frame"]),
    (lambda: train_distilled_codec(tiny_distilled(), [dict(wav=tone(200))], steps=1), ["examples[0]", "teacher"]),
    (lambda: TeacherCrops(0), ["frames"]),
])
def test_distillation_bad_input(fn, words):
    with pytest.raises(ValueError) as e: fn()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_course_codec_kinds_are_the_documented_three():
    assert COURSE_CODECS == ("rvq", "single codebook", "distilled")


# ---- the recipe's wiring (module globals, not notebook globals) ---------------------------------------------------
@pytest.mark.parametrize("kind", COURSE_CODECS)
def test_course_codec_configs_build_from_the_module_alone(kind):
    from speechllm_course.codec import CODEC_SIZES
    from speechllm_course.codec_semantics import _codec_config
    cfg = _codec_config(kind, "smoke", teacher_dim=8)
    levels = 1 if kind == "single codebook" else CODEC_SIZES["smoke"].levels
    assert cfg.quantizer_config.levels == levels and cfg.quantizer_config.dead_code_threshold > 0
    assert isinstance(cfg, DistilledCodecConfig) == (kind == "distilled")


def test_teacher_examples_pair_each_waveform_with_one_teacher_row_per_frame():
    from transformers import HubertModel
    from speechllm_course.codec_semantics import teacher_examples
    from speechllm_course.ssl import hubert_config
    torch.manual_seed(0)
    teacher = HubertModel(hubert_config(32, 1, 2, 16, 10, 16)).eval()
    wavs = [tone(200, 0.3), tone(400, 0.5)]
    examples, mean, std = teacher_examples(wavs, teacher, layer=1, progress=False)
    assert [e["teacher"].shape for e in examples] == [(len(w) // HOP, 32) for w in wavs]
    assert mean.shape == std.shape == (32,) and (std > 0).all()


def test_listening_grid_has_one_player_per_clip_and_rejects_a_clip_that_is_not_one_waveform():
    from speechllm_course.codec_semantics import listen_side_by_side
    grid = listen_side_by_side({"a": tone(220), "b": tone(330), "c": list(tone(440))}, columns=2)
    assert len(grid.children) == 3 and "repeat(2," in grid.layout.grid_template_columns
    # chapter 07 once passed eight utterances where one was meant: the error used to be drawn inside a widget, unseen
    with pytest.raises(ValueError, match=r"clips\['codec'\].*1-D waveform.*list of 2 parts of unequal length"):
        listen_side_by_side({"original": tone(220), "codec": [tone(220), tone(220, 0.3)]})
    with pytest.raises(ValueError, match=r"clips\['codec'\].*shape \(2, 6400\)"):
        listen_side_by_side({"codec": np.stack([tone(220), tone(330)])})
    with pytest.raises(ValueError, match="clips: expected a non-empty mapping"):
        listen_side_by_side({})
    with pytest.raises(ValueError, match="columns: expected a positive int"):
        listen_side_by_side({"a": tone(220)}, columns=0)


def test_the_explorer_redraws_the_chosen_item_and_checks_its_arguments(capsys):
    from speechllm_course.codec_semantics import listen_and_explore
    asked = []
    def clips_of(i):
        asked.append(i)
        return {"original": tone(200 + 50 * i), "codec": tone(200 + 50 * i, 0.3)}
    explorer = listen_and_explore(clips_of, 4, name="clip")
    shown = capsys.readouterr().out  # outside a notebook display() prints each player's repr
    assert shown.index("original") < shown.index("Audio object") < shown.index("codec") < shown.index("IntSlider")
    slider, grid = explorer.children
    assert (slider.description, slider.min, slider.max, slider.value) == ("clip", 0, 3, 0)
    assert asked == [0]  # item 0 once, for the plain players; the grid waits for the slider
    slider.value = 3
    assert asked == [0, 3]
    with pytest.raises(ValueError, match="count: expected a positive int"):
        listen_and_explore(clips_of, 0)
    with pytest.raises(ValueError, match=r"clips\['codec'\]"):
        listen_and_explore(lambda i: {"codec": [tone(200), tone(200, 0.2)]}, 2)
