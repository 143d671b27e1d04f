"SpeechWorld's sound scenes, music and augmentations, measured rather than trusted."
import math

import numpy as np
import pytest
import torch

from speechllm_course import world as sa

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SR = 16000


# ---------------------------------------------------------------------------------------------------------------------
# measuring tools, written independently of the module under test
# ---------------------------------------------------------------------------------------------------------------------

def f0_autocorr(x: np.ndarray, sr: int = SR, fmin: float = 50, fmax: float = 800) -> float:
    "F0 of a periodic signal: the first near-maximal peak of the autocorrelation in [sr/fmax, sr/fmin], refined by a parabola."
    x = np.asarray(x, np.float64) - np.mean(x)
    n = len(x)
    spec = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(np.abs(spec) ** 2)[:n] / n
    lo, hi = int(sr / fmax), int(sr / fmin)
    r = ac[lo:hi]
    peaks = [i for i in range(1, len(r) - 1) if r[i] >= r[i - 1] and r[i] >= r[i + 1]]
    k = lo + min(i for i in peaks if r[i] >= 0.9 * r.max())  # the shortest period among near-best: no octave-down errors
    a, b, c = ac[k - 1], ac[k], ac[k + 1]
    shift = 0.5 * (a - c) / (a - 2 * b + c) if (a - 2 * b + c) != 0 else 0.0
    return sr / (k + shift)


def harmonic_tone(f0: float, seconds: float = 1.0, n_harm: int = 6, sr: int = SR) -> np.ndarray:
    "A steady harmonic tone with 1/k amplitudes, peak 0.5."
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, n_harm + 1))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


FORMANTS = ((600, 1.0, 160), (1400, 0.6, 200), (2600, 0.35, 250))  # (Hz, amplitude, width) of a synthetic vowel


def vowel(f0: float = 120, seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    "A vowel-like sound: harmonics of f0 weighted by a smooth envelope with three formant bumps."
    t = np.arange(int(seconds * sr)) / sr
    x = np.zeros_like(t)
    for k in range(1, int(0.45 * sr / f0)):
        f = k * f0
        amp = 0.02 + sum(a * np.exp(-0.5 * ((f - fc) / w) ** 2) for fc, a, w in FORMANTS)
        x += amp * np.sin(2 * np.pi * f * t + 0.3 * k * k)
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


def log_envelope(x: np.ndarray, sr: int = SR, n_fft: int = 1024, keep: int = 28):
    "Average cepstrally smoothed log-magnitude spectrum (frames of n_fft, hop n_fft/4) and its frequencies."
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(x, np.float64), n_fft)[:: n_fft // 4] * np.hanning(n_fft)
    logmag = np.log(np.abs(np.fft.rfft(frames, axis=1)) + 1e-7)
    cep = np.fft.irfft(logmag, n_fft, axis=1)
    cep[:, keep: n_fft - keep + 1] = 0
    return np.fft.rfft(cep, axis=1).real.mean(0), np.fft.rfftfreq(n_fft, 1 / sr)


def envelope_scale(before: np.ndarray, after: np.ndarray, lo: float = 300, hi: float = 4000) -> float:
    "The factor s that best maps the envelope of `before` onto that of `after` (after(f) ~ before(f / s))."
    (a, f), (b, _) = log_envelope(before), log_envelope(after)
    grid = np.geomspace(lo, hi, 300)
    target = np.interp(grid, f, b)
    scales = np.exp(np.linspace(-0.45, 0.45, 181))
    scores = [np.corrcoef(np.interp(grid / s, f, a), target)[0, 1] for s in scales]
    return float(scales[int(np.argmax(scores))])


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)))


def schroeder_rt60(h: np.ndarray, sr: int = SR) -> float:
    "RT60 from Schroeder backward integration: the slope of the energy decay curve between -5 and -25 dB, times 3."
    edc = np.cumsum((h.astype(np.float64) ** 2)[::-1])[::-1]
    db = 10 * np.log10(edc / edc[0])
    idx = np.where((db <= -5) & (db >= -25))[0]
    slope = np.polyfit(idx / sr, db[idx], 1)[0]  # dB per second
    return -60.0 / slope


# ---------------------------------------------------------------------------------------------------------------------
# A. sound events
# ---------------------------------------------------------------------------------------------------------------------

def test_event_synths_length_level_and_edges():
    assert len(sa.EVENT_KINDS) >= 7 and set(sa.EVENT_SYNTHS) == set(sa.EVENT_KINDS)
    for kind in sa.EVENT_KINDS:
        for seed in range(3):
            x = sa.synth_event(kind, np.random.default_rng(seed), 0.5, SR)
            assert x.dtype == np.float32 and x.shape == (8000,) and np.isfinite(x).all()
            assert 0.5 < np.abs(x).max() <= 0.9 + 1e-6, kind
            if kind != "clicks":  # everything but clicks fades in and out: no click at the edges
                assert abs(x[0]) < 0.02 and abs(x[-1]) < 0.02, kind
            assert rms(x[:800]) > 0.01 and rms(x[-800:]) > 1e-3, kind  # energy spans the whole event window


def test_event_synths_deterministic():
    for kind in sa.EVENT_KINDS:
        a, b = (sa.synth_event(kind, np.random.default_rng(7), 0.4, SR) for _ in range(2))
        c = sa.synth_event(kind, np.random.default_rng(8), 0.4, SR)
        assert np.array_equal(a, b) and not np.array_equal(a, c), kind


def _bursts(x: np.ndarray, threshold: float = 0.1) -> int:
    "Number of separate bursts of sound: runs of 5 ms frames whose peak exceeds `threshold`."
    loud = np.abs(x[: len(x) // 80 * 80]).reshape(-1, 80).max(1) > threshold
    return int((np.diff(loud.astype(int)) == 1).sum() + loud[0])


def test_counted_events_have_that_many_pieces():
    for count in (2, 3, 5):
        assert _bursts(sa.synth_beeps(np.random.default_rng(count), 1.0, SR, count=count)) == count
        assert _bursts(sa.synth_clicks(np.random.default_rng(count), 0.8, SR, count=count)) == count


def test_scene_deterministic():
    a = sa.synth_sound_scene(np.random.default_rng(3))
    b = sa.synth_sound_scene(np.random.default_rng(3))
    c = sa.synth_sound_scene(np.random.default_rng(4))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_scene_events_inside_sorted_and_audible():
    seen = set()
    for seed in range(40):
        duration = [2.0, 3.0, 4.0][seed % 3]
        wav, events, caption = sa.synth_sound_scene(np.random.default_rng(seed), duration=duration, max_events=3)
        assert wav.dtype == np.float32 and len(wav) == int(duration * SR) and np.abs(wav).max() <= 0.9 + 1e-6
        assert 1 <= len(events) <= 3
        onsets = [e["onset"] for e in events]
        assert onsets == sorted(onsets)
        assert all(0 <= e["onset"] < e["offset"] <= duration + 1e-3 for e in events)
        mask = np.zeros(len(wav), bool)
        for e in events:
            mask[round(e["onset"] * SR): round(e["offset"] * SR)] = True
        background = rms(wav[~mask])
        assert (~mask).mean() > 0.1
        for e in events:
            window = wav[round(e["onset"] * SR): round(e["offset"] * SR)]
            assert 20 * math.log10(rms(window) / background) > 20, (seed, e)  # clearly above the faint background
        seen.update(e["label"] for e in events)
    assert len(seen) >= 7


def test_scene_background_is_faint_but_not_silent():
    wav, events, _ = sa.synth_sound_scene(np.random.default_rng(11), duration=4.0, max_events=1)
    e = events[0]
    inside = rms(wav[round(e["onset"] * SR): round(e["offset"] * SR)])
    outside = np.concatenate([wav[: max(0, round(e["onset"] * SR) - 80)], wav[round(e["offset"] * SR) + 80:]])
    ratio_db = 20 * math.log10(inside / rms(outside))
    assert rms(outside) > 0 and 20 < ratio_db < 50


def _mentions_in_order(caption: str, labels) -> bool:
    "Every label (consecutive repeats may be told once: 'two bells') occurs in the caption, in order."
    pos = 0
    for i, label in enumerate(labels):
        if i and labels[i - 1] == label:
            continue
        nxt = caption.find(label, pos)
        if nxt < 0:
            return False
        pos = nxt + len(label)
    return True


def test_caption_mentions_every_event_in_order():
    words = {2: "two", 3: "three", 4: "four"}
    for seed in range(60):
        _, events, caption = sa.synth_sound_scene(np.random.default_rng(seed), max_events=4)
        labels = [e["label"] for e in events]
        assert _mentions_in_order(caption, labels), (labels, caption)
        for e in events:
            if e["label"] in sa.COUNTED_KINDS:
                assert f"{words[e['count']]} " in caption, (e, caption)  # counts in words
        assert not any(ch.isdigit() for ch in caption)


def test_caption_events_phrasing():
    seq = [{"label": "siren", "onset": 0.1, "offset": 1.0}, {"label": "beeps", "onset": 1.2, "offset": 1.8, "count": 2}]
    over = [{"label": "bell", "onset": 0.1, "offset": 1.0}, {"label": "buzz", "onset": 0.5, "offset": 1.5}]
    same = [{"label": "bell", "onset": 0.1, "offset": 0.6}, {"label": "bell", "onset": 0.9, "offset": 1.4}]
    seq_caps = {sa.caption_events(seq, np.random.default_rng(s)) for s in range(30)}
    over_caps = {sa.caption_events(over, np.random.default_rng(s)) for s in range(30)}
    same_caps = {sa.caption_events(same, np.random.default_rng(s)) for s in range(30)}
    assert len(seq_caps) >= 5  # several templates and phrasings
    assert all("siren" in c and "two" in c and "beeps" in c and c.index("siren") < c.index("beeps") for c in seq_caps)
    assert all(any(w in c for w in (" while ", " as ", "together with", "overlapping", "along with")) for c in over_caps)
    assert all("two bells" in c for c in same_caps)


# ---------------------------------------------------------------------------------------------------------------------
# B. music
# ---------------------------------------------------------------------------------------------------------------------

def test_music_deterministic():
    a = sa.synth_music(np.random.default_rng(5))
    b = sa.synth_music(np.random.default_rng(5))
    c = sa.synth_music(np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_music_labels_scale_grid_and_caption():
    seen = {"key": set(), "mode": set(), "instrument": set()}
    for seed in range(40):
        wav, labels, caption = sa.synth_music(np.random.default_rng(seed), duration=4.0)
        assert wav.dtype == np.float32 and len(wav) == 4 * SR and 0.5 < np.abs(wav).max() <= 0.9 + 1e-6
        tonic = sa.NOTE_NAMES.index(labels["key"])
        steps = sa.SCALE_STEPS[labels["mode"]]
        bpm = labels["tempo_bpm"]
        assert 60 <= bpm <= 160 and labels["instrument"] in sa.INSTRUMENTS
        half_beat = 30.0 / bpm
        assert labels["notes"]
        for midi, on, off in labels["notes"] + labels["bass_notes"]:
            assert (midi - tonic) % 12 in steps  # every note in the key's scale
            assert abs(on / half_beat - round(on / half_beat)) * half_beat < 2e-3  # on the (eighth-note) beat grid
            assert 0 <= on < off <= 4.0
        onsets = [on for _, on, _ in labels["notes"]]
        assert onsets == sorted(onsets) and len(set(onsets)) == len(onsets)  # a monophonic melody
        assert f"{labels['key']} {labels['mode']}" in caption and f"{bpm} beats per minute" in caption
        assert sa.tempo_word(bpm) in caption and any(w in caption for w in sa._TIMBRE_WORDS[labels["instrument"]])
        for k in seen: seen[k].add(labels[k])
    assert len(seen["key"]) >= 8 and seen["mode"] == {"major", "minor"} and seen["instrument"] == set(sa.INSTRUMENTS)


def test_music_notes_sound_at_their_labelled_pitch():
    checked = set()
    for seed in range(80):
        wav, labels, _ = sa.synth_music(np.random.default_rng(seed))
        if labels["bass_notes"] or labels["instrument"] in checked:
            continue
        midi, on, off = max(labels["notes"], key=lambda n: n[2] - n[1])
        seg = wav[int((on + 0.02) * SR): int((on + 0.02) * SR) + 2400]  # 150 ms from just after the attack
        expected = sa.midi_to_hz(midi)
        assert abs(f0_autocorr(seg, fmin=80, fmax=1000) / expected - 1) < 0.015, (labels["instrument"], midi)
        checked.add(labels["instrument"])
    assert checked == set(sa.INSTRUMENTS)  # including the Karplus-Strong pluck, tuned by its fractional delay


# ---------------------------------------------------------------------------------------------------------------------
# C. augmentations
# ---------------------------------------------------------------------------------------------------------------------

def test_pitch_shift_moves_f0_keeps_length():
    x = harmonic_tone(150.0)
    assert abs(f0_autocorr(x) - 150) < 1
    for semitones in (12.0, 7.0, -5.0):
        y = sa.pitch_shift(x, SR, semitones)
        assert y.dtype == np.float32 and len(y) == len(x) and np.abs(y).max() <= 1
        mid = y[2000:-2000]
        assert abs(f0_autocorr(mid) / (150 * 2 ** (semitones / 12)) - 1) < 0.03, semitones
    yt = sa.pitch_shift(torch.from_numpy(x.astype(np.float64)), SR, 12.0)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32 and yt.shape == (len(x),)


@pytest.mark.parametrize("f0", [120.0, 210.0])
def test_formant_shift_moves_envelope_keeps_f0(f0):
    x = vowel(f0)
    for alpha in (1.2, 0.85):
        y = sa.formant_shift(x, SR, alpha)
        assert y.dtype == np.float32 and len(y) == len(x) and np.abs(y).max() <= 1
        assert abs(f0_autocorr(y[1000:-1000]) / f0_autocorr(x[1000:-1000]) - 1) < 0.03  # same voice pitch
        assert abs(envelope_scale(x, y) - alpha) < 0.05, alpha  # resonances moved by alpha
        (ex, f), (ey, _) = log_envelope(x), log_envelope(y)
        band = (f > 300) & (f < 1100)  # the first formant's peak moves the same way
        f1x, f1y = f[band][np.argmax(ex[band])], f[band][np.argmax(ey[band])]
        assert (f1y - f1x) * (alpha - 1) > 0 and abs(f1y / f1x - alpha) < 0.1
    assert np.array_equal(sa.formant_shift(x, SR, 1.0), x)  # alpha 1 is the identity


def test_time_stretch_length_and_pitch():
    x = harmonic_tone(200.0, 1.0)
    for rate in (0.8, 1.25, 2.0):
        y = sa.time_stretch(x, SR, rate)
        assert len(y) == round(len(x) / rate) and y.dtype == np.float32  # alignment times scale by 1/rate
        assert abs(f0_autocorr(y[1000:-1000]) / 200 - 1) < 0.03
    yt = sa.time_stretch(torch.from_numpy(x), SR, 1.5)
    assert isinstance(yt, torch.Tensor) and len(yt) == round(len(x) / 1.5)


def test_add_noise_exact_snr_and_colour():
    x = harmonic_tone(220.0) * 0.2
    lows = {}
    for color in ("white", "pink", "brown"):
        for snr in (-5.0, 0.0, 10.0, 30.0):
            y = sa.add_noise(x, snr, np.random.default_rng(1), color=color)
            n = y.astype(np.float64) - x
            measured = 10 * math.log10(np.sum(x.astype(np.float64) ** 2) / np.sum(n ** 2))
            assert abs(measured - snr) < 0.1, (color, snr, measured)
            assert y.dtype == np.float32 and np.abs(y).max() <= 1
        noise = sa.add_noise(np.full(SR, 0.1, np.float32), 0.0, np.random.default_rng(2), color=color) - 0.1
        p = np.abs(np.fft.rfft(noise)) ** 2
        lows[color] = p[100:500].sum() / p[4000:8000].sum()  # 100-500 Hz vs 4-8 kHz: redder noise, more low end
    assert lows["white"] < lows["pink"] < lows["brown"]
    assert np.array_equal(sa.add_noise(x, 5.0, np.random.default_rng(3)), sa.add_noise(x, 5.0, np.random.default_rng(3)))
    loud = sa.add_noise(harmonic_tone(220.0) * 1.8, 0.0, np.random.default_rng(0))  # would exceed 1: scaled, not clipped
    assert np.abs(loud).max() <= 1 and len(np.unique(np.round(np.abs(loud), 6))) > 1000


def test_rir_rt60_measured_by_schroeder():
    for rt60 in (0.3, 0.6, 1.0):
        for seed in range(2):
            h = sa.synthetic_rir(SR, rt60, np.random.default_rng(seed))
            assert h.dtype == np.float32 and len(h) == math.ceil(1.2 * rt60 * SR) and h[0] == 1.0
            assert abs(schroeder_rt60(h) / rt60 - 1) < 0.2, (rt60, schroeder_rt60(h))


def test_reverb_keeps_length_and_peak():
    x = vowel(150.0, 0.8)
    x[int(0.5 * SR):] = 0  # a sound followed by silence: reverb must fill the silence with a decaying tail
    y = sa.reverb(x, SR, 0.5, np.random.default_rng(0))
    assert y.dtype == np.float32 and len(y) == len(x)
    assert abs(np.abs(y).max() / np.abs(x).max() - 1) < 0.01
    tail = y[int(0.5 * SR): int(0.6 * SR)]
    assert rms(tail) > 0.01 * rms(x[: int(0.5 * SR)])
    assert np.array_equal(y, sa.reverb(x, SR, 0.5, np.random.default_rng(0)))
    yt = sa.reverb(torch.from_numpy(x), SR, 0.3, np.random.default_rng(0))
    assert isinstance(yt, torch.Tensor) and yt.shape == (len(x),)


# ---------------------------------------------------------------------------------------------------------------------
# bad arguments: every public function names the argument it rejects
# ---------------------------------------------------------------------------------------------------------------------

_G = np.random.default_rng(0)
_X = np.zeros(1600, np.float32) + 0.1
BAD = [
    ("rng", lambda: sa.synth_sound_scene(0)),
    ("duration", lambda: sa.synth_sound_scene(_G, duration=-1.0)),
    ("duration", lambda: sa.synth_sound_scene(_G, duration=float("nan"))),
    ("sample_rate", lambda: sa.synth_sound_scene(_G, sample_rate=16000.0)),
    ("sample_rate", lambda: sa.synth_sound_scene(_G, sample_rate=0)),
    ("max_events", lambda: sa.synth_sound_scene(_G, max_events=0)),
    ("kind", lambda: sa.synth_event("trumpet", _G, 0.5)),
    ("duration_s", lambda: sa.synth_tone(_G, 0.0, SR)),
    ("sample_rate", lambda: sa.synth_bell(_G, 0.5, -5)),
    ("count", lambda: sa.synth_beeps(_G, 0.5, SR, count=40)),
    ("count", lambda: sa.synth_event("bell", _G, 0.5, count=3)),
    ("events", lambda: sa.caption_events([{"label": "beeps", "onset": 0, "offset": 1, "count": "3"}], _G)),
    ("events", lambda: sa.caption_events([], _G)),
    ("events", lambda: sa.caption_events([{"label": "dog", "onset": 0, "offset": 1}], _G)),
    ("events", lambda: sa.caption_events([{"label": "bell", "onset": 1, "offset": 0.5}], _G)),
    ("events", lambda: sa.caption_events([{"label": "bell", "onset": 1, "offset": 2}, {"label": "tone", "onset": 0, "offset": 0.5}], _G)),
    ("duration", lambda: sa.synth_music(_G, duration=0.1)),
    ("sample_rate", lambda: sa.synth_music(_G, sample_rate=True)),
    ("labels", lambda: sa.music_caption({"key": "H", "mode": "major", "tempo_bpm": 90, "instrument": "sine"}, _G)),
    ("wav", lambda: sa.pitch_shift([0.1, 0.2], SR, 2.0)),
    ("wav", lambda: sa.pitch_shift(np.zeros((2, 100), np.float32), SR, 2.0)),
    ("wav", lambda: sa.pitch_shift(np.zeros(100, np.int16), SR, 2.0)),
    ("wav", lambda: sa.time_stretch(np.array([0.1, np.nan] * 50, np.float32), SR, 1.1)),
    ("semitones", lambda: sa.pitch_shift(_X, SR, 48.0)),
    ("sample_rate", lambda: sa.pitch_shift(_X, 16000.5, 2.0)),
    ("alpha", lambda: sa.formant_shift(_X, SR, 0.0)),
    ("alpha", lambda: sa.formant_shift(_X, SR, "1.1")),
    ("rate", lambda: sa.time_stretch(_X, SR, 0.0)),
    ("rate", lambda: sa.time_stretch(_X, SR, float("inf"))),
    ("snr_db", lambda: sa.add_noise(_X, float("nan"), _G)),
    ("rng", lambda: sa.add_noise(_X, 10.0, 42)),
    ("color", lambda: sa.add_noise(_X, 10.0, _G, color="blue")),
    ("wav", lambda: sa.add_noise(np.zeros(100, np.float32), 10.0, _G)),
    ("rt60", lambda: sa.synthetic_rir(SR, -0.1, _G)),
    ("sample_rate", lambda: sa.synthetic_rir(0, 0.5, _G)),
    ("rt60", lambda: sa.reverb(_X, SR, 0.0, _G)),
    ("rng", lambda: sa.reverb(_X, SR, 0.5, np.random.RandomState(0))),
]


@pytest.mark.parametrize("name,call", BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(BAD)])
def test_bad_arguments_name_the_argument(name, call):
    with pytest.raises(ValueError, match=rf"^{name}: expected"):
        call()
