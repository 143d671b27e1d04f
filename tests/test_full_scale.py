"The full-scale case registry (run on a GPU by test_cuda.py) checked on the CPU: it loads, names every case once, and measures honestly."
import math
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from full_scale import T4_BUDGET_GIB, FullScaleCase, all_cases, markdown_table, measure, over_budget  # noqa: E402

CHAPTERS = {re.match(r"(\d+[a-z]?)_", p.name).group(1) for p in (Path(__file__).parents[1] / "nbs").glob("[0-9]*.ipynb")}


def test_every_case_has_a_unique_id_a_real_chapter_and_a_step_count():
    cases = all_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)) and len(cases) >= 30
    assert {c.chapter for c in cases} <= CHAPTERS
    assert all(isinstance(c.recipe_steps, int) and c.recipe_steps > 0 for c in cases)


@pytest.mark.parametrize("name", ["speaker encoder", "CTC unit decoder"])
def test_a_cheap_case_trains_on_the_cpu_with_a_finite_loss(name, one_thread):
    "The two cheapest cases (under a second a step here) run end to end, so the harness cannot rot between GPU runs."
    case = next(c for c in all_cases() if c.name == name)
    row = measure(case, timed_steps=1, warmup_steps=0)
    assert row["finite"] and math.isfinite(row["last_loss"]) and row["ms_per_step"] > 0
    assert row["projected_h"] == pytest.approx(case.recipe_steps * row["ms_per_step"] / 3.6e6)
    assert f"| {case.chapter} | {name} |" in markdown_table([row])


def test_a_case_that_logs_no_loss_is_not_finite():
    class NoHistory: losses = []
    row = measure(FullScaleCase("00", "silent", 10, lambda: (lambda steps: NoHistory())), timed_steps=1, warmup_steps=0)
    assert row["finite"] is False


def test_the_budget_check_names_each_case_over_it_or_not_finite():
    row = lambda case, peak, finite=True: dict(chapter="08", case=case, peak_gib=peak, finite=finite)
    rows = [row("fits", 10.6), row("too big", 13.6), row("diverged", 1.0, finite=False), row("cpu", float("nan"))]
    assert over_budget(rows, T4_BUDGET_GIB) == ["08 too big: peak 13.60 GiB, finite loss True", "08 diverged: peak 1.00 GiB, finite loss False"]
