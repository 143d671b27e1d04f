"""Full-scale training steps: each chapter's models at their `full` configuration, one real training call each.

A case builds a chapter's model from that chapter's `*_SIZES["full"]` and trains it through the chapter's own train
function (so the same collator, loss and `core.train` loop as the recipe) on synthetic inputs of the recipe's full
batch size and sequence length: random audio, random unit ids, random text of the right length. Synthetic inputs are
enough to measure what this is for: that the `full` recipe fits in one GPU's memory, and how long each optimiser
step takes there. Multiplying by the recipe's step count gives a projected training time; it leaves out data
preparation, k-means and evaluation, and says so wherever it is printed.

`tests/test_cuda.py` runs every case on a GPU (`pytest -m cuda`); `python tests/full_scale.py --only 08` runs cases
on whatever device this machine has (one step each on a CPU: a check that the full configs build and train at all);
with `SPEECHLLM_MIXED_PRECISION=no` it measures them in float32, as a GPU without bf16 (a T4) trains them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# A single 24 GB card (an L4, an A10, an RTX 4090) is the smallest GPU `full` is meant to run on; 10% stays free
# for the CUDA context and the allocator's fragmentation.
FULL_SCALE_BUDGET_GIB = 21.6
# A GPU without bf16 trains in float32 (`core.auto_mixed_precision`); Colab's T4 has 15 GiB, 10% kept free likewise.
T4_BUDGET_GIB = 13.5


@dataclass(frozen=True)
class FullScaleCase:
    chapter: str  # '03', '10b', ...
    name: str  # what is trained, e.g. 'HuBERT masked prediction'
    recipe_steps: int  # optimiser steps the chapter's full recipe gives this model (summed over its runs)
    make: Callable[[], Callable[[int], object]]  # builds model + synthetic data; returns train_for(steps)
    note: str = ""  # what the case leaves out or approximates

    @property
    def id(self) -> str: return f"{self.chapter}-{self.name}".replace(" ", "_")


def _sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


def measure(case: FullScaleCase, timed_steps: int = 4, warmup_steps: int = 1) -> dict:
    "Build the case, train `warmup_steps` (start-up, kernel selection), then time `timed_steps` more with peak memory.\n\n    A case whose train function returns no logged losses counts as not finite: the check must see a loss."
    t0 = time.perf_counter()
    train_for = case.make()
    build_s = time.perf_counter() - t0
    if warmup_steps: train_for(warmup_steps)
    _sync()
    if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_for(timed_steps)
    _sync()
    ms = 1000 * (time.perf_counter() - t0) / timed_steps
    losses = getattr(result, "losses", None) or []
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return dict(chapter=case.chapter, case=case.name, recipe_steps=case.recipe_steps, ms_per_step=ms, peak_gib=peak,
                projected_h=case.recipe_steps * ms / 3.6e6, build_s=build_s, last_loss=float(losses[-1]) if losses else float("nan"),
                finite=bool(losses) and all(math.isfinite(x) for x in losses), device=_device_name(), note=case.note)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def record(row: dict, path: str | None = None):
    "Append a measured row to the JSON-lines report named by $SPEECHLLM_CUDA_REPORT (nothing when unset)."
    path = path or os.environ.get("SPEECHLLM_CUDA_REPORT")
    if not path: return
    with open(path, "a") as f: f.write(json.dumps(row) + "\n")


def all_cases() -> list[FullScaleCase]:
    sys.path.insert(0, str(Path(__file__).parent))
    from full_scale_llm import CASES as llm
    from full_scale_signal import CASES as signal
    return sorted(signal + llm, key=lambda c: c.chapter)


def markdown_table(rows: list[dict]) -> str:
    "The report's table: one line per case, projected hours = recipe steps x measured ms/step (training only)."
    lines = ["| chapter | model | recipe steps | ms/step | peak GiB | projected training h |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['chapter']} | {r['case']} | {r['recipe_steps']:,} | {r['ms_per_step']:.1f} | {r['peak_gib']:.2f} | {r['projected_h']:.2f} |")
    return "\n".join(lines)


def over_budget(rows: list[dict], budget_gib: float) -> list[str]:
    "The rows that fail a run: a non-finite loss, or a peak over `budget_gib` (a CPU row has no peak: only its loss counts)."
    return [f"{r['chapter']} {r['case']}: peak {r['peak_gib']:.2f} GiB, finite loss {r['finite']}" for r in rows
            if not r["finite"] or r["peak_gib"] > budget_gib]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="chapters to run (default: all)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--budget-gib", type=float, default=None,
                    help=f"exit 1 if a case's loss is not finite or its peak exceeds this (e.g. {FULL_SCALE_BUDGET_GIB}, or {T4_BUDGET_GIB} in float32)")
    args = ap.parse_args()
    rows = []
    for c in all_cases():
        if args.only and c.chapter not in args.only: continue
        print(f"{c.chapter} {c.name} ...", flush=True)
        rows.append(measure(c, args.steps, args.warmup))
        record(rows[-1])
        print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows))
    if args.budget_gib is not None:
        if not torch.cuda.is_available(): print(f"no GPU here: peak memory not measured, the {args.budget_gib} GiB budget not checked")
        over = over_budget(rows, args.budget_gib)
        if over: sys.exit(f"over the {args.budget_gib} GiB budget or not finite:\n" + "\n".join(over))
