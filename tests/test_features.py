"""features: bad input gets a clear error; frame counts follow the course convention for any length and hop."""
import pytest
import torch

from speechllm_course.core import n_frames
from speechllm_course.features import MFCC, LogMel, sequence_lengths


@pytest.mark.parametrize("kw,arg", [
    (dict(wav=torch.zeros(2, 1, 1600)), "wav"),
    (dict(wav=torch.zeros(1600, dtype=torch.int32)), "wav"),
    (dict(wav=torch.zeros(1600), sample_rate=22050), "sample_rate"),
    (dict(wav=torch.zeros(100)), "wav"),  # shorter than one frame
])
def test_bad_waveforms(kw, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected .*, got "):
        LogMel()(**kw)


@pytest.mark.parametrize("kw,arg", [(dict(win=200), "win"), (dict(n_fft=256), "n_fft"), (dict(f_max=12000), "f_max")])
def test_bad_logmel_settings(kw, arg):
    with pytest.raises(ValueError, match=rf"^{arg}: expected"):
        LogMel(**kw)


def test_bad_mfcc_settings():
    with pytest.raises(ValueError, match="n_mfcc"):
        MFCC(n_mfcc=50, n_mels=40)
    with pytest.raises(ValueError, match="n_deltas"):
        MFCC(n_deltas=3)
    with pytest.raises(ValueError, match="seconds"):
        sequence_lengths(seconds=(0,))


@pytest.mark.parametrize("n", [320, 321, 639, 640, 12_345, 48_000])
def test_frame_counts(n):
    assert LogMel()(torch.randn(n)).shape[-1] == n_frames(n)
    assert MFCC(n_deltas=2)(torch.randn(2, n)).shape == (2, 39, n_frames(n))
    assert LogMel(hop=160)(torch.randn(n)).shape[-1] == n // 160


def test_batch_equals_single():
    x = torch.randn(3, 8000)
    lm = LogMel()
    assert torch.allclose(lm(x), torch.stack([lm(row) for row in x]), atol=1e-5)
