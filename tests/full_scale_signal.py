"""`full`-scale cases of the speech-signal chapters (03-07): SSL encoders, codecs, tokenizers, ASR and unit-to-speech models.

Each case builds one model as its chapter's build function (or notebook) does from the chapter's `*_SIZES["full"]`, and
returns `train_for(steps)`, which calls the chapter's own train function on synthetic inputs shaped like the full
recipe's batches: white noise at 16 kHz, random unit and code ids, random log-mels, random transcripts. No corpus is
read, so the cases run on a bare GPU machine. `full_scale.py` describes the contract and how the cases are measured.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from full_scale import FullScaleCase
from speechllm_course.core import HOP, SAMPLE_RATE

# SpeechWorld's ASR utterances (measured on the course world; the full world draws more of them from the same grammar
# and voices): mean 1.56 s, longest 3.8 s, about 25 characters and 17 phones. Trainers that bucket by length see
# batches of about the mean length; trainers that pad a random batch to its longest utterance see about 2.7 s.
MEAN_UTTERANCE_S = 1.6
PADDED_BATCH_S = 2.7
MEAN_TRANSCRIPT_CHARS = 25
MEAN_PHONES = 17
N_PHONES = 92  # SpeechWorld's phone inventory, 'sil' included (world.phones)
SEED = 0


def _noise(n: int, seconds: float, rng: np.random.Generator) -> list[np.ndarray]:
    "n waveforms of white noise, RMS 0.1 (about SpeechWorld's speech level), float32 at 16 kHz."
    return [(0.1 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32) for _ in range(n)]


def _frames(seconds: float) -> int: return int(seconds * SAMPLE_RATE) // HOP


def _history(result):
    "The TrainHistory of a train function that returns (model, history)."
    return result[1] if isinstance(result, tuple) else result


# -- 03 probing: CPC ----------------------------------------------------------------------------------------------
def _cpc():
    from speechllm_course.probing import CPC_SIZES, CPCConfig, train_cpc
    s = CPC_SIZES["full"]
    cfg = CPCConfig(conv_dim=s.conv_dim, hidden_size=s.hidden_size, context_size=s.hidden_size)  # as load_cpc
    wavs = _noise(2 * s.batch_size, s.max_frames * HOP / SAMPLE_RATE, np.random.default_rng(SEED))
    return lambda steps: _history(train_cpc(wavs, cfg, steps, s.batch_size, s.max_frames, s.lr, progress=False))


# -- 04 ssl: HuBERT -----------------------------------------------------------------------------------------------
def _hubert():
    from speechllm_course.ssl import HUBERT_SIZES, HubertForMaskedPrediction, hubert_config, pretrain
    s = HUBERT_SIZES["full"]
    K = s.clusters[1]  # iteration 2's targets: the larger head of the two runs
    torch.manual_seed(SEED)
    model = HubertForMaskedPrediction(hubert_config(s.hidden, s.layers, 4, s.conv_dim, K, s.final_dim,
                                                    pred_nomask_weight=s.unmasked_weight))  # as build_hubert
    rng = np.random.default_rng(SEED)
    # utterances of exactly max_frames, so the collator's crop (the batch's shortest utterance, at most max_frames) is max_frames
    examples = [dict(wav=w, units=rng.integers(0, K, len(w) // HOP)) for w in _noise(2 * s.batch_size, s.max_frames * HOP / SAMPLE_RATE, rng)]
    return lambda steps: pretrain(model, examples, steps, s.batch_size, s.max_frames, s.lr, progress=False)


# -- 05b supervised tokens: streaming CTC ASR and its quantized tokenizer ----------------------------------------
def _asr_examples(n: int, rng: np.random.Generator) -> list[dict]:
    "Log-mel-shaped features of mean-length utterances with random transcripts over the ASR alphabet."
    from speechllm_course.supervised_tokens import CHARS
    return [dict(features=torch.randn(_frames(MEAN_UTTERANCE_S), 80), text="".join(rng.choice(list(CHARS), MEAN_TRANSCRIPT_CHARS)))
            for _ in range(n)]


def _continuous_asr():
    from speechllm_course.supervised_tokens import TOKENIZER_SIZES, SupervisedTokenizer, SupervisedTokenizerConfig
    s = TOKENIZER_SIZES["full"]
    torch.manual_seed(SEED)
    return SupervisedTokenizer(SupervisedTokenizerConfig(hidden_size=s.hidden, num_heads=s.heads, layers_below=s.layers_below,
                                                         layers_above=s.layers_above, pool=1, quantize=False))  # as build_asr


def _asr():
    from speechllm_course.supervised_tokens import TOKENIZER_SIZES, train_asr
    s = TOKENIZER_SIZES["full"]
    model, examples = _continuous_asr(), _asr_examples(2 * s.batch_size, np.random.default_rng(SEED))
    return lambda steps: train_asr(model, examples, steps, s.batch_size, s.lr, SEED, False, "continuous ASR")


def _token_asr():
    from speechllm_course.supervised_tokens import TOKEN_RATES, TOKENIZER_SIZES, train_asr, with_quantizer
    s = TOKENIZER_SIZES["full"]
    model = with_quantizer(_continuous_asr(), TOKEN_RATES[12.5], s.codebook_size)  # as build_tokenizer, 12.5 Hz
    examples = _asr_examples(2 * s.batch_size, np.random.default_rng(SEED))
    return lambda steps: train_asr(model, examples, steps, s.batch_size, s.lr / 2, SEED, False, "tokenizer 12.5 Hz")


# -- 06 codec and 06b codec semantics ----------------------------------------------------------------------------
def _codec():
    from speechllm_course.codec import CODEC_SIZES, COLLAPSE_VARIANTS, Codec, CodecConfig, train_codec
    s = CODEC_SIZES["full"]
    torch.manual_seed(SEED)
    model = Codec(CodecConfig(channels=s.channels, quantizer=dict(levels=s.levels, codebook_size=s.codebook_size,
                                                                   **COLLAPSE_VARIANTS["all fixes"])))  # as the notebook
    wavs = _noise(2 * s.batch_size, MEAN_UTTERANCE_S, np.random.default_rng(SEED))
    return lambda steps: train_codec(model, wavs, steps, s.batch_size, s.crop_seconds, progress=False)


def _course_codec(kind: str):
    "One of chapter 06b's course codecs ('rvq' or 'single codebook'), phase 1 (no quantizer dropout)."
    def make():
        from speechllm_course.codec import CODEC_SIZES, Codec, train_codec
        from speechllm_course.codec_semantics import _codec_config
        c = CODEC_SIZES["full"]
        torch.manual_seed(SEED)
        model = Codec(_codec_config(kind, "full"))  # as build_course_codec
        wavs = _noise(2 * c.batch_size, MEAN_UTTERANCE_S, np.random.default_rng(SEED))
        return lambda steps: train_codec(model, wavs, steps, c.batch_size, c.crop_seconds, progress=False)
    return make


def _distilled_codec():
    from speechllm_course.codec import CODEC_SIZES
    from speechllm_course.codec_semantics import DistilledCodec, _codec_config, train_distilled_codec
    from speechllm_course.ssl import HUBERT_SIZES
    c = CODEC_SIZES["full"]
    teacher_dim = HUBERT_SIZES["full"].hidden  # the teacher is the full HuBERT's target layer
    rng = np.random.default_rng(SEED)
    examples = [dict(wav=w, teacher=rng.standard_normal((len(w) // HOP, teacher_dim)).astype(np.float32))
                for w in _noise(2 * c.batch_size, MEAN_UTTERANCE_S, rng)]
    allt = torch.from_numpy(np.concatenate([e["teacher"] for e in examples]))
    torch.manual_seed(SEED)
    model = DistilledCodec(_codec_config("distilled", "full", teacher_dim=teacher_dim))  # as build_course_codec
    model.teacher_mean.copy_(allt.mean(0)); model.teacher_std.copy_(allt.std(0) + 1e-5)
    return lambda steps: train_distilled_codec(model, examples, steps, c.batch_size, c.crop_seconds, seed=SEED, progress=False)


def _phone_recognizer():
    from speechllm_course.codec_semantics import SEMANTIC_CODEC_SIZES, PhoneRecognizer, PhoneRecognizerConfig
    from speechllm_course.supervised_tokens import train_asr
    s = SEMANTIC_CODEC_SIZES["full"]
    phones = ["sil"] + [f"phone{i}" for i in range(1, N_PHONES)]
    batch_size, lr = 16, 2e-3  # build_phone_recognizer passes these at every scale
    rng = np.random.default_rng(SEED)
    examples = [dict(features=torch.randn(_frames(MEAN_UTTERANCE_S), 80), labels=rng.integers(1, N_PHONES, MEAN_PHONES).tolist())
                for _ in range(2 * batch_size)]
    torch.manual_seed(SEED)
    model = PhoneRecognizer(PhoneRecognizerConfig(phones=phones, hidden_size=s.recognizer_hidden, num_heads=4,
                                                  layers_below=s.recognizer_layers, layers_above=1))  # as build_phone_recognizer
    return lambda steps: train_asr(model, examples, steps, batch_size, lr, SEED, False, "phone recognizer")


# -- 06c audio tokens: BEATs-style encoder and tokenizer ---------------------------------------------------------
CLIP_S = 2.1  # the longest event clips (1.8 s siren + 0.3 s of padding) and the 2 s scenes: what a padded batch reaches


def _clip_patches(n: int) -> list[torch.Tensor]:
    from speechllm_course.audio_tokens import log_mel_patches
    return [log_mel_patches(w) for w in _noise(n, CLIP_S, np.random.default_rng(SEED))]


def _audio_encoder():
    from speechllm_course.audio_tokens import AUDIO_TOKEN_SIZES, AudioEncoder, AudioEncoderConfig, train_audio_encoder
    s = AUDIO_TOKEN_SIZES["full"]
    patches = _clip_patches(2 * s.batch_size)
    targets = [torch.randint(0, s.codebook_size, (len(p),)) for p in patches]
    torch.manual_seed(SEED)
    encoder = AudioEncoder(AudioEncoderConfig(hidden_size=s.hidden, num_layers=s.layers, num_targets=s.codebook_size)).fit_normalisation(patches)
    return lambda steps: train_audio_encoder(encoder, patches, targets, steps, s.batch_size, seed=SEED, progress=False)


def _audio_tokenizer():
    from speechllm_course.audio_tokens import AUDIO_TOKEN_SIZES, AudioTokenizer, AudioTokenizerConfig, train_audio_tokenizer
    s = AUDIO_TOKEN_SIZES["full"]
    patches = _clip_patches(2 * s.batch_size)
    teacher = [torch.randn(len(p), s.hidden) for p in patches]
    torch.manual_seed(SEED)
    tokenizer = AudioTokenizer(AudioTokenizerConfig(hidden_size=s.hidden, codebook_size=s.codebook_size, teacher_dim=s.hidden)).fit_normalisation(patches)
    return lambda steps: train_audio_tokenizer(tokenizer, patches, teacher, steps, s.batch_size, seed=SEED, progress=False)


# -- 07 resynth: speaker encoder, unit-to-mel flow, unit LMs -----------------------------------------------------
def _speaker_encoder():
    from speechllm_course.resynth import RESYNTH_SIZES, SpeakerEncoder, SpeakerEncoderConfig, train_speaker_encoder
    from speechllm_course.world import N_HELDOUT_SPEAKERS, N_SPEAKERS
    s = RESYNTH_SIZES["full"]
    n_speakers, batch_size = N_SPEAKERS - N_HELDOUT_SPEAKERS, 32  # train_speaker_encoder's default batch, as the build uses it
    mels = [torch.randn(_frames(PADDED_BATCH_S), 80) for _ in range(2 * batch_size)]
    speakers = [i % n_speakers for i in range(len(mels))]
    torch.manual_seed(SEED)
    enc = SpeakerEncoder(SpeakerEncoderConfig(hidden_size=s.speaker_hidden, num_speakers=n_speakers)).fit_normalisation(mels)
    return lambda steps: train_speaker_encoder(enc, mels, speakers, steps, seed=SEED, progress=False)


def _unit_to_mel():
    from speechllm_course.resynth import RESYNTH_SIZES, SpeakerEncoderConfig, UnitToMel, UnitToMelConfig, train_unit_to_mel
    s = RESYNTH_SIZES["full"]
    n = 2 * s.batch_size
    units = [torch.randint(0, s.units, (_frames(PADDED_BATCH_S),)) for _ in range(n)]
    mels = [torch.randn(len(u), 80) for u in units]
    speaker_dim = SpeakerEncoderConfig().embedding_dim  # the build's speaker encoder keeps the default embedding size
    voices = [torch.nn.functional.normalize(torch.randn(speaker_dim), dim=-1) for _ in range(n)]
    torch.manual_seed(SEED)
    decoder = UnitToMel(UnitToMelConfig(num_units=s.units, speaker_dim=speaker_dim, hidden_size=s.decoder_hidden,
                                        num_layers=s.decoder_layers)).fit_normalisation(mels)  # as build_unit_to_speech
    return lambda steps: train_unit_to_mel(decoder, units, mels, voices, steps, batch_size=s.batch_size, seed=SEED, progress=False)


def _unit_lm(acoustic: bool):
    "Chapter 07's babbling LM over HuBERT units, or over interleaved codec codes (acoustic_levels RVQ levels)."
    def make():
        from speechllm_course.codec import CODEC_SIZES
        from speechllm_course.resynth import RESYNTH_SIZES
        from speechllm_course.units import train_unit_lm
        s = RESYNTH_SIZES["full"]
        per_frame = s.acoustic_levels if acoustic else 1
        vocab = s.acoustic_levels * CODEC_SIZES["full"].codebook_size if acoustic else s.units
        length = per_frame * _frames(PADDED_BATCH_S)
        seqs = [torch.randint(0, vocab, (length,)).tolist() for _ in range(2 * s.lm.batch_size)]
        # the notebook widens the acoustic LM's context to its longest sequence
        cfg = dataclasses.replace(s.lm, max_len=max(s.lm.max_len, 2 + length)) if acoustic else s.lm
        return lambda steps: _history(train_unit_lm(seqs, vocab, dataclasses.replace(cfg, steps=steps), seed=SEED, progress=False))
    return make


def _cases() -> list[FullScaleCase]:
    from speechllm_course.audio_tokens import AUDIO_TOKEN_SIZES
    from speechllm_course.codec import CODEC_SIZES, COLLAPSE_VARIANTS
    from speechllm_course.codec_semantics import SEMANTIC_CODEC_SIZES
    from speechllm_course.probing import CPC_SIZES
    from speechllm_course.resynth import RESYNTH_SIZES
    from speechllm_course.ssl import HUBERT_SIZES
    from speechllm_course.supervised_tokens import TOKEN_RATES, TOKENIZER_SIZES
    codec, sem, res = CODEC_SIZES["full"], SEMANTIC_CODEC_SIZES["full"], RESYNTH_SIZES["full"]
    course_codec_steps = sem.steps + max(1, sem.steps // 2)  # phase 1, then quantizer dropout for half as many steps
    phases_note = "the phase-1 config stands for the quantizer-dropout phase too (same size)"
    kmeans_note = "the first step also initialises the codebooks from its batch (k-means)"
    crops_note = ("utterances of max_frames; the recipe crops each batch to its shortest utterance (about 0.8 s of SpeechWorld "
                  "speech at this batch size), so max_frames is rarely reached and this step is an upper bound")
    return [
        FullScaleCase("03", "CPC", CPC_SIZES["full"].steps, _cpc, note=f"noise input, {crops_note}"),
        FullScaleCase("04", "HuBERT masked prediction", sum(HUBERT_SIZES["full"].steps), _hubert,
                      note=f"iteration 2's config (K={HUBERT_SIZES['full'].clusters[1]}) stands for both iterations; random unit targets; "
                           f"{crops_note}; leaves out target k-means and the notebook's invariance fine-tuning"),
        FullScaleCase("05b", "continuous CTC ASR", TOKENIZER_SIZES["full"].asr_steps, _asr,
                      note="random log-mel-shaped features of 1.6 s (the mean utterance; batches are length-bucketed), random 25-character transcripts"),
        FullScaleCase("05b", "supervised tokenizer 12.5 Hz", len(TOKEN_RATES) * TOKENIZER_SIZES["full"].vq_steps, _token_asr,
                      note="the 12.5 Hz tokenizer stands for all four rates; starts from an untrained ASR model and a random codebook "
                           "(the recipe: the stage-1 model and a k-means codebook); random features and transcripts as the ASR case"),
        FullScaleCase("06", "RVQ codec", len(COLLAPSE_VARIANTS) * codec.steps + max(1, codec.steps // 2) + codec.causal_steps, _codec,
                      note=f"the 'all fixes' codec stands for the {len(COLLAPSE_VARIANTS)} collapse variants, the quantizer-dropout run "
                           f"and the causal codec (same size); noise input; {kmeans_note}"),
        FullScaleCase("06b", "phone recognizer", sem.recognizer_steps, _phone_recognizer,
                      note="random log-mel-shaped features of 1.6 s, random 17-phone label sequences"),
        FullScaleCase("06b", "RVQ codec", course_codec_steps, _course_codec("rvq"),
                      note=f"{phases_note}; noise input; {kmeans_note}"),
        FullScaleCase("06b", "single-codebook codec", course_codec_steps, _course_codec("single codebook"),
                      note=f"{phases_note}; noise input; {kmeans_note}"),
        FullScaleCase("06b", "distilled codec", course_codec_steps, _distilled_codec,
                      note=f"random teacher features stand in for HuBERT iteration 2's target layer; {phases_note}; noise input; {kmeans_note}"),
        FullScaleCase("06c", "audio encoder", AUDIO_TOKEN_SIZES["full"].encoder_steps, _audio_encoder,
                      note="2.1 s noise clips (the longest events); random targets stand in for the random-projection tokens"),
        FullScaleCase("06c", "audio tokenizer", AUDIO_TOKEN_SIZES["full"].tokenizer_steps, _audio_tokenizer,
                      note=f"2.1 s noise clips; random teacher features stand in for the trained encoder's; {kmeans_note}"),
        FullScaleCase("07", "speaker encoder", 2 * res.speaker_steps, _speaker_encoder,
                      note="two encoders (conditioning and meter) of the same size; random log-mel-shaped features"),
        FullScaleCase("07", "unit-to-mel flow", res.decoder_steps, _unit_to_mel,
                      note="random units, log-mels and unit-norm voice embeddings; 2.7 s sequences (a random batch's longest utterance)"),
        FullScaleCase("07", "HuBERT-unit LM", res.lm.steps, _unit_lm(acoustic=False),
                      note="random unit ids, 2.7 s (135 frames) per sequence"),
        FullScaleCase("07", "codec-code LM", res.lm.steps, _unit_lm(acoustic=True),
                      note=f"random codes of {res.acoustic_levels} interleaved RVQ levels, 2.7 s per sequence"),
    ]


CASES: list[FullScaleCase] = _cases()
