"""`make docs-check`: open the rendered docs in headless Chromium and fail if a page is not fit to read.

For every page the sidebar lists (nbs/sidebar.yml) it loads `_docs/<page>.html` in headless Chromium, keeps a
screenshot (`_docs/_check/<page>.png`) and the DOM after the page's scripts ran, and checks:

- the page is there and is not blank: enough visible text, and a screenshot that is not one flat colour;
- every figure the notebook has (an `image/png` output of a shown cell) is on the page as an image that decodes;
- every audio player the notebook has is on the page as an `<audio>` element;
- every equation of the notebook's prose ($...$, $$...$$) is typeset by MathJax, none shows a TeX error, and no
  TeX is left as text in the prose;
- the navigation links to every chapter of the sidebar, under a real title, and the page has a title of its own;
- no raw Quarto markup ({target="_blank" ...}) shows in the text, and no Markdown table is left as text.

    python tools/docs_check.py             # check _docs/ (build it first: make docs)
    python tools/docs_check.py --site DIR  # another rendered site

Exit status 1 when a check fails; the table it prints says which page and which check.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
MIN_TEXT_CHARS = 400  # a chapter page holds prose; less visible text than this is a page that failed to render
MIN_PIXEL_STD = 2.0  # grey-level spread of the screenshot: a blank page is one flat colour


def sidebar_pages(nbs: Path = NBS) -> list[str]:
    "Notebook names in the order nbs/sidebar.yml lists them."
    side = yaml.safe_load((nbs / "sidebar.yml").read_text())
    return [c for c in side["website"]["sidebar"]["contents"] if isinstance(c, str) and c.endswith((".ipynb", ".md"))]


def find_browser() -> str | None:
    "A Chromium-family browser on PATH (Debian's `chromium` first)."
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name): return shutil.which(name)
    return None


def _shown(cell) -> bool:
    "Whether nbdev shows the cell (not `#| hide`, not the default_exp / Colab install cells)."
    flags = [l.replace(" ", "") for l in cell.source.lstrip().splitlines()[:3] if l.replace(" ", "").startswith("#|")]
    return not any(f.startswith(("#|hide", "#|default_exp", "#|include:false", "#|output:false")) for f in flags)


# $$display$$ or $inline$ (an inline equation may wrap onto the next line, not past a blank one); \$ is a dollar sign
_TEX_SPAN = re.compile(r"(?<!\\)\$\$.+?(?<!\\)\$\$|(?<![\\$])\$(?=\S)(?:[^$\n]|\n(?![ \t]*\n))+?(?<![\s\\])\$(?!\$)", re.S)


def equations(markdown: str) -> int:
    "How many TeX equations ($...$ inline, $$...$$ display) a Markdown text holds outside code."
    prose = re.sub(r"(?ms)^\s*(```|~~~).*?^\s*\1", " ", markdown)
    prose = re.sub(r"(`+).+?\1", " ", prose, flags=re.S)
    return len(_TEX_SPAN.findall(prose))


def expected_media(nb_path: Path) -> dict:
    """{'figures': n, 'audio': n, 'math': n}: the image and audio outputs of the notebook's shown cells and the
    equations of its prose (a Markdown page: its PNG images and equations)."""
    if nb_path.suffix == ".md":
        text = nb_path.read_text(encoding="utf-8")
        return dict(figures=len(re.findall(r"!\[[^\]]*\]\([^)\s]+\.png\)", text)), audio=0, math=equations(text))
    nb = nbformat.read(nb_path, as_version=4)
    figures = audio = 0
    math = sum(equations(c.source) for c in nb.cells if c.cell_type == "markdown")
    for c in nb.cells:
        if c.cell_type != "code" or not _shown(c): continue
        for o in c.get("outputs", []):
            data = o.get("data", {})
            figures += "image/png" in data
            audio += "".join(data.get("text/html", "")).count("<audio")
    return dict(figures=figures, audio=audio, math=math)


def render(browser: str, page: Path, screenshot: Path, width: int = 1280, height: int = 2400) -> str:
    "The page's DOM after its scripts ran (and a screenshot of its first `height` pixels), from headless Chromium."
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
              "--virtual-time-budget=5000"]
    with tempfile.TemporaryDirectory() as profile:
        prof = [f"--user-data-dir={profile}"]
        dom = subprocess.run(common + prof + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        subprocess.run(common + prof + [f"--screenshot={screenshot}", page.as_uri()], capture_output=True, text=True, timeout=120)
    if dom.returncode != 0: raise RuntimeError(f"{browser} failed on {page}: {dom.stderr[-500:]}")
    return dom.stdout


def visible_text(dom: str, leave_out: tuple = ("script", "style", "head")) -> str:
    "The DOM's text without tags and without the elements named in `leave_out` (by default scripts, styles, the head)."
    body = re.sub(rf"(?is)<({'|'.join(leave_out)})\b[^>]*>.*?</\1>", " ", dom)
    return " ".join(re.sub(r"(?s)<[^>]+>", " ", body).split())


def raw_table_rows(dom: str) -> list[str]:
    """Paragraphs that hold a Markdown table's delimiter row (|---|): a table the renderer gave up on and printed as
    text (one row with a `|` the table syntax did not expect breaks the whole table). Code blocks are not paragraphs."""
    paragraphs = re.findall(r"<p[ >](.*?)</p>", dom, flags=re.S)
    return [re.sub(r"<[^>]+>", "", p).strip() for p in paragraphs if re.search(r"\|\s*:?-{3,}:?\s*\|", p)]


def typeset_equations(dom: str) -> int:
    "Equations MathJax typeset on the page (MathJax 2, nbconvert's: one frame per equation; MathJax 3, Quarto's: a container)."
    return len(re.findall(r'id="MathJax-Element-\d+-Frame"|<mjx-container\b', dom))


def raw_tex(dom: str) -> list[str]:
    "TeX left as text in the page's prose (not in code, outputs or scripts): equations that no script typeset."
    return _TEX_SPAN.findall(html.unescape(visible_text(dom, leave_out=("script", "style", "head", "pre", "code"))))


def tex_errors(dom: str) -> int:
    "Equations MathJax could not typeset: it shows them as an error box (class merror) or 'Math Processing Error'."
    return len(re.findall(r'class="[^"]*\bmerror\b', dom)) + visible_text(dom).count("Math Processing Error")


def decodable_images(dom: str) -> tuple[int, int]:
    "(images that decode, images that do not) among the page's inline PNG figures."
    from PIL import Image
    ok = bad = 0
    for src in re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', dom):
        try:
            with Image.open(io.BytesIO(base64.b64decode(src))) as im:
                im.load()
                ok += im.width > 1 and im.height > 1
        except Exception:
            bad += 1
    return ok, bad


def pixel_spread(png: Path) -> float:
    "Standard deviation of the screenshot's grey levels (0 for a single-colour page)."
    import numpy as np
    from PIL import Image
    with Image.open(png) as im: return float(np.asarray(im.convert("L"), dtype=float).std())


@dataclass
class PageReport:
    page: str
    problems: list = field(default_factory=list)
    text_chars: int = 0
    figures: str = ""
    audio: str = ""
    math: str = ""
    nav_links: str = ""
    pixel_std: float = 0.0


def check_page(browser: str, site: Path, nb_name: str, pages: list[str], shots: Path, nbs: Path = NBS) -> PageReport:
    "Render one page and run every check on it."
    html_name = Path(nb_name).with_suffix(".html").name
    rep = PageReport(html_name)
    page = site / html_name
    if not page.is_file():
        rep.problems.append("page missing")
        return rep
    shot = shots / html_name.replace(".html", ".png")
    dom = render(browser, page, shot)
    rep.text_chars = len(visible_text(dom))
    if rep.text_chars < MIN_TEXT_CHARS: rep.problems.append(f"blank: {rep.text_chars} characters of text")
    rep.pixel_std = pixel_spread(shot) if shot.is_file() else 0.0
    if rep.pixel_std < MIN_PIXEL_STD: rep.problems.append(f"blank screenshot (grey-level spread {rep.pixel_std:.1f})")
    want = expected_media(nbs / nb_name)
    ok, bad = decodable_images(dom)
    rep.figures = f"{ok}/{want['figures']}"
    if bad: rep.problems.append(f"{bad} figure(s) that do not decode")
    if ok < want["figures"]: rep.problems.append(f"figures missing: {ok} of {want['figures']} on the page")
    n_audio = len(re.findall(r"<audio\b", dom))
    rep.audio = f"{n_audio}/{want['audio']}"
    if n_audio < want["audio"]: rep.problems.append(f"audio players missing: {n_audio} of {want['audio']}")
    typeset = typeset_equations(dom)
    rep.math = f"{typeset}/{want['math']}"
    if typeset < want["math"]: rep.problems.append(f"equations not typeset: {typeset} of {want['math']}")
    errors, left_as_text = tex_errors(dom), raw_tex(dom)
    if errors: rep.problems.append(f"{errors} equation(s) with a TeX error")
    if left_as_text: rep.problems.append(f"TeX shown as text: {left_as_text[0][:60]!r}")
    hrefs = set(re.findall(r'<nav[^>]*id="course-nav".*?</nav>', dom, re.S))
    nav = " ".join(hrefs)
    linked = [p for p in pages if f'href="{Path(p).with_suffix(".html").name}"' in nav]
    rep.nav_links = f"{len(linked)}/{len(pages)}"
    if len(linked) < len(pages): rep.problems.append(f"navigation lacks {sorted(set(pages) - set(linked))}")
    names = [t.strip() for t in re.findall(r"<a [^>]*>([^<]*)</a>", nav)]
    if any(not t or t.lower() == "untitled" for t in names): rep.problems.append("navigation has untitled entries")
    if not re.search(r"<h1\b", dom): rep.problems.append("no page title (h1)")
    if re.search(r"\{target=\"_blank\"", visible_text(dom)): rep.problems.append("raw Quarto link attributes in the text")
    if raw_table_rows(dom): rep.problems.append(f"a Markdown table shown as text, not a table: {raw_table_rows(dom)[0][:80]!r}")
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default=str(ROOT / "_docs"), help="the rendered site (default: _docs/)")
    ap.add_argument("--pages", nargs="*", default=None, help="only these notebooks (e.g. 13_preference.ipynb)")
    args = ap.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print("docs-check: no Chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    site = Path(args.site)
    if not (site / "index.html").is_file():
        print(f"docs-check: no rendered site in {site} (run make docs first)", file=sys.stderr)
        return 2
    pages = sidebar_pages()
    shots = site / "_check"
    shots.mkdir(exist_ok=True)
    reports = [check_page(browser, site, p, pages, shots) for p in (args.pages or pages)]
    print("| page | text chars | figures (page/notebook) | audio | equations | nav links | screenshot spread | result |")
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(f"| {r.page} | {r.text_chars} | {r.figures} | {r.audio} | {r.math} | {r.nav_links} | {r.pixel_std:.1f} | "
              f"{'ok' if not r.problems else '; '.join(r.problems)} |")
    failed = [r for r in reports if r.problems]
    print(f"docs-check: {len(reports) - len(failed)} of {len(reports)} pages pass; screenshots in {shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
