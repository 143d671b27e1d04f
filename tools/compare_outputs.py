"""Did this run reproduce the committed outputs? Compare what the chapters printed in a run (default: the executed copies
`make course` writes to data/results/<scale>/) with the committed notebooks in nbs/, chapter by chapter and code cell by
code cell, leaving out what differs between any two runs: wall times and speeds, progress bars, the training log of a
model that one run trained and the other loaded from its cache, and file paths. What is left (losses, scores, tables,
verdicts) is compared exactly, and every line that differs is shown.

    python tools/compare_outputs.py                        # data/results/course/ against nbs/
    python tools/compare_outputs.py --scale smoke --only 03 05b
    python tools/compare_outputs.py --ours /path/to/other/nbs --lines 0   # chapter summary only

On the machine that produced the committed outputs, the same seeds give the same printed numbers; on another (another
CPU, another thread count) floating-point sums come out in another order and training drifts, so expect differences in
the later decimals there: this tool shows where and how large they are. Exit status: 0 when every compared chapter
prints the same, 1 when some chapter differs or is missing from the run, 2 on bad arguments.
"""
import argparse
import re
from html.parser import HTMLParser
import sys
from collections import Counter
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from course_report import chapter_notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MASK = "<t>"
# durations and rates: "12.3 s", "8, 8, 12 ms", "4 min", "114.4 ms/step", "70 samples/s", "(177x real time)", tqdm's
# "[00:12<00:30, ...]"
_TIMING = re.compile(r"\d+(?:\.\d+)?(?:,\s*\d+(?:\.\d+)?)*\s*(?:ms|s|min|h)\b(?:/\w+)?|\d+(?:\.\d+)?\s*(?:it|samples|steps|tokens|clips|utt\w*)/s"
                     r"|\d+(?:\.\d+)?x real time|\[\d\d:\d\d[^\]]*\]")
_RATE = re.compile(r"\d+(?:\.\d+)?(?= per second)|(?<=range )\d+(?:\.\d+)?-\d+(?:\.\d+)?")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")
# lines that only a run which built a model (or wrote one, or showed a progress bar) prints
_RUN_ONLY = re.compile(r"%\||\bstep \d+/\d+\b.*\bloss\b|Loading weights|Writing model shards|^\s*$")
# table columns that hold wall times (a training run's seconds, milliseconds per utterance, real-time factor)
WALL_TIME_COLUMNS = re.compile(r"^(?:build_|train_|adapter_train_|encoder_)?seconds$|^train_s$|^ms_|real_time_factor", re.I)
# the same names as keys of a printed dict: {'final_loss': 0.02, 'ms_per_step': 64.9}
_WALL_TIME_KEY = re.compile(r"""(['"](?:(?:build_|train_|adapter_train_|encoder_)?seconds|train_s|ms_\w+|real_time_factor)['"]\s*:\s*)[-+\d.eE]+""")


class _Tables(HTMLParser):
    "The rows of the HTML tables in an output (pandas' `text/html`), as lists of cell texts, header rows first."
    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table": self.tables.append([])
        elif tag == "tr" and self.tables: self.tables[-1].append([])
        elif tag in ("th", "td") and self.tables and self.tables[-1]: self._cell = []

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None: self._cell.append(data)


def table_lines(html: str) -> list[str]:
    "A DataFrame's HTML as one line per row, cells joined by ' | ', with wall-time columns (by their header) masked."
    parser = _Tables()
    parser.feed(html)
    lines = []
    for rows in parser.tables:
        if not rows: continue
        header = rows[0]
        timed = {j for j, name in enumerate(header) if WALL_TIME_COLUMNS.search(name)}
        lines += [" | ".join(MASK if j in timed and r is not header else c for j, c in enumerate(r)) for r in rows]
    return lines


def printed_lines(cell) -> list[str]:
    "A code cell's text outputs (streams, text results, tables row by row; a figure as a placeholder; widgets left out), masked line by line."
    lines = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if out.get("output_type") == "stream": text = out.get("text", "")
        elif out.get("output_type") == "error": text = f"ERROR {out.get('ename', '')}: {out.get('evalue', '')}"
        elif "image/png" in data or "image/svg+xml" in data: text = "<figure>"
        elif "application/vnd.jupyter.widget-view+json" in data: continue  # progress bars and live widgets: state, not results
        elif "<table" in data.get("text/html", ""):
            lines += table_lines(data["text/html"])
            continue
        else: text = data.get("text/plain", "")
        lines += text.replace("\r", "\n").splitlines()
    return [_mask(l) for l in lines if not _RUN_ONLY.search(l)]


def _mask(line: str) -> str:
    line = _TIMING.sub(MASK, _WALL_TIME_KEY.sub(rf"\g<1>{MASK}", line))
    # "answered in 0.4 s (516.8 per second)", "1.22 ms (range 1.21-1.26)": a rate or range beside a wall time is one too
    if MASK in line: line = _RATE.sub(MASK, line)
    return _PATH.sub("<path>", line).rstrip()


def compare_chapter(ours: Path, committed: Path) -> list[dict]:
    "One dict per code cell whose masked output lines differ: its index, first source line, and the lines only each side has."
    a, b = nbformat.read(ours, as_version=4), nbformat.read(committed, as_version=4)
    code_a = [c for c in a.cells if c.cell_type == "code"]
    code_b = [c for c in b.cells if c.cell_type == "code"]
    if [c.source for c in code_a] != [c.source for c in code_b]:
        return [dict(cell=None, source="the code cells differ: the run executed other sources than the committed notebook",
                     only_ours=[], only_committed=[])]
    diffs = []
    for i, (x, y) in enumerate(zip(code_a, code_b)):
        lx, ly = printed_lines(x), printed_lines(y)
        if lx == ly: continue
        # a line printed by both runs, at another place within the cell (e.g. after a build log), is not a difference
        cx, cy = Counter(lx), Counter(ly)
        only_x, only_y = [l for l in lx if cx[l] > cy.get(l, 0)], [l for l in ly if cy[l] > cx.get(l, 0)]
        if not only_x and not only_y: continue
        diffs.append(dict(cell=i, source=x.source.splitlines()[0] if x.source else "", only_ours=only_x, only_committed=only_y))
    return diffs


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="course", choices=["smoke", "course", "full"], help="which run's executed copies (data/results/<scale>/)")
    ap.add_argument("--ours", type=Path, default=None, help="a folder of executed chapters (default: data/results/<scale>/)")
    ap.add_argument("--committed", type=Path, default=None, help="the folder compared against (default: nbs/)")
    ap.add_argument("--only", nargs="*", default=None, help="chapter number prefixes, e.g. 03 05b")
    ap.add_argument("--lines", type=int, default=4, help="differing lines shown per cell and side (0: chapter summary only)")
    args = ap.parse_args(argv)
    ours = args.ours or root / "data" / "results" / args.scale
    committed = args.committed or root / "nbs"
    for name, folder in (("--ours", ours), ("--committed", committed)):
        if not folder.is_dir():
            print(f"{name}: expected a folder of executed chapter notebooks, got {folder} (not a folder; `make course` writes "
                  f"data/results/<scale>/)", file=sys.stderr)
            return 2
    if args.lines < 0:
        print(f"--lines: expected a count >= 0, got {args.lines}", file=sys.stderr)
        return 2
    chapters = chapter_notebooks(committed)
    if args.only: chapters = [p for p in chapters if any(p.name.startswith(o) for o in args.only)]
    if not chapters:
        print(f"--only: no chapter in {committed} starts with {args.only}" if args.only else f"--committed: no chapter notebooks in {committed}",
              file=sys.stderr)
        return 2
    same, differ, missing = [], [], []
    for nb in chapters:
        run = ours / nb.name
        if not run.exists():
            missing.append(nb.stem)
            print(f"{nb.stem}: not in {ours} (not executed in this run)")
            continue
        diffs = compare_chapter(run, nb)
        (differ if diffs else same).append(nb.stem)
        print(f"{nb.stem}: " + (f"{len(diffs)} code cell(s) print otherwise" if diffs else "prints the same"))
        for d in diffs if args.lines else []:
            print(f"  cell {d['cell']}: {d['source'][:90]}" if d["cell"] is not None else f"  {d['source']}")
            for side, lines in (("this run", d["only_ours"]), ("committed", d["only_committed"])):
                for line in lines[: args.lines]: print(f"    {side:>9}: {line[:200]}")
                if len(lines) > args.lines: print(f"    {side:>9}: ... {len(lines) - args.lines} more")
    print(f"{len(same)} of {len(chapters)} chapters print the same as {committed.name}/ (timings, paths and build logs left out); "
          f"{len(differ)} differ, {len(missing)} not run")
    return 0 if not differ and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
