"CUDA checks for chapters 03-05 (`pytest -m cuda`): skipped cleanly on machines without a GPU."
import numpy as np
import pytest
import torch

from speechllm_course.core import HOP

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
