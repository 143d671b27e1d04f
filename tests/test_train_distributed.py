"""`train()` as a 2-process CPU job (gloo): the data-parallel replicas must stay identical and still learn."""
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_distributed_worker.py")


def test_two_process_replicas_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2, "both processes must have joined one process group"
    assert r0["num_processes"] == r1["num_processes"] == 2, "train() must have run data-parallel"
    assert torch.equal(r0["params"], r1["params"]), "replicas diverged"
    assert r0["losses"] == r1["losses"], "the logged loss is the all-process mean, the same on every rank"
    assert r0["losses"][-1] < 0.3 * r0["losses"][0], f"did not learn: {r0['losses']}"
    assert (tmp_path / "ckpt" / "step-000100" / "trainer_state.json").is_file()
