"""Benchmark: the course's `ResidualVQ` (chapter 06) vs `vector-quantize-pytorch`'s `ResidualVQ`.

Same configuration on both sides: latent dim 128, 8 levels of 1024 codes, batches of 16 x 200 frames (under
`SPEECHLLM_SCALE=smoke`: dim 64, 4 levels of 256 codes, 8 x 100 frames), EMA codebook updates with decay 0.99,
k-means initialisation from the first batch (10 iterations), dead-code replacement, commitment weight 0.25.
The dead-code rule is expressed in each library's own unit: theirs replaces a code whose EMA cluster size falls below
1 vector per batch; ours below `1 / (vectors per batch / K)` of its fair share, the same point, with our usage EMA at
their decay (0.99; `BENCH_USAGE_DECAY` changes ours).

Measured, in one run, on the same thread count (all cores, or `BENCH_THREADS`):
* throughput: wall time of forward + backward of the quantizer alone on a fixed batch (after warm-up, median of
  `REPEATS` timed steps), as steps per second; ratio = ours / theirs (> 1: ours is faster);
* code usage after the same training toy: a linear encoder, the quantizer and a linear decoder trained for `STEPS`
  steps (Adam, same seed and data) to reconstruct vectors drawn from a 64-component Gaussian mixture through a fixed
  random rotation; usage = the share of codes used on a held-out batch, averaged over levels.
The last line is `RESULT speedup_vs_vector_quantize_pytorch=<x> usage_ours=<share> usage_theirs=<share>`.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

SMOKE = os.environ.get("SPEECHLLM_SCALE", "course") == "smoke"
DIM, LEVELS, K, BATCH, FRAMES = (64, 4, 256, 8, 100) if SMOKE else (128, 8, 1024, 16, 200)
REPEATS, STEPS = (10, 60) if SMOKE else (30, 300)
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
USAGE_DECAY = float(os.environ.get("BENCH_USAGE_DECAY", 0.99))  # 0.9 (our default) for the earlier, mismatched comparison
torch.set_num_threads(THREADS)


def ours():
    from speechllm_course.codec import QuantizerConfig, ResidualVQ
    per_batch = BATCH * FRAMES
    # usage_decay 0.99: dead codes judged over the same ~100-batch horizon as their cluster-size EMA (decay 0.99)
    cfg = QuantizerConfig(dim=DIM, levels=LEVELS, codebook_size=K, ema=True, ema_decay=0.99, kmeans_init=True,
                          dead_code_threshold=1.0 / (per_batch / K), usage_decay=USAGE_DECAY, commitment=0.25)
    rvq = ResidualVQ(cfg)

    def step(x):
        q, ids, loss = rvq(x)
        return q, ids, loss
    return rvq, step


def theirs():
    from vector_quantize_pytorch import ResidualVQ
    rvq = ResidualVQ(dim=DIM, num_quantizers=LEVELS, codebook_size=K, decay=0.99, kmeans_init=True, kmeans_iters=10,
                     threshold_ema_dead_code=1, commitment_weight=0.25)

    def step(x):
        q, ids, loss = rvq(x)
        return q, ids.permute(0, 2, 1), loss.sum()
    return rvq, step


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, DIM, generator=g) * 2
    rot = torch.linalg.qr(torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(99)))[0]
    return ((centres[torch.randint(64, (n,), generator=g)] + 0.5 * torch.randn(n, DIM, generator=g)) @ rot).view(-1, FRAMES, DIM)


def throughput(make) -> float:
    torch.manual_seed(0)
    rvq, step = make()
    rvq.train()
    x = data(BATCH * FRAMES, 1).requires_grad_(True)
    times = []
    for i in range(REPEATS + 3):
        t = time.perf_counter()
        q, _, loss = step(x)
        (q.square().mean() + loss).backward()
        x.grad = None
        if i >= 3: times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def usage_after_training(make) -> float:
    torch.manual_seed(0)
    rvq, step = make()
    enc, dec = torch.nn.Linear(DIM, DIM), torch.nn.Linear(DIM, DIM)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *[p for p in rvq.parameters() if p.requires_grad]], lr=1e-3)
    rvq.train()
    for s in range(STEPS):
        x = data(BATCH * FRAMES, 100 + s)
        q, _, loss = step(enc(x))
        total = (dec(q) - x).square().mean() + loss
        opt.zero_grad(); total.backward(); opt.step()
    rvq.eval()
    with torch.no_grad():
        _, ids, _ = step(enc(data(BATCH * FRAMES, 7)))  # (B, levels, frames)
    return float(sum(len(torch.unique(ids[:, l])) / K for l in range(LEVELS)) / LEVELS)


def main():
    print(f"RVQ benchmark: dim {DIM}, {LEVELS} levels x {K} codes, batch {BATCH} x {FRAMES} frames, {THREADS} threads, "
          f"{'smoke' if SMOKE else 'course'} size")
    rows = {}
    for name, make in (("ours", ours), ("vector-quantize-pytorch", theirs)):
        t0 = time.perf_counter()
        rows[name] = (throughput(make), usage_after_training(make))
        print(f"  {name:>24}: {rows[name][0]:7.1f} fwd+bwd steps/s, code usage after {STEPS} training steps {rows[name][1]:.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
    speedup = rows["ours"][0] / rows["vector-quantize-pytorch"][0]
    print(f"RESULT speedup_vs_vector_quantize_pytorch={speedup:.3f} usage_ours={rows['ours'][1]:.3f} "
          f"usage_theirs={rows['vector-quantize-pytorch'][1]:.3f}")


if __name__ == "__main__":
    main()
