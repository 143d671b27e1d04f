"SpeechWorld: bad input, determinism across seeds and worker counts, cache integrity of the built corpus."
import os

import datasets
import numpy as np
import pytest

from speechllm_course import world as W
from speechllm_course.core import load_manifest

TINY = W.WorldSizes(*([4] * len(W.TASKS)))


def _contents(path):
    "Every row of every task and split of a built world, as plain Python objects."
    tasks = {t: datasets.load_from_disk(str(path / t)) for t in W.TASKS if (path / t).exists()}
    return {t: {s: d[s].to_list() for s in d} for t, d in tasks.items()}


@pytest.mark.parametrize("call, words", [
    (lambda: W.synthesize("hello", speaker="nobody"), ["speaker", "nobody"]),
    (lambda: W.synthesize(""), ["text"]),
    (lambda: W.synthesize("hello", sample_rate=12345), ["sample_rate", "12345"]),
    (lambda: W.synthesize("hello", style="sleepy"), ["style", "sleepy"]),
    (lambda: W.synthesize("hello", language="fr"), ["language", "fr"]),
    (lambda: W._engine().synth("hello", voice="zz+nothing"), ["voice", "zz+nothing"]),
    (lambda: W._engine().synth("hello", rate=5), ["rate", "5"]),
    (lambda: W.load_world("enormous"), ["scale", "enormous"]),
    (lambda: W.load_world("smoke", seed=-1), ["seed", "-1"]),
    (lambda: W.check_answer("seven", "seventy"), ["answer", "seventy"]),
    (lambda: W.decode_audio({"bytes": None, "path": None}), ["audio"]),
    (lambda: W.render_all([], workers=0), ["workers", "0"]),
])
def test_bad_input_names_the_argument(call, words):
    with pytest.raises(ValueError) as e: call()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_espeak_library_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEECHLLM_ESPEAK_LIB", str(tmp_path / "libespeak-ng.so.1"))
    monkeypatch.setenv("SPEECHLLM_ESPEAK_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match="espeak library.*libespeak-ng.so.1"): W.espeak_paths()
    with pytest.raises(RuntimeError, match="espeak"): W.load_world("smoke", root=tmp_path)
    assert not (tmp_path / "smoke" / "world").exists()


def test_same_seed_same_world_whatever_the_workers(tmp_path):
    (tmp_path / "a").mkdir(); (tmp_path / "b").mkdir(); (tmp_path / "c").mkdir()
    W.build_world(tmp_path / "a", TINY, seed=5, workers=1, progress=False)
    W.build_world(tmp_path / "b", TINY, seed=5, workers=2, progress=False)
    W.build_world(tmp_path / "c", TINY, seed=6, workers=2, progress=False)
    a, b, c = (_contents(tmp_path / x) for x in "abc")
    assert a == b
    assert a["asr"] != c["asr"]
    wav = W.decode_audio(a["asr"][next(iter(a["asr"]))][0]["audio"])
    assert wav.dtype == np.float32 and len(wav) > W.SAMPLE_RATE // 4


def test_synthesis_is_deterministic():
    x, y = W.synthesize("the red cat sleeps", "spk03"), W.synthesize("the red cat sleeps", "spk03")
    assert np.array_equal(x.wav, y.wav) and x.phones == y.phones and x.words == y.words
    z = W.synthesize("the red cat sleeps", "spk03", sample_rate=24000)
    assert abs(len(z.wav) / 24000 - x.duration) < 0.01 and z.phones == x.phones


def test_interrupted_or_damaged_world_is_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setitem(W.WORLD_SIZES, "smoke", TINY)
    real_render = W.render_all

    def crash(*args, **kwargs):
        real_render(*args, **kwargs)
        raise KeyboardInterrupt  # the user stops the build after the audio is rendered

    monkeypatch.setattr(W, "render_all", crash)
    with pytest.raises(KeyboardInterrupt): W.load_world("smoke", root=tmp_path, workers=1, progress=False)
    assert not (tmp_path / "smoke" / "world").exists()  # nothing that looks finished
    monkeypatch.setattr(W, "render_all", real_render)
    world = W.load_world("smoke", root=tmp_path, workers=1, progress=False)
    assert world.manifest["reason"] == "not built yet" and world.manifest["info"]["items"] == 4 * len(W.TASKS)
    # damage one data file: the next load notices and rebuilds
    arrow = next((world.path / "asr").rglob("*.arrow"))
    with open(arrow, "r+b") as f: f.truncate(os.path.getsize(arrow) // 2)
    again = W.load_world("smoke", root=tmp_path, workers=1, progress=False)
    assert "size" in load_manifest(again.path)["reason"] or "changed" in load_manifest(again.path)["reason"]
    assert len(again["asr"]["train"]) + sum(len(again["asr"][s]) for s in again["asr"] if s != "train") == 4


def test_classification_view_and_labels(monkeypatch, tmp_path):
    monkeypatch.setitem(W.WORLD_SIZES, "smoke", W.WorldSizes(asr=40, qa=2, instructions=2, translation=2, speaker_count=2, sound_events=2, music=2))
    world = W.load_world("smoke", root=tmp_path, workers=2, progress=False)
    cls = world.classification("gender")
    assert set(cls) == {"train", "test"} and cls["train"].features["gender"].names == ["female", "male"]
    for row in world["asr"]["train"]:
        spk = W.SPEAKER_BY_ID[row["speaker"]]
        assert (row["gender"], row["accent"]) == (spk.gender, spk.accent) and not spk.heldout


def test_synthesis_is_identical_in_a_fresh_process():
    "The same utterance from another process (another clock, another address layout) is bit-identical."
    import hashlib
    import subprocess
    import sys
    code = ("import hashlib; from speechllm_course.world import synthesize; "
            "print(hashlib.sha256(synthesize('my happy cow sees three green apples', 'spk10', 'excited').wav.tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = hashlib.sha256(W.synthesize("my happy cow sees three green apples", "spk10", "excited").wav.tobytes()).hexdigest()
    assert other == here
