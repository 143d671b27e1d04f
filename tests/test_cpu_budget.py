"tools/cpu_budget.py: `make test` gives each nbdev_test worker its share of the usable cores, the CPU quota included."
import subprocess
import sys
from pathlib import Path


TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import cpu_budget  # noqa: E402


def test_quota_caps_the_cores(monkeypatch):
    monkeypatch.setattr(cpu_budget.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: 2.5)
    assert cpu_budget.usable_cores() == 2
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: 0.5)  # under one core still gets one
    assert cpu_budget.usable_cores() == 1
    monkeypatch.setattr(cpu_budget, "_cgroup_quota", lambda: None)
    assert cpu_budget.usable_cores() == 16


def test_cgroup_v2_file_is_parsed(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    real_path = cpu_budget.Path
    monkeypatch.setattr(cpu_budget, "Path", lambda p: cpu_max if p == "/sys/fs/cgroup/cpu.max" else real_path(p))
    cpu_max.write_text("300000 100000\n")
    assert cpu_budget._cgroup_quota() == 3.0
    cpu_max.write_text("max 100000\n")
    assert cpu_budget._cgroup_quota() is None


def test_threads_per_worker_from_the_command_line():
    run = lambda *a: subprocess.run([sys.executable, str(TOOLS / "cpu_budget.py"), *a], capture_output=True, text=True)
    cores = cpu_budget.usable_cores()
    assert run().stdout.strip() == str(cores)
    assert run("--per", "2").stdout.strip() == str(max(1, cores // 2))
    bad = run("--per", "0")
    assert bad.returncode != 0 and "--per" in bad.stderr and "got 0" in bad.stderr
