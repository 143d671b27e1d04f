"""Run by tests/test_train_distributed.py under `accelerate launch --cpu --num_processes 2`.

Trains a small MLP with `speechllm_course.core.train` and saves this replica's parameters, so the test can
check that data-parallel replicas stay identical."""
import sys
from pathlib import Path

import torch
from torch import nn

from speechllm_course.core import train

out = Path(sys.argv[1])
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(512, 8, generator=g)
y = x @ torch.randn(8, 1, generator=g)
model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
hist = train(model, torch.utils.data.TensorDataset(x, y), loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
             steps=100, lr=1e-2, batch_size=16, log_every=25, progress=False, ckpt_dir=str(out / "ckpt"), ckpt_every=50)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
torch.save(dict(params=torch.cat([p.detach().flatten() for p in model.parameters()]), losses=hist.losses, world=world, num_processes=hist.num_processes),
           out / f"rank{rank}.pt")
