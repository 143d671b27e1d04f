"""Print how many torch threads each of N worker processes should use, so that N workers never run more threads
than this machine lets us use (`make test` runs nbdev_test with 2 workers).

Why: torch starts one thread per core it sees in every process. Two notebooks training at once on 2 cores then run 4
threads, and OpenMP's spinning makes each step several times slower (measured here: two processes training a small
Transformer took 66 s each with 2 threads, 19 s each with 1). Containers often show more cores than their CPU quota
allows, which makes it worse; the quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) is read too.

    python tools/cpu_budget.py            # usable cores
    python tools/cpu_budget.py --per 2    # threads for each of 2 workers (at least 1)
"""
import argparse
import math
import os
from pathlib import Path


def _cgroup_quota() -> float | None:
    "CPUs allowed by the cgroup quota, or None when there is no quota."
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1q, v1p = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if v1q.exists() and v1p.exists():
            quota = int(v1q.read_text())
            return None if quota <= 0 else quota / int(v1p.read_text())
    except (OSError, ValueError):
        return None
    return None


def usable_cores() -> int:
    "Cores this process may run on (affinity), capped by the cgroup CPU quota."
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    if quota is not None: cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per", type=int, default=1, help="number of worker processes sharing the cores")
    args = ap.parse_args()
    if args.per < 1: ap.error(f"--per: expected a positive number of workers, got {args.per}")
    print(max(1, usable_cores() // args.per))


if __name__ == "__main__":
    main()
