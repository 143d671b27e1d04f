"""The results page of `make course`: every chapter's headline tables, figures and claim verdicts, copied from its
executed notebook, with the scale, hardware and wall time the run recorded. Nothing in it is typed in.

A chapter marks what goes in the report with a first-line comment in a code cell:

    # report: headline ...   the cell's output (a table, a figure, printed text) is a headline result
    # report: claims ...     the cell prints the chapter's verdicts on the papers' claims

    python tools/course_report.py --scale course                       # from data/results/course/ (falls back to nbs/)
    python tools/course_report.py --scale course --notebooks nbs --out nbs/results.md   # the page the docs show

`tools/run_course.py` records each chapter's wall time in `<out folder>/results_files/chapters.json` and calls this
script when it finishes.
"""
import argparse
import base64
import html
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

from speechllm_course.core import atomic_write

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"^#\s*report:\s*(headline|claims)\b", re.M)
TIMINGS = "chapters.json"
LOG_LINE = re.compile(r"^\S.* step \d+/\d+ loss |^\[RANK \d+\]")


def chapter_notebooks(folder: Path) -> list[Path]:
    "The chapters (nn_name.ipynb) in a folder, in course order."
    return sorted(folder.glob("[0-9][0-9]*_*.ipynb"))


def title_of(nb) -> str:
    "A notebook's first '# ' heading."
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m: return m.group(1).strip()
    return "untitled"


def _text(o) -> str:
    return "".join(o.get("text", "")) if o.get("output_type") == "stream" else "".join(o.get("data", {}).get("text/plain", ""))


def marked_outputs(nb, stem: str, files: Path, link_prefix: str) -> list[str]:
    """Markdown for each marked cell's outputs: HTML tables as they are, figures written to `files` and linked, printed
    text in a code block (progress bars and warnings left out)."""
    parts, n_fig = [], 0
    for c in nb.cells:
        if c.cell_type != "code" or not c.source.strip(): continue
        m = MARK.match(c.source.lstrip())
        if not m: continue
        texts = []
        for o in c.get("outputs", []):
            if o.get("output_type") == "error":
                texts.append(f"(this cell failed: {o.get('ename')}: {o.get('evalue')})")
                continue
            if o.get("output_type") == "stream" and o.get("name") == "stderr": continue
            data = o.get("data", {})
            if "image/png" in data:
                n_fig += 1
                name = f"{stem}-{n_fig}.png"
                with atomic_write(files / name) as f: f.write(base64.b64decode("".join(data["image/png"])))
                parts.append(f"![{stem}: figure {n_fig}]({link_prefix}{name})")
            elif "text/html" in data:
                parts.append("".join(data["text/html"]).strip())
            else:
                t = "\n".join(l for l in _text(o).rstrip().splitlines() if not LOG_LINE.match(l))  # training logs are not results
                if t.strip() and "%|" not in t: texts.append(t)
        if texts:
            body = "\n".join(texts)
            parts.append(("**Claims, as this run found them:**\n\n" if m.group(1) == "claims" else "") + f"```\n{body}\n```")
    return parts


def _minutes(s) -> str:
    return "—" if s is None else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _building(t: dict) -> str:
    "What part of a chapter's wall time went into building (training) artifacts rather than loading them from the cache."
    if "built" not in t: return "—"
    if not t["built"]: return "0 (no cached model built)"
    return f"{_minutes(sum(t['built'].values()))} ({len(t['built'])} built)"


def empty_cache_estimate(timings: dict, scale: str, cache: Path | None = None) -> dict:
    """What the summed chapter records miss, or count twice, for a `make course` from an empty cache. Records come from
    different runs: a chapter rerun on its own may have built a model an earlier chapter's record already counts (both
    count it; a full run builds it once), or loaded one built by a run whose record was later replaced (none counts
    it). Returns {'twice': {artifact: seconds}, 'unrecorded': {artifact: seconds}}: builds to subtract, and the build
    times (from each model's manifest in `cache`) to add."""
    first, twice = {}, {}
    for stem in sorted(timings):
        t = timings[stem]
        if t.get("scale") != scale: continue
        for artifact, seconds in t.get("built", {}).items():
            if artifact in first: twice[artifact] = twice.get(artifact, 0.0) + float(seconds)
            else: first[artifact] = float(seconds)
    unrecorded = {}
    if cache is not None and Path(cache).is_dir():
        for manifest in sorted(Path(cache).glob("*/manifest.json")):
            name = manifest.parent.name
            if name in first: continue
            try: m = json.loads(manifest.read_text()); seconds = float(m["build_seconds"])
            except (OSError, ValueError, KeyError, TypeError): continue
            if m.get("scale", scale) == scale: unrecorded[name] = seconds
    return dict(twice=twice, unrecorded=unrecorded)


def _estimate_line(timings: dict, scale: str, cache: Path | None, total: float) -> str:
    e = empty_cache_estimate(timings, scale, cache)
    if not (e["twice"] or e["unrecorded"]): return ""
    listed = lambda d: ", ".join(f"`{k}` {_minutes(v)}" for k, v in sorted(d.items()))
    parts = []
    if e["twice"]: parts.append(f"less the builds that two chapter records both count ({listed(e['twice'])})")
    if e["unrecorded"]: parts.append(f"plus the builds of the models in `data/{scale}/` that no record counts, loaded by the "
                                     f"chapters above from an earlier run ({listed(e['unrecorded'])}; from their manifests)")
    estimate = total - sum(e["twice"].values()) + sum(e["unrecorded"].values())
    return (f"\nFrom an empty cache (a fresh clone's `make course`), about {_minutes(estimate)}: the recorded total "
            + ", ".join(parts) + ".\n")


def write_report(notebooks: Path, out: Path, scale: str, timings: dict | None = None, fallback: Path | None = None,
                 cache: Path | None = None) -> Path:
    """Write the results page `out` (Markdown) and its figures in `<out stem>_files/` from the executed notebooks in
    `notebooks` (chapters missing there are read from `fallback`, e.g. nbs/). `timings`: {chapter stem: {seconds, scale,
    hardware, date}} (default: the one stored beside the page). `cache`: the models' folder (data/<scale>/), read for
    what the records miss when estimating a run from an empty cache (`empty_cache_estimate`)."""
    files = out.with_name(f"{out.stem}_files")
    files.mkdir(parents=True, exist_ok=True)
    if timings is None:
        stored = files / TIMINGS
        timings = json.loads(stored.read_text()) if stored.exists() else {}
    found = {p.stem: p for p in chapter_notebooks(fallback)} if fallback else {}
    found.update({p.stem: p for p in chapter_notebooks(notebooks)})
    nbs = [found[k] for k in sorted(found)]
    if not nbs: raise SystemExit(f"no chapter notebooks in {notebooks}")
    rows, sections = [], []
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        stem, title = p.stem, title_of(nb)
        t = timings.get(stem, {})
        rows.append(f"| [{stem}]({stem}.ipynb) | {html.escape(title)} | {t.get('scale', '—')} | {_minutes(t.get('seconds'))} | "
                    f"{_building(t)} | {t.get('date', '—')} | {t.get('hardware', '—')} |")
        parts = marked_outputs(nb, stem, files, f"{files.name}/")
        if not parts: parts = ["(this chapter marks no headline result)"]
        sections.append(f"## {stem}: {title}\n\n" + "\n\n".join(parts))
    total = sum(t.get("seconds", 0) for t in timings.values() if t.get("scale") == scale)
    head = (f"# Results\n\n> What the course's chapters computed: each chapter's headline tables and figures and its verdicts on the "
            f"papers' claims, copied from the executed notebooks by `tools/course_report.py` (generated {time.strftime('%Y-%m-%d %H:%M')}, "
            f"scale `{scale}`).\n\n"
            "Every number below comes from a notebook's own output; the chapter pages show the code that computed it. "
            "The same seeds give the same numbers on the same machine; on another (another CPU, another thread count) "
            "floating-point sums come out in another order, training drifts, and scores move: in the third decimal where a "
            "result is stable, by more where a test set is small. A difference of that size is noise, not a finding: most verdicts are judged against their noise (a standard error, several "
            "seeds or a stated margin), and each claim line prints the numbers it was judged on. "
            "A claim line reads *holds* or *DOES NOT HOLD* for this run; the paper's figure is printed beside ours where the "
            "chapter compares one. Wall time is recorded when `make course` (`tools/run_course.py`) executes a chapter; a dash "
            "means the chapter's committed outputs predate that record. A chapter trains its models on first use and loads them "
            "from `data/<scale>/` afterwards; *of which building* is the part of the wall time spent training the models it "
            "did not find there, so a first run takes the wall time and a rerun roughly the difference. Experiments a chapter trains "
            "afresh every run (06's collapse experiment, 05's grid of unit LMs) are not cached and count as wall time, not building.\n\n"
            f"| chapter | title | scale | wall time | of which building | run on | hardware |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\nTotal recorded wall time at `{scale}`: {_minutes(total)}.\n" + _estimate_line(timings, scale, cache, total))
    with atomic_write(out, "w", encoding="utf-8") as f: f.write(head + "\n" + "\n\n".join(sections) + "\n")
    return out


def record_timings(out: Path, seconds: dict, scale: str, hardware: str, failed: str | None = None, built: dict | None = None,
                   sources: dict | None = None) -> dict:
    """Merge one run's wall times into the page's stored timings (chapters not run keep their last record). `built`:
    {chapter stem: {artifact: build seconds}}, the artifacts each chapter built in this run; `sources`: {chapter stem:
    {'source': digest, 'cells': digest}}, what the run executed (`run_course` resumes by them)."""
    files = out.with_name(f"{out.stem}_files")
    files.mkdir(parents=True, exist_ok=True)
    stored = files / TIMINGS
    timings = json.loads(stored.read_text()) if stored.exists() else {}
    for stem, s in seconds.items():
        if stem == failed: continue
        timings[stem] = dict(seconds=s, scale=scale, hardware=hardware, date=time.strftime("%Y-%m-%d"))
        if built is not None and stem in built: timings[stem]["built"] = built[stem]
        if sources is not None and stem in sources: timings[stem].update(sources[stem])
    _store_timings(stored, timings)
    return timings


def _store_timings(stored: Path, timings: dict) -> None:
    with atomic_write(stored, "w") as f: f.write(json.dumps(dict(sorted(timings.items())), indent=1) + "\n")


def forget_sources(out: Path, stem: str) -> None:
    """Drop what a stored timing says a chapter was executed from (after a failed rerun overwrote its executed copy), so
    that `run_course` runs it again; its last wall time stays on the page."""
    stored = out.with_name(f"{out.stem}_files") / TIMINGS
    if not stored.exists(): return
    timings = json.loads(stored.read_text())
    if stem not in timings or not {"source", "cells"} & set(timings[stem]): return
    for k in ("source", "cells"): timings[stem].pop(k, None)
    _store_timings(stored, timings)


def renew_sources(out: Path, stem: str, sources: dict) -> dict:
    """Say that a chapter's stored run now stands for the sources `sources` ({'source': digest, 'cells': digest}), its
    wall time, date and builds unchanged: after `run_course` gave its executed copy the chapter's new prose."""
    stored = out.with_name(f"{out.stem}_files") / TIMINGS
    timings = json.loads(stored.read_text())
    timings[stem].update(sources)
    _store_timings(stored, timings)
    return timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default=os.environ.get("SPEECHLLM_SCALE", "course"), choices=["smoke", "course", "full"])
    ap.add_argument("--notebooks", default=None, help="folder of executed notebooks (default: data/results/<scale>/, else nbs/)")
    ap.add_argument("--out", default=None, help="the page to write (default: data/results/<scale>/results.md)")
    args = ap.parse_args()
    results = ROOT / "data" / "results" / args.scale
    notebooks = Path(args.notebooks) if args.notebooks else results
    from speechllm_course.core import data_root
    out = write_report(notebooks, Path(args.out) if args.out else results / "results.md", args.scale, fallback=ROOT / "nbs",
                       cache=data_root() / args.scale)
    print(f"results page: {out} (figures in {out.with_name(out.stem + '_files')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
