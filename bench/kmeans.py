"""Benchmark: the course's from-scratch torch `KMeans` vs scikit-learn `MiniBatchKMeans` vs `faiss.Kmeans`.

What is clustered
-----------------
Speech-like frame features built deterministically from the SpeechWorld corpus (`load_world`: the smoke world under
`SPEECHLLM_SCALE=smoke`, else the course world; built first if missing): 80-channel log-mels at 50 Hz
(`speechllm_course.features.LogMel`) of the `asr` utterances, normalised per channel, stacked over +-2 frames (400-d),
then pushed through a frozen random two-layer network (400 -> 768 GELU -> D, seed 0). Real HuBERT features are not
available offline; this keeps what matters for k-means (phone / speaker / silence structure, correlated dimensions,
full rank at D=768, per-dimension offsets) with no checkpoint to download. Sizes (`course`/`full`): 200k x 256 and
200k x 768 frames with K=100, and 200k x 256 with K=500; under `SPEECHLLM_SCALE=smoke`, 20k x 64 with K=100 (< 60 s).
Threads: all cores (2 here) for every method, or `BENCH_THREADS`.

The contenders (every fit runs in a fresh subprocess with the same thread count for torch, BLAS/OpenMP and faiss)
----------------------------------------------------------------------------------------------------------------
* ours: `KMeans(K, D).fit(x, **OURS)`: full-batch Lloyd from greedy k-means++ (on a 30k-row subsample), stopping when
  an iteration improves the inertia by less than `tol` (relative), one init: `fit`'s defaults, used for RESULT.
  "ours-20it" (informational) is the same with a fixed budget of max_iter=20.
* scikit-learn `MiniBatchKMeans` exactly as fairseq's HuBERT recipe configures it
  (facebookresearch/fairseq, examples/hubert/simple_kmeans/learn_kmeans.py, its argparse defaults):
  init='k-means++', max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100, init_size=None (scikit-learn then
  uses 3 * batch_size = 30000 rows), n_init=20, reassignment_ratio=0.0, compute_labels=False; plus random_state=0 here
  for repeatability (the recipe seeds numpy's global RNG instead). fairseq's textless/GSLM speech2unit clustering
  (examples/textless_nlp/gslm/speech2unit/clustering/cluster_kmeans.py) differs only in max_iter=150,
  reassignment_ratio=0.5, compute_labels=True.
* faiss `Kmeans(D, K, niter=<our n_iter_>, seed=0)`: "faiss" trains on all rows (max_points_per_centroid raised), the
  like-for-like row; "faiss-sub" keeps faiss's default of subsampling 256 rows per centroid (its usual speed trick).

Measured: wall time of `fit` only (features already in memory as float32), and the final inertia of every method's
centroids on all rows, computed by one exact float64 function (`exact_inertia`). Also printed: the CPU time of the
fitting process and the CPU time the rest of the machine used during the fit ("others"): a timing taken while other
work competed for the cores (others well above 0) is not trustworthy. Prints a table and the ratios; the
last line is `RESULT ...` for the first (headline) case: 200k x 256, K=100 (20k x 64 at smoke).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))
OURS = dict(init="k-means++", max_iter=100, tol=1e-4, batch_size=None, n_init=1, seed=0)  # = fit()'s defaults
OURS_SHORT = dict(OURS, max_iter=20)  # an informational row: a fixed budget of 20 Lloyd iterations
SKLEARN = dict(init="k-means++", max_iter=100, batch_size=10000, tol=0.0, max_no_improvement=100, init_size=None,
               n_init=20, reassignment_ratio=0.0, compute_labels=False, random_state=0)
CASES = {"smoke": [(20_000, 64, 100)],
         "course": [(200_000, 256, 100), (200_000, 768, 100), (200_000, 256, 500)]}
CASES["full"] = CASES["course"]
WORLD = {"smoke": "smoke", "course": "course", "full": "course"}  # 200k frames need no bigger world than course's


def load_ours():
    "Our KMeans class, from the package (chapter 05, `speechllm_course.units`)."
    from speechllm_course.units import KMeans
    return KMeans, "speechllm_course.units"


def speech_features(n: int, dim: int, scale: str, seed: int = 0) -> np.ndarray:
    "n x dim float32 speech-like frames (see the module docstring); deterministic."
    from speechllm_course.features import LogMel
    from speechllm_course.world import decode_audio, load_world
    world, logmel, mels, total = load_world(scale, progress=False), LogMel(n_mels=80), [], 0
    for task in ("asr", "qa", "instructions", "translation"):  # asr first; the others only if asr is too small
        for split in ("train", "validation", "test", "test_unseen_speakers"):
            for row in world[task][split].select_columns(["audio"]):
                if total >= n: break
                m = logmel(torch.from_numpy(decode_audio(row["audio"]))).T  # (T, 80)
                mels.append(m)
                total += len(m)
    if total < n: raise ValueError(f"n: expected at most {total} frames (the {scale} world's speech), got {n}")
    allm = torch.cat(mels)
    mu, sd = allm.mean(0), allm.std(0) + 1e-5
    stacked = []
    for m in mels:  # +-2 frames of context inside each utterance (edges repeated)
        m = (m - mu) / sd
        p = torch.cat([m[:1].expand(2, -1), m, m[-1:].expand(2, -1)])
        stacked.append(torch.cat([p[i:i + len(m)] for i in range(5)], 1))
    s = torch.cat(stacked)[:n]
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(400, 768, generator=g) / 20, 0.5 * torch.randn(768, generator=g)
    w2 = torch.randn(768, dim, generator=g) / math.sqrt(768)
    with torch.no_grad(): return (torch.nn.functional.gelu(s @ w1 + b1) @ w2).numpy().astype(np.float32)


def exact_inertia(x: np.ndarray, c: np.ndarray) -> float:
    "Sum of squared distances to the nearest centroid, in float64 (the same judge for every method)."
    x64, c64 = torch.from_numpy(x), torch.from_numpy(np.asarray(c, dtype=np.float64))
    ref = x64.double().mean(0)
    c64 = c64 - ref
    c_sq, total = (c64 * c64).sum(1), 0.0
    for i in range(0, len(x64), 8192):
        xb = x64[i:i + 8192].double() - ref
        d = torch.addmm(c_sq, xb, c64.T, alpha=-2).add_((xb * xb).sum(1, keepdim=True))
        total += d.min(1).values.clamp_min(0).sum().item()
    return total


def busy_cpu_seconds() -> float:
    "CPU seconds the whole machine has spent busy since boot (Linux /proc/stat; 0 elsewhere)."
    try:
        with open("/proc/stat") as f: v = [int(t) for t in f.readline().split()[1:9]]
    except OSError: return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def worker(method: str, data_path: str, k: int, niter: int, out: str) -> None:
    "Fit one method in this (fresh) process and save its centroids and fit time."
    torch.set_num_threads(THREADS)
    from threadpoolctl import threadpool_limits
    x = np.load(data_path)
    busy0, cpu0 = busy_cpu_seconds(), time.process_time()
    with threadpool_limits(limits=THREADS):
        if method.startswith("ours"):
            KMeans, _ = load_ours()
            km = KMeans(k, x.shape[1])
            t0 = time.perf_counter()
            km.fit(x, **(OURS if method == "ours" else OURS_SHORT))
            secs, c, info = time.perf_counter() - t0, km.centroids.numpy(), dict(n_iter=km.n_iter_)
        elif method == "sklearn":
            from sklearn.cluster import MiniBatchKMeans
            km = MiniBatchKMeans(n_clusters=k, **SKLEARN)
            t0 = time.perf_counter()
            km.fit(x)
            secs, c, info = time.perf_counter() - t0, km.cluster_centers_, dict(n_iter=int(km.n_steps_))
        else:
            import faiss
            faiss.omp_set_num_threads(THREADS)
            kw = dict(max_points_per_centroid=len(x) // k + 1) if method == "faiss" else {}
            km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=0, verbose=False, **kw)
            t0 = time.perf_counter()
            km.train(x)
            secs, c, info = time.perf_counter() - t0, km.centroids, dict(n_iter=niter)
    np.save(out, np.asarray(c, dtype=np.float32))
    # other_cpu_s: CPU time the rest of the machine used meanwhile; near 0 means nothing else competed for the cores
    cpu = time.process_time() - cpu0
    info.update(cpu_s=cpu, other_cpu_s=max(0.0, busy_cpu_seconds() - busy0 - cpu))
    Path(out).with_suffix(".json").write_text(json.dumps(dict(secs=secs, **info)))


def run(method: str, data_path: Path, k: int, niter: int, tmp: Path) -> dict:
    out = tmp / f"{method}-c.npy"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS)}
    subprocess.run([sys.executable, __file__, "--worker", method, str(data_path), str(k), str(niter), str(out)], check=True, env=env)
    return dict(json.loads(out.with_suffix(".json").read_text()), centroids=np.load(out))


def main() -> None:
    from speechllm_course.core import get_scale
    import faiss, sklearn
    scale = get_scale()
    _, source = load_ours()
    print(f"k-means benchmark, scale={scale}, threads={THREADS} (torch, BLAS/OpenMP, faiss), ours from {source}")
    print(f"versions: torch {torch.__version__}, scikit-learn {sklearn.__version__}, faiss {faiss.__version__}")
    rows, headline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        tmp, feats = Path(tmp), {}
        for n, d, k in CASES[scale]:
            if (n, d) not in feats:
                t0 = time.perf_counter()
                feats[(n, d)] = speech_features(n, d, WORLD[scale])
                np.save(tmp / f"x-{n}-{d}.npy", feats[(n, d)])
                print(f"features {n} x {d}: {time.perf_counter() - t0:.1f} s")
            x, path = feats[(n, d)], tmp / f"x-{n}-{d}.npy"
            res = {"ours": run("ours", path, k, 0, tmp)}
            for m in ("ours-20it", "sklearn", "faiss", "faiss-sub"): res[m] = run(m, path, k, res["ours"]["n_iter"], tmp)
            for m, r in res.items():
                r["inertia"] = exact_inertia(x, r["centroids"]) / n
                rows.append((f"{n}x{d} K={k}", m, r["secs"], r["cpu_s"], r["other_cpu_s"], r["n_iter"], r["inertia"]))
                print(f"  {n}x{d} K={k} {m:<9} {r['secs']:8.2f} s (cpu {r['cpu_s']:7.2f} s, others {r['other_cpu_s']:6.2f} s)  "
                      f"iters/steps {r['n_iter']:5d}  inertia/frame {r['inertia']:.5f}", flush=True)
            ratios = dict(speedup_vs_minibatchkmeans=res["sklearn"]["secs"] / res["ours"]["secs"],
                          inertia_ratio=res["ours"]["inertia"] / res["sklearn"]["inertia"],
                          speedup_vs_faiss=res["faiss"]["secs"] / res["ours"]["secs"],
                          inertia_ratio_vs_faiss=res["ours"]["inertia"] / res["faiss"]["inertia"],
                          speedup_vs_faiss_sub=res["faiss-sub"]["secs"] / res["ours"]["secs"])
            print("  " + "  ".join(f"{a}={b:.3f}" for a, b in ratios.items()), flush=True)
            headline = headline or ratios
    print(f"\n| case | method | fit (s) | its cpu (s) | others' cpu (s) | iters (sklearn: steps) | inertia / frame |\n"
          f"|---|---|---:|---:|---:|---:|---:|")
    for case, m, secs, cpu, other, it, inertia in rows:
        print(f"| {case} | {m} | {secs:.2f} | {cpu:.2f} | {other:.2f} | {it} | {inertia:.5f} |")
    print(f"RESULT speedup_vs_minibatchkmeans={headline['speedup_vs_minibatchkmeans']:.2f} "
          f"inertia_ratio={headline['inertia_ratio']:.4f} speedup_vs_faiss={headline['speedup_vs_faiss']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else: main()
